"""Reading experiment data: csv parsing, skipped and malformed rows, the Quora split, GLUE layouts, EDA."""
import random

import pytest

from adaptune.errors import AdaptuneError
from adaptune.experiments.common.data import load_dataset, read_file, split, subset
from adaptune.experiments.common.datasets import get_dataset, parse_datasets
from adaptune.experiments.common.errors import DataError
from adaptune.experiments.multitask.eda import augment, eda, load_synonyms

SST_HEAD = "\tid\tsentence\tsentiment\n"
PAIR_HEAD = "\tid\tsentence1\tsentence2\tis_duplicate\n"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_quoted_fields_tabs_and_blank_rows(tmp_path):
    f = write(tmp_path / "s.csv", SST_HEAD + '0\ta\t"He said ""hi""\tthere"\t3\n\n1\tb\t plain text \t0\n')
    ex, skipped = read_file(f, get_dataset("sst"))
    assert [(e.a, e.label) for e in ex] == [('He said "hi"\tthere', 3.0), ("plain text", 0.0)]
    assert ex[0].b is None and [e.line for e in ex] == [2, 4]
    assert skipped == [f"{f}:3: blank row"]


def test_missing_label_is_skipped_and_reported(tmp_path):
    f = write(tmp_path / "q.csv", PAIR_HEAD + "0\ta\tx?\ty?\t1.0\n1\tb\tx?\ty?\t\n2\tc\tu?\tv?\t0.0\n")
    ex, skipped = read_file(f, get_dataset("para"))
    assert [e.label for e in ex] == [1.0, 0.0] and ex[0].b == "y?"
    assert skipped == [f"{f}:3: empty label"]


@pytest.mark.parametrize("body, line, problem", [
    ("0\ta\tgood\t3\n1\ttoo few\n", 3, "expected at least 4 tab-separated fields, got 2"),
    ("0\ta\tgood\t3\n1\tb\tbad label\tfive\n", 3, "label 'five' is not a number"),
    ("0\ta\tgood\t3\n\n1\tb\tout of range\t7\n", 4, "not a class id in 0..4"),
    ("0\ta\tgood\t2.5\n", 2, "not a class id"),
])
def test_malformed_rows_name_file_and_line(tmp_path, body, line, problem):
    f = write(tmp_path / "bad.csv", SST_HEAD + body)
    with pytest.raises(DataError, match=problem) as e:
        read_file(f, get_dataset("sst"))
    assert f"{f}:{line}:" in str(e.value)
    assert isinstance(e.value, AdaptuneError) and isinstance(e.value, ValueError)


def test_a_field_spanning_lines_is_refused_where_its_quote_opened(tmp_path):
    f = write(tmp_path / "m.csv", SST_HEAD + '0\ta\t"tab\tinside"\t1\n1\tb\t"two\nlines"\t1\n')
    with pytest.raises(DataError, match=r"m\.csv:3: a quoted field opened on this line runs on to line 4"):
        read_file(f, get_dataset("sst"))


def test_header_missing_column(tmp_path):
    f = write(tmp_path / "h.csv", "\tid\ttext\tsentiment\n0\ta\tx\t1\n")
    with pytest.raises(DataError, match=r"h\.csv:1: no column 'sentence' in the header"):
        read_file(f, get_dataset("sst"))


def test_missing_files_name_what_is_expected(tmp_path):
    for dataset, name in (("sst", "ids-sst-train.csv"), ("para", "quora-dev.csv")):
        with pytest.raises(DataError) as e:
            load_dataset(get_dataset(dataset), tmp_path)
        assert name in str(e.value) and "--data-dir" in str(e.value)
    assert [t.name for t in parse_datasets("sst,para")] == ["sst", "para"]


def test_regression_label_range(tmp_path):
    f = write(tmp_path / "sts.csv", "\tid\tsentence1\tsentence2\tsimilarity\n0\ta\tx\ty\t5.5\n")
    with pytest.raises(DataError, match=r"sts\.csv:2: score '5.5' is outside 0.0..5.0"):
        read_file(f, get_dataset("sts"))


