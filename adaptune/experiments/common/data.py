"""Reading a dataset's tab-separated files robustly: quoted fields, blank rows, missing labels.

Rows are parsed with the csv module (delimiter tab, strict), never by splitting lines, so csv-quoted
fields may hold tabs and doubled quotes (GLUE's .tsv files are read with QUOTE_NONE: quotes are text).
Every row is one line of the file: a field that spans lines, or holds a line break, is refused, since a
stray '"' at the start of a field otherwise swallows the rows after it (one row read for many lines).
Files are read as UTF-8, with or without a byte-order mark (encoding utf-8-sig).

  skipped, each listed as 'file:line: reason'   blank rows; rows whose label or a text is empty
  dropped, counted per raw label                rows whose raw label is one of the dataset's drop_labels
                                                 (SST's neutral "2" for sst-binary): not examples, not
                                                 skipped; load_dataset records the counts per file read,
                                                 info["dropped_labels"] = {"train": {"2": 1624}, "dev":
                                                 {"2": 229}} (only for a dataset with drop_labels)
  DataError naming the file and line             a missing file or header column, undecodable bytes,
                                                 an unclosed quote (the line where it opened), a
                                                 quoted field running over lines, a row with too few
                                                 fields, a label that is not a number (nor one of the
                                                 dataset's label names), a class id out of range, a
                                                 score outside the dataset's range
"""
from __future__ import annotations

import csv
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .datasets import CLASSES, DATASETS, Dataset
from .errors import DataError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long reviews (CFIMDB) exceed the 128 KiB default


@dataclass(frozen=True)
class Example:
    a: str  # the sentence, or the first of a pair
    b: str | None  # the second sentence of a pair (cross-encoded with a), else None
    label: float  # class id (as a float) or score
    line: int = 0  # 1-based line of the file where the row starts


@dataclass
class DatasetSplits:
    """One dataset loaded: its train and dev examples, what was read and what was skipped."""
    dataset: Dataset
    train: list[Example]
    dev: list[Example]
    info: dict = field(default_factory=dict)  # files, split, sizes: recorded in results.json
    skipped: list[str] = field(default_factory=list)  # 'file:line: reason'


SHARED_DATA = "../shared/data/cs224n"  # the data directory without --data-dir or $ADAPTUNE_DATA


def default_data_dir(shared: str = SHARED_DATA, env: str = "ADAPTUNE_DATA", holds: str | None = None) -> Path:
    """$ADAPTUNE_DATA, else SHARED_DATA (from the working directory, then from the repository); another
    experiment's data passes its own `shared` folder, variable `env` and what the folder `holds`."""
    given = os.environ.get(env)
    if given:
        return Path(given)
    here = Path(__file__).resolve().parents[3]  # the repository root
    for candidate in (Path.cwd() / shared, here / shared):
        if candidate.is_dir():
            return candidate.resolve()
    if holds is None:
        expected = ", ".join(f for t in ("sst", "para", "sts") for f in DATASETS[t].files)
        holds = (f"tab-separated files with a header row ({expected}), or GLUE folders (SST-2/train.tsv, "
                 f"SST-2/dev.tsv, ...)")
    raise DataError(f"no data directory: give --data-dir DIR or set {env} (looked for {shared} from "
                    f"{Path.cwd()} and from {here}). DIR holds {holds}")


def _column(header: list[str] | None, column: str | int, path: Path) -> int:
    if isinstance(column, int):
        return column
    names = [h.strip() for h in header or []]
    if column not in names:
        raise DataError(f"{path}:1: no column {column!r} in the header; the columns are {names}")
    return names.index(column)


def _label(raw: str, where: str, dataset: Dataset) -> float:
    raw = raw.strip()
    if raw in dataset.label_map:
        return float(dataset.label_map[raw])
    try:
        value = float(raw)
    except ValueError:
        valid = f"one of {sorted(dataset.label_map)}" if dataset.label_map else "a number"
        hint = " (an unclosed quote earlier in the row?)" if "\n" in raw or "\t" in raw else ""
        raise DataError(f"{where}: label {raw[:40]!r} is not {valid}{hint}") from None
    if value != value or abs(value) == float("inf"):
        raise DataError(f"{where}: label {raw!r} is not a finite number")
    if dataset.kind != "regression":
        n = dataset.n_out if dataset.kind == CLASSES else 2
        if value != int(value) or not 0 <= value < n:
            raise DataError(f"{where}: label {raw!r} is not a class id in 0..{n - 1}")
    elif dataset.label_range and not dataset.label_range[0] <= value <= dataset.label_range[1]:
        raise DataError(f"{where}: score {raw!r} is outside {dataset.label_range[0]}..{dataset.label_range[1]}")
    return value


QUOTE_HELP = "close it, double a quote inside a quoted field (\"\"), or remove the stray '\"'"


def _one_line(row: list[str], where: str, last: int) -> None:
    """Refuse a row whose fields hold a line break: a quote opened on the row's first line ran on."""
    if any("\n" in x or "\r" in x for x in row):
        raise DataError(f"{where}: a quoted field opened on this line runs on to line {last} (an unclosed quote "
                        f"swallows the rows after it); every row must be on one line: {QUOTE_HELP}")


