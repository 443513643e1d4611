"""EDA, easy data augmentation (Wei and Zou 2019; seed 002): random insertion, swap and deletion,
plus synonym replacement when a synonym list is given. Seeded: the same rng gives the same output.

Synonym list file: one entry per line, `word<TAB or space>syn1,syn2,...` (commas or spaces); '#'
starts a comment. Without a list, random insertion inserts a copy of a word from the sentence itself.
"""
from __future__ import annotations

import random
from pathlib import Path

from ..common.errors import DataError


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such synonym list")
    try:
        content = path.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    table: dict[str, list[str]] = {}
    for n, raw in enumerate(content.splitlines(), 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.replace(",", " ").split()
        if len(parts) < 2:
            raise DataError(f"{path}:{n}: expected 'word syn1,syn2,...', found {raw!r}")
        table.setdefault(parts[0].lower(), []).extend(p for p in parts[1:] if p.lower() != parts[0].lower())
    return table


def _replace(words: list[str], n: int, rng: random.Random, synonyms: dict[str, list[str]]) -> list[str]:
    out = list(words)
    candidates = [i for i, w in enumerate(out) if synonyms.get(w.lower())]
    rng.shuffle(candidates)
    for i in candidates[:n]:
        out[i] = rng.choice(synonyms[out[i].lower()])
    return out


def _insert(words: list[str], n: int, rng: random.Random, synonyms: dict[str, list[str]] | None) -> list[str]:
    out = list(words)
    for _ in range(n):
        word = rng.choice(words)
        if synonyms and synonyms.get(word.lower()):
            word = rng.choice(synonyms[word.lower()])
        out.insert(rng.randint(0, len(out)), word)
    return out


def _swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(n):
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    return out


def _delete(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def eda(sentence: str, rng: random.Random, alpha: float = 0.1,
        synonyms: dict[str, list[str]] | None = None) -> str:
    """One augmented copy of `sentence`: one operation, chosen at random among those available,
    changing about alpha·len(words) words (at least one)."""
    words = sentence.split()
    if not words:
        return sentence
    n = max(1, int(alpha * len(words)))
    ops = ["insert", "swap", "delete"] + (["synonym"] if synonyms else [])
    op = rng.choice(ops)
    if op == "synonym":
        out = _replace(words, n, rng, synonyms or {})
    elif op == "insert":
        out = _insert(words, n, rng, synonyms)
    elif op == "swap":
        out = _swap(words, n, rng)
    else:
        out = _delete(words, alpha, rng)
    return " ".join(out)


def augment(examples: list, n_aug: int, seed: int, alpha: float = 0.1,
            synonyms: dict[str, list[str]] | None = None) -> list:
    """The examples followed by n_aug augmented copies of each (both sentences of a pair augmented)."""
    from ..common.data import Example

    rng = random.Random(seed)
    extra = [Example(eda(e.a, rng, alpha, synonyms), eda(e.b, rng, alpha, synonyms) if e.b is not None else None, e.label)
             for _ in range(n_aug) for e in examples]
    return list(examples) + extra