def test_quora_split_is_deterministic_disjoint_and_recorded(tmp_path):
    rows = "".join(f"{i}\tid{i}\tq{i} a?\tq{i} b?\t{i % 2}.0\n" for i in range(50))
    write(tmp_path / "quora-dev.csv", PAIR_HEAD + rows)
    a = load_dataset(get_dataset("para"), tmp_path, seed=3, split_ratio=0.8)
    b = load_dataset(get_dataset("para"), tmp_path, seed=3, split_ratio=0.8)
    c = load_dataset(get_dataset("para"), tmp_path, seed=4, split_ratio=0.8)
    assert a.train == b.train and a.dev == b.dev
    assert a.train != c.train
    assert len(a.train) == 40 and len(a.dev) == 10
    assert {e.a for e in a.train}.isdisjoint({e.a for e in a.dev})
    assert a.info["split"]["seed"] == 3 and a.info["split"]["train_ratio"] == 0.8


def test_split_and_subset_are_seeded():
    items = list(range(100))
    assert split(items, 0.7, 1) == split(items, 0.7, 1)
    tr, dv = split(items, 0.7, 1)
    assert sorted(tr + dv) == items and len(tr) == 70
    assert subset(items, 10, 5) == subset(items, 10, 5) and len(subset(items, 10, 5)) == 10
    assert subset(items, None, 5) == items
    with pytest.raises(DataError):
        split(items, 1.0, 0)


def test_glue_layouts(tmp_path):
    (tmp_path / "CoLA").mkdir()
    write(tmp_path / "CoLA/train.tsv", "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                                      "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n")
    ex, _ = read_file(tmp_path / "CoLA/train.tsv", get_dataset("cola"))
    assert [e.label for e in ex] == [1.0, 0.0] and ex[0].a.startswith("The sailors")
    (tmp_path / "RTE").mkdir()
    write(tmp_path / "RTE/dev.tsv", 'index\tsentence1\tsentence2\tlabel\n0\tA "quoted\tB\tnot_entailment\n'
                                    '1\tC\tD\tentailment\n2\tE\tF\tmaybe\n')
    with pytest.raises(DataError, match=r"dev\.tsv:4: label 'maybe' is not one of"):
        read_file(tmp_path / "RTE/dev.tsv", get_dataset("rte"))


def test_eda_is_seeded_and_changes_words():
    s = "the quick brown fox jumps over the lazy dog"
    assert eda(s, random.Random(0)) == eda(s, random.Random(0))
    outs = {eda(s, random.Random(i)) for i in range(20)}
    assert len(outs) > 3  # different seeds, different edits
    for out in outs:  # insertion, swap and deletion keep only words of the sentence
        assert set(out.split()) <= set(s.split())


def test_eda_synonyms(tmp_path):
    f = write(tmp_path / "syn.txt", "# synonyms\nquick fast,speedy\ndog hound\n")
    table = load_synonyms(f)
    assert table == {"quick": ["fast", "speedy"], "dog": ["hound"]}
    outs = {eda("quick dog", random.Random(i), synonyms=table) for i in range(40)}
    assert any(w in o.split() for o in outs for w in ("fast", "speedy", "hound"))
    write(tmp_path / "bad.txt", "lonely\n")
    with pytest.raises(DataError, match=r"bad\.txt:1"):
        load_synonyms(tmp_path / "bad.txt")


def test_augment_appends_copies_with_labels():
    from adaptune.experiments.common.data import Example
    ex = [Example("a b c d", "e f g", 1.0), Example("h i j", "k l", 0.0)]
    out = augment(ex, 2, seed=0)
    assert out[:2] == ex and len(out) == 6
    assert [e.label for e in out[2:]] == [1.0, 0.0, 1.0, 0.0] and all(e.b is not None for e in out)
    assert augment(ex, 2, seed=0) == out


def test_real_cs224n_files_parse():
    from adaptune.experiments.common.data import default_data_dir
    try:
        root = default_data_dir()
    except DataError:
        pytest.skip("../shared/data/cs224n is not here")
    if not (root / "quora-dev.csv").is_file():
        pytest.skip("../shared/data/cs224n is not here")
    sst = load_dataset(get_dataset("sst"), root)
    assert (len(sst.train), len(sst.dev)) == (8544, 1101) and {e.label for e in sst.dev} == {0.0, 1.0, 2.0, 3.0, 4.0}
    para = load_dataset(get_dataset("para"), root, seed=0, split_ratio=0.8)
    assert len(para.train) + len(para.dev) == 20212 and len(para.skipped) == 2  # 20214 rows, 2 without a label
    assert all(s.endswith("empty label") for s in para.skipped)
    sts = load_dataset(get_dataset("sts"), root)
    assert (len(sts.train), len(sts.dev)) == (6040, 863) and sts.train[0].b is not None
