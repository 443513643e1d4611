"""The language-modelling corpora of `adaptune run vae` (Yelp, PTB, WikiText-2) in train/valid/test
splits, and the collate that turns sentences into a causal LM's inputs.

Only dev/test-like files of these corpora are available (../shared/data/lm, see its README), so the
splits are defined here, deterministically, from the text alone. A sentence (one line, stripped) is dealt
into a bucket by its text, so equal sentences always land together:

    bucket(s, n) = int.from_bytes(sha256(s.encode("utf-8")).digest()[:8], "big") % n

  corpus     split  files                                rule                    sentences
  yelp       train  yelp/sentiment.test.{0,1}            all but held-out texts  113,320 (of 126,670)
             valid  yelp/sentiment.dev.{0,1}             bucket(s, 2) == 0        31,784
             test   yelp/sentiment.dev.{0,1}             bucket(s, 2) == 1        31,699
  ptb        train  ptb/ptb.valid.txt                    bucket(s, 10) != 0        3,019
             valid  ptb/ptb.valid.txt                    bucket(s, 10) == 0          323
             test   ptb/ptb.test.txt                     all of it (PTB's test)    3,761
  wikitext2  train  wikitext-2/valid.txt                 bucket(s, 10) != 0        7,230
             valid  wikitext-2/valid.txt                 bucket(s, 10) == 0          796
             test   wikitext-2/test.txt                  all of it                 9,408

Held-out text never trains: a train sentence whose text also occurs in valid or test is dropped from
train (Yelp: 13,350 lines, of 2,884 distinct sentences that its dev and test files share; PTB: 21;
WikiText-2: 106), and a valid sentence that occurs in test is dropped from valid (PTB 7, WikiText-2 1),
so the three splits are disjoint as texts, not only as lines.
Yelp keeps each sentence's label (file .0: 0, negative; .1: 1, positive), files .0 then .1 in line order
(train 46,829 / 66,491, valid 12,620 / 19,164, test 12,658 / 19,041 negative / positive).
WikiText-2 is raw text: blank lines and headings (' = Title = ', ' = = Section = = ') are dropped and
each paragraph is split into sentences after a ' . ', ' ? ' or ' ! ' token. Empty lines are dropped
everywhere; duplicates within a split are kept.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ...errors import ConfigError
from ..common.data import default_data_dir, find, subset
from ..common.errors import DataError

SHARED_LM = "../shared/data/lm"  # the corpora's folder without a data_dir or $ADAPTUNE_LM_DATA
SPLITS = ("train", "valid", "test")
MAX_LENGTH = 32  # tokens per sentence, BOS and EOS included (the seed paper's length)


@dataclass(frozen=True)
class Part:
    """Where one split's sentences come from: the files, and which of `of` hash buckets it keeps."""
    files: tuple[str, ...]
    of: int = 1
    keep: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Corpus:
    """One corpus: its folder under the data directory, how to read a file, its three splits."""
    name: str
    folder: str
    splits: dict[str, Part]
    labels: dict[str, int] = field(default_factory=dict)  # file name -> class of its sentences
    raw: bool = False  # WikiText's raw text: headings dropped, paragraphs split into sentences
    description: str = ""

    @property
    def files(self) -> list[str]:  # every file it reads (data.find names them in its errors)
        return sorted({f"{self.folder}/{f}" for p in self.splits.values() for f in p.files})


_YELP = tuple(f"sentiment.{s}.{c}" for s in ("test", "dev") for c in (0, 1))
CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("yelp", "yelp", {"train": Part(_YELP[:2]), "valid": Part(_YELP[2:], 2, (0,)),
                            "test": Part(_YELP[2:], 2, (1,))},
           labels={f: int(f[-1]) for f in _YELP}, description="Yelp review sentences, 0 negative / 1 positive"),
    Corpus("ptb", "ptb", {"train": Part(("ptb.valid.txt",), 10, tuple(range(1, 10))),
                          "valid": Part(("ptb.valid.txt",), 10, (0,)), "test": Part(("ptb.test.txt",))},
           description="Penn Treebank (Mikolov), test = ptb.test.txt"),
    Corpus("wikitext2", "wikitext-2", {"train": Part(("valid.txt",), 10, tuple(range(1, 10))),
                                       "valid": Part(("valid.txt",), 10, (0,)), "test": Part(("test.txt",))},
           raw=True, description="WikiText-2 raw sentences, test = test.txt"),
]}


