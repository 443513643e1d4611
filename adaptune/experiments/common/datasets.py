"""The datasets registry: the data an experiment can train on, with the files, columns, head size,
loss and metric of each (a dataset is data; an adaptune task is a named set of components).

Covers the CS224N multitask data (sst, para, sts, cfimdb; tab-separated, header row, first column
an index) and standard GLUE directories (SST-2/, STS-B/, MRPC/, QQP/, CoLA/, RTE/, WNLI/, QNLI/,
MNLI/, each with train.tsv and dev.tsv, MNLI dev_matched.tsv). Paths are relative to the data
directory; a dataset's own folder works too (data.find). Adding a dataset is one line in DATASETS.

A dataset may relabel and drop classes of another one's files: `label_map` maps raw label strings to
class ids (matched before a label is read as a number) and rows whose raw label is in `drop_labels` are
left out (not examples, not skipped rows; counted in load_dataset's info["dropped_labels"]). `sst-binary`
(alias `sstb`) is SST-2-style binary sentiment read from the SST-5 files: 0-1 -> 0, 3-4 -> 1, 2 dropped.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field

from ...errors import ConfigError

# kinds: what the head outputs and which loss trains it
CLASSES = "classes"  # n_out logits, cross entropy, prediction argmax
BINARY = "binary"  # one logit, binary cross entropy (with logits), prediction logit > 0
REGRESSION = "regression"  # one output, mean squared error, prediction the output itself

LOSSES = {CLASSES: "cross_entropy", BINARY: "bce_with_logits", REGRESSION: "mse"}


@dataclass(frozen=True)
class Dataset:
    """One dataset: where its files are, which columns hold text and label, what the head predicts."""
    name: str
    kind: str
    n_out: int  # head outputs: classes for CLASSES, 1 otherwise
    metric: str  # accuracy | pearson | matthews | f1 (multitask/metrics.py)
    text: tuple  # one column (single sentence) or two (a pair, cross-encoded); names, or indices when header=False
    label: str | int
    train: str
    dev: str | None = None  # None: `train` is split into train/dev (see data.split)
    header: bool = True
    quoting: int = csv.QUOTE_MINIMAL  # GLUE's .tsv files are read with QUOTE_NONE
    label_map: dict = field(default_factory=dict)  # string labels -> class ids (RTE)
    label_range: tuple[float, float] | None = None  # allowed range of a regression label
    description: str = ""
    drop_labels: tuple[str, ...] = ()  # raw labels whose rows are left out (SST's neutral "2" for sst-binary)

    def __post_init__(self) -> None:
        if isinstance(self.drop_labels, str) or not all(isinstance(x, str) and x and x == x.strip()
                                                        for x in self.drop_labels):
            raise ConfigError(f"dataset {self.name!r}: drop_labels must be a tuple of non-empty raw label strings "
                              f"without surrounding spaces, e.g. ('2',); got {self.drop_labels!r}")
        both = sorted(set(self.drop_labels) & set(self.label_map))
        if both:
            raise ConfigError(f"dataset {self.name!r}: labels {both} are both mapped (label_map) and dropped "
                              f"(drop_labels); a raw label is one or the other")

    @property
    def loss(self) -> str:
        return LOSSES[self.kind]

    @property
    def pair(self) -> bool:
        return len(self.text) == 2

    @property
    def files(self) -> list[str]:
        return [self.train] + ([self.dev] if self.dev else [])


_NONE = csv.QUOTE_NONE
DATASETS: dict[str, Dataset] = {d.name: d for d in [
    # CS224N minBERT multitask data (seeds 002, 004)
    Dataset("sst", CLASSES, 5, "accuracy", ("sentence",), "sentiment", "ids-sst-train.csv", "ids-sst-dev.csv",
                description="SST-5 sentiment, 5 classes"),
    Dataset("para", BINARY, 1, "accuracy", ("sentence1", "sentence2"), "is_duplicate", "quora-dev.csv", None,
                description="Quora paraphrase (quora-dev.csv split into train/dev)"),
    Dataset("sts", REGRESSION, 1, "pearson", ("sentence1", "sentence2"), "similarity", "sts-train.csv",
                "sts-dev.csv", label_range=(0.0, 5.0), description="STS similarity 0..5, Pearson r"),
    Dataset("cfimdb", CLASSES, 2, "accuracy", ("sentence",), "sentiment", "ids-cfimdb-train.csv",
                "ids-cfimdb-dev.csv", description="CFIMDB movie-review polarity"),
    Dataset("sst-binary", CLASSES, 2, "accuracy", ("sentence",), "sentiment", "ids-sst-train.csv", "ids-sst-dev.csv",
                label_map={"0": 0, "1": 0, "3": 1, "4": 1}, drop_labels=("2",),
                description="SST-2-style binary sentiment from SST-5: 0-1 negative, 3-4 positive, 2 (neutral) left out"),
    # standard GLUE directories
    Dataset("sst2", CLASSES, 2, "accuracy", ("sentence",), "label", "SST-2/train.tsv", "SST-2/dev.tsv",
                quoting=_NONE),
    Dataset("stsb", REGRESSION, 1, "pearson", ("sentence1", "sentence2"), "score", "STS-B/train.tsv",
                "STS-B/dev.tsv", quoting=_NONE, label_range=(0.0, 5.0)),
    Dataset("mrpc", BINARY, 1, "accuracy", ("#1 String", "#2 String"), "Quality", "MRPC/train.tsv", "MRPC/dev.tsv",
                quoting=_NONE),
    Dataset("qqp", BINARY, 1, "accuracy", ("question1", "question2"), "is_duplicate", "QQP/train.tsv",
                "QQP/dev.tsv", quoting=_NONE),
    Dataset("cola", CLASSES, 2, "matthews", (3,), 1, "CoLA/train.tsv", "CoLA/dev.tsv", header=False, quoting=_NONE),
    Dataset("rte", CLASSES, 2, "accuracy", ("sentence1", "sentence2"), "label", "RTE/train.tsv", "RTE/dev.tsv",
                quoting=_NONE, label_map={"entailment": 0, "not_entailment": 1}),
    Dataset("wnli", CLASSES, 2, "accuracy", ("sentence1", "sentence2"), "label", "WNLI/train.tsv", "WNLI/dev.tsv",
                quoting=_NONE),
    Dataset("qnli", CLASSES, 2, "accuracy", ("question", "sentence"), "label", "QNLI/train.tsv", "QNLI/dev.tsv",
                quoting=_NONE, label_map={"entailment": 0, "not_entailment": 1}),
    Dataset("mnli", CLASSES, 3, "accuracy", ("sentence1", "sentence2"), "gold_label", "MNLI/train.tsv",
                "MNLI/dev_matched.tsv", quoting=_NONE, label_map={"contradiction": 0, "entailment": 1, "neutral": 2}),
]}

DEFAULT_DATASETS = ("sst", "para", "sts")  # seed 004's three datasets


ALIASES = {"quora": "para", "paraphrase": "para", "sst5": "sst", "sts-b": "stsb", "sstb": "sst-binary"}


def get_dataset(name: str) -> Dataset:
    """The registered dataset called `name` (or one of its ALIASES)."""
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def parse_datasets(text: str | list[str]) -> list[Dataset]:
    """'sst,para,sts' -> their Datasets (order kept, duplicates refused)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ConfigError(f"give at least one dataset; known: {', '.join(DATASETS)}")
    names = [ALIASES.get(n, n) for n in names]
    if len(set(names)) != len(names):
        raise ConfigError(f"dataset listed twice in {names}")
    return [get_dataset(n) for n in names]
