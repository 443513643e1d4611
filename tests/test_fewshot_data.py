"""The SST-2-style binary dataset (sst-binary, alias sstb): SST-5's files relabelled, the neutral class dropped."""
from pathlib import Path

import pytest

from adaptune.errors import ConfigError
from adaptune.experiments.common.data import load_dataset, read_file
from adaptune.experiments.common.datasets import CLASSES, Dataset, get_dataset, parse_datasets
from adaptune.experiments.common.errors import DataError

SST_HEAD = "\tid\tsentence\tsentiment\n"
REAL = Path("/work/shared/data/cs224n")


def write_sst(folder, train_labels, dev_labels):
    for name, labels in (("ids-sst-train.csv", train_labels), ("ids-sst-dev.csv", dev_labels)):
        rows = "".join(f"{i}\tid{i}\t sentence {i} with label {y} \t{y}\n" for i, y in enumerate(labels))
        (folder / name).write_text(SST_HEAD + rows, encoding="utf-8")


def test_labels_are_mapped_and_neutral_rows_dropped_and_counted(tmp_path):
    write_sst(tmp_path, [0, 1, 2, 3, 4, 2, 4], [2, 3, 0])
    splits = load_dataset(get_dataset("sst-binary"), tmp_path)
    assert [(e.a, e.label) for e in splits.train] == [
        ("sentence 0 with label 0", 0.0), ("sentence 1 with label 1", 0.0), ("sentence 3 with label 3", 1.0),
        ("sentence 4 with label 4", 1.0), ("sentence 6 with label 4", 1.0)]
    assert [e.line for e in splits.train] == [2, 3, 5, 6, 8]
    assert [(e.label, e.line) for e in splits.dev] == [(1.0, 3), (0.0, 4)]
    assert splits.info["dropped_labels"] == {"train": {"2": 2}, "dev": {"2": 1}}
    assert splits.skipped == [] and splits.info["skipped_rows"] == 0
    assert splits.info["available"] == {"train": 5, "dev": 2}


def test_dropped_rows_are_not_skipped_rows_but_empty_labels_still_are(tmp_path):
    write_sst(tmp_path, [0, 2, 4], [3])
    train = tmp_path / "ids-sst-train.csv"
    train.write_text(train.read_text() + "9\tid9\tno label\t\n", encoding="utf-8")
    splits = load_dataset(get_dataset("sstb"), tmp_path)
    assert splits.skipped == [f"{train}:5: empty label"]
    assert splits.info["dropped_labels"]["train"] == {"2": 1}


def test_sst5_reads_the_same_file_unchanged(tmp_path):
    write_sst(tmp_path, [0, 1, 2, 3, 4], [2])
    splits = load_dataset(get_dataset("sst"), tmp_path)
    assert [e.label for e in splits.train] == [0.0, 1.0, 2.0, 3.0, 4.0] and len(splits.dev) == 1
    assert "dropped_labels" not in splits.info


def test_a_label_neither_mapped_nor_dropped_is_refused(tmp_path):
    write_sst(tmp_path, [0, 5], [3])
    with pytest.raises(DataError, match=r"ids-sst-train\.csv:3: label '5' is not a class id in 0..1"):
        load_dataset(get_dataset("sst-binary"), tmp_path)


def test_a_file_of_only_dropped_rows_says_so(tmp_path):
    write_sst(tmp_path, [2, 2], [3])
    with pytest.raises(DataError, match=r"no labelled rows .* \(0 skipped, 2 with a dropped label \['2'\]\)"):
        read_file(tmp_path / "ids-sst-train.csv", get_dataset("sst-binary"))


def test_the_alias_and_the_registry_entry():
    (d,) = parse_datasets("sstb")
    assert d is get_dataset("sst-binary") and d.name == "sst-binary"
    assert (d.kind, d.n_out, d.metric, d.files) == (CLASSES, 2, "accuracy", ["ids-sst-train.csv", "ids-sst-dev.csv"])
    assert d.drop_labels == ("2",) and get_dataset("sst2").name == "sst2" and get_dataset("sst").drop_labels == ()
    with pytest.raises(ConfigError, match="dataset listed twice"):
        parse_datasets("sstb,sst-binary")


@pytest.mark.parametrize("kwargs, match", [
    ({"drop_labels": "2"}, "drop_labels must be a tuple of non-empty raw label strings"),
    ({"drop_labels": (2,)}, "drop_labels must be a tuple"),
    ({"drop_labels": ("",)}, "drop_labels must be a tuple"),
    ({"drop_labels": ("2",), "label_map": {"2": 0}}, r"labels \['2'\] are both mapped"),
])
def test_bad_drop_labels(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Dataset("x", CLASSES, 2, "accuracy", ("sentence",), "sentiment", "t.csv", **kwargs)


def test_the_real_sst_files():
    if not (REAL / "ids-sst-train.csv").is_file() or not (REAL / "ids-sst-dev.csv").is_file():
        pytest.skip(f"no SST files under {REAL}")
    splits = load_dataset(get_dataset("sst-binary"), REAL)
    # train rows per label 0..4: 1092 / 2218 / 1624 / 2322 / 1288 (8544); dev: 139 / 289 / 229 / 279 / 165 (1101)
    assert splits.info["dropped_labels"] == {"train": {"2": 1624}, "dev": {"2": 229}}
    assert (len(splits.train), len(splits.dev)) == (8544 - 1624, 1101 - 229) == (6920, 872)
    assert sum(e.label == 0.0 for e in splits.train) == 1092 + 2218
    assert sum(e.label == 1.0 for e in splits.train) == 2322 + 1288
    assert splits.skipped == []