def _csv_error(e: csv.Error, where: str) -> DataError:
    if "unexpected end of data" in str(e):
        return DataError(f"{where}: a quote opened on this line is never closed, so the rest of the file would "
                         f"be one field: {QUOTE_HELP}")
    return DataError(f"{where}: {e} (a quoted field must end with '\"' before the next tab; {QUOTE_HELP})")


def read_file(path: str | Path, dataset: Dataset) -> tuple[list[Example], list[str]]:
    """(examples, skipped rows) of one file of `dataset` (rows with a dropped label are neither)."""
    examples, skipped, _ = read_counted(path, dataset)
    return examples, skipped


def read_counted(path: str | Path, dataset: Dataset) -> tuple[list[Example], list[str], dict[str, int]]:
    """(examples, skipped rows, {raw label: rows dropped}) of one file of `dataset`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (dataset {dataset.name!r} reads {', '.join(dataset.files)})")
    examples: list[Example] = []
    skipped: list[str] = []
    dropped: Counter[str] = Counter()
    line = 1
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t", quoting=dataset.quoting, strict=True)
            header = None
            if dataset.header:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: the file is empty; expected a header row")
                _one_line(header, f"{path}:1", reader.line_num)
            cols = [_column(header, c, path) for c in dataset.text]
            at = _column(header, dataset.label, path)
            need = max(cols + [at]) + 1
            line = reader.line_num + 1
            for row in reader:
                start, line = line, reader.line_num + 1
                _one_line(row, f"{path}:{start}", reader.line_num)
                if not any(x.strip() for x in row):
                    skipped.append(f"{path}:{start}: blank row")
                    continue
                if len(row) < need and not (len(row) == need - 1 and at == need - 1):  # trailing empty label
                    raise DataError(f"{path}:{start}: expected at least {need} tab-separated fields, got {len(row)}")
                raw = row[at] if at < len(row) else ""
                texts = [row[c].strip() for c in cols]
                if raw.strip() in dataset.drop_labels:
                    dropped[raw.strip()] += 1
                elif not raw.strip():
                    skipped.append(f"{path}:{start}: empty label")
                elif not all(texts):
                    skipped.append(f"{path}:{start}: empty text")
                else:
                    label = _label(raw, f"{path}:{start}", dataset)
                    examples.append(Example(texts[0], texts[1] if dataset.pair else None, label, start))
    except csv.Error as e:
        raise _csv_error(e, f"{path}:{line}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not examples:
        left_out = f", {sum(dropped.values())} with a dropped label {sorted(dropped)}" if dropped else ""
        raise DataError(f"{path}: no labelled rows for dataset {dataset.name!r} ({len(skipped)} skipped{left_out})")
    return examples, skipped, dict(sorted(dropped.items()))


def find(data_dir: Path, relative: str, dataset: Dataset) -> Path:
    """data_dir/relative, or data_dir/<file name> when data_dir is the dataset's own folder (GLUE)."""
    for p in (data_dir / relative, data_dir / Path(relative).name):
        if p.is_file():
            return p
    raise DataError(f"{data_dir}: no {relative} for dataset {dataset.name!r} "
                    f"(it reads {', '.join(dataset.files)}; give --data-dir)")


def split(examples: Sequence[Example], train_ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic train/dev split: random.Random(seed).shuffle of the indices, the first
    round(train_ratio·n) for train, the rest for dev; both kept in file order."""
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"the train ratio of a split must be in (0, 1), got {train_ratio!r}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train = round(len(order) * train_ratio)
    return [examples[i] for i in sorted(order[:n_train])], [examples[i] for i in sorted(order[n_train:])]


def subset(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """At most n examples: a seeded sample kept in file order (all of them when n is None)."""
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise DataError(f"a subset size must be positive, got {n}")
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]


def load_dataset(dataset: Dataset, data_dir: Path, *, seed: int = 0, split_ratio: float = 0.8,
                 train_limit: int | None = None, dev_limit: int | None = None) -> DatasetSplits:
    """Train and dev examples of one dataset; `seed` picks the split of a dev-less dataset and the subsets."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory (dataset {dataset.name!r} reads {', '.join(dataset.files)})")
    train_path = find(data_dir, dataset.train, dataset)
    train, skipped, dropped = read_counted(train_path, dataset)
    info: dict = {"files": [str(p) for p in dataset.files]}
    if dataset.drop_labels:
        info["dropped_labels"] = {"train": dropped}
    if dataset.dev is None:
        train, dev = split(train, split_ratio, seed)
        info["split"] = {"file": dataset.train, "seed": seed, "train_ratio": split_ratio, "train": len(train),
                         "dev": len(dev), "method": "random.Random(seed).shuffle of row indices; "
                                                    "first round(ratio*n) train, rest dev"}
    else:
        dev, more, dropped = read_counted(find(data_dir, dataset.dev, dataset), dataset)
        skipped += more
        if dataset.drop_labels:
            info["dropped_labels"]["dev"] = dropped
    info["available"] = {"train": len(train), "dev": len(dev)}
    train, dev = subset(train, train_limit, seed), subset(dev, dev_limit, seed + 1)
    info["used"] = {"train": len(train), "dev": len(dev)}
    info["skipped_rows"] = len(skipped)
    return DatasetSplits(dataset, train, dev, info, skipped)