@dataclass
class Sentences:
    """One split of a corpus: its texts, their labels (None where the corpus has none), what was read."""
    corpus: str
    split: str
    texts: list[str]
    labels: list[int] | None
    info: dict = field(default_factory=dict)  # files, rule, sizes: for a run's results

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str | tuple[str, int]:
        """A text, or (text, label) where the corpus has labels (the collate takes either)."""
        return self.texts[i] if self.labels is None else (self.texts[i], self.labels[i])


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    return CORPORA[name]


def default_lm_dir() -> Path:
    """$ADAPTUNE_LM_DATA, else SHARED_LM (from the working directory, then from the repository)."""
    holds = "yelp/, ptb/ and wikitext-2/ (" + ", ".join(f for c in CORPORA.values() for f in c.files) + ")"
    return default_data_dir(SHARED_LM, "ADAPTUNE_LM_DATA", holds)


def bucket(text: str, n: int) -> int:
    """The hash bucket (0..n-1) of a sentence: the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % n


_HEADING = re.compile(r"(= )+.*?( =)+")  # ' = Title = ', ' = = Section = = '
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")  # a space after a ' . ' token


def sentences_of(text: str, raw: bool) -> list[str]:
    """The sentences of a file's text: one per non-empty line, or (raw) split out of paragraphs."""
    lines = [s.strip() for s in text.splitlines()]
    if not raw:
        return [s for s in lines if s]
    return [s for line in lines if line and not _HEADING.fullmatch(line) for s in _SENTENCE_END.split(line)]


@lru_cache(maxsize=16)
def _read(path: Path, raw: bool, mtime: float) -> tuple[str, ...]:
    try:
        return tuple(sentences_of(path.read_text(encoding="utf-8"), raw))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _part(corpus: Corpus, part: Part, data_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, paths) of one part: its files' sentences in the kept buckets, in file order."""
    texts: list[str] = []
    labels: list[int] = []
    paths = []
    for name in part.files:
        path = find(data_dir, f"{corpus.folder}/{name}", corpus)  # type: ignore[arg-type]  # name + files
        paths.append(str(path))
        for s in _read(path, corpus.raw, path.stat().st_mtime):
            if part.of == 1 or bucket(s, part.of) in part.keep:
                texts.append(s)
                labels.append(corpus.labels.get(name, -1))
    return texts, labels, paths


def load_corpus(name: str, split: str, data_dir: str | Path | None = None, limit: int | None = None,
                seed: int = 0) -> Sentences:
    """The sentences (and labels) of one split of a corpus; `limit` takes a seeded sample of at most
    that many, kept in file order. data_dir: the folder holding yelp/, ptb/, wikitext-2/ (or a corpus's
    own folder); default $ADAPTUNE_LM_DATA, else ../shared/data/lm."""
    corpus = get_corpus(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} of corpus {name!r}; known: {', '.join(SPLITS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_lm_dir()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory (corpus {name!r} reads {', '.join(corpus.files)})")
    texts, labels, paths = _part(corpus, corpus.splits[split], data_dir)
    later = SPLITS[SPLITS.index(split) + 1:]  # train gives way to valid and test, valid to test
    held = {s for other in later for s in _part(corpus, corpus.splits[other], data_dir)[0]}
    kept = [i for i, s in enumerate(texts) if s not in held]
    if not kept:
        raise DataError(f"corpus {name!r} split {split!r} is empty: no sentences in {', '.join(paths)}"
                        + (f" outside {' and '.join(later)}" if texts else ""))
    part = corpus.splits[split]
    info = {"corpus": name, "split": split, "files": paths, "read": len(texts),
            "dropped_held_out": len(texts) - len(kept),
            "rule": "all" if part.of == 1 else f"sha256 bucket(s, {part.of}) in {list(part.keep)}"}
    if limit is not None:
        kept = subset(kept, limit, seed)
    info["used"] = len(kept)
    return Sentences(name, split, [texts[i] for i in kept], [labels[i] for i in kept] if corpus.labels else None,
                     info)


@dataclass
class Collate:
    """Sentences -> a causal LM's batch: BOS + tokens + EOS, truncated to max_length tokens (BOS and EOS
    kept), right-padded with the tokenizer's pad id (its EOS where it has none).

      input_ids, attention_mask   (B, T)
      labels                      (B, T) input_ids with -100 on padding (the model shifts them)
      n_tokens                    (B,) BPE tokens with BOS and EOS: the count Optimus divides by
      n_scored                    (B,) tokens predicted, those after BOS: n_tokens - 1
      classes                     (B,) labels, when the items are (text, label) pairs
    """
    tokenizer: Any
    max_length: int = MAX_LENGTH

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (BOS and EOS), got {self.max_length}")
        tok = self.tokenizer
        self.eos = tok.eos_token_id
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else self.eos
        if self.eos is None or self.bos is None:
            raise ConfigError("the tokenizer has no EOS token (nor BOS); a sentence needs both ends marked")
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids: BOS, at most max_length - 2 of its tokens, EOS."""
        body = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return [[self.bos, *b[: self.max_length - 2], self.eos] for b in body]

    def __call__(self, items: Sequence[str | tuple[str, int]]) -> dict:
        import torch

        pairs = bool(items) and not isinstance(items[0], str)
        texts = [x[0] for x in items] if pairs else list(items)
        rows = self.ids(texts)  # type: ignore[arg-type]
        if not rows:
            raise DataError("an empty batch: give the collate at least one sentence")
        n = torch.tensor([len(r) for r in rows])
        input_ids = torch.full((len(rows), int(n.max())), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
        mask = (torch.arange(input_ids.shape[1])[None, :] < n[:, None]).long()  # by length: pad may be EOS
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100),
                 "n_tokens": n, "n_scored": n - 1}
        if pairs:
            batch["classes"] = torch.tensor([int(x[1]) for x in items])  # type: ignore[index]
        return batch


def length_grouped(texts: Sequence[str], batch_size: int, collate: Collate, seed: int,
                   pool: int = 50) -> Iterator[dict]:
    """Shuffled training batches, endlessly (each pass a new seeded order, the last partial batch dropped);
    within each pool of `pool` batches the sentences are grouped by length, so little of a batch is padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = [len(r) for r in collate.ids(texts)]
    while True:
        order = torch.randperm(len(texts), generator=g).tolist()
        for p in range(0, len(order) - batch_size + 1, batch_size * pool):
            chunk = sorted(order[p:p + batch_size * pool], key=lambda i: lengths[i])
            groups = [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
            for k in torch.randperm(len(groups), generator=g).tolist():
                yield collate([texts[j] for j in groups[k]])


def by_length(texts: Sequence[str], batch_size: int, collate: Collate) -> list[dict]:
    """Evaluation batches covering every text once, shortest first (sums over sentences do not depend on
    the order; batches of like lengths carry little padding)."""
    lengths = [len(r) for r in collate.ids(texts)]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [collate([texts[j] for j in order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]


def on_device(batches: Iterable[dict], device: Any) -> Iterator[dict]:
    """Each batch's tensors moved to `device`, batch by batch (lazily: `batches` may be endless)."""
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


MODEL_INPUTS = ("input_ids", "attention_mask", "labels")  # the keys a causal LM's forward takes
