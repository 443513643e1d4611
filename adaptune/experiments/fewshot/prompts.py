"""Prompt-based classification (LM-BFF, PET): a template with input slots and one answer slot, and a verbalizer
mapping each label to label words. The score of class c is the mean, over c's label words w, of the LM's logit of w
at the answer position: s_c = (1/|W_c|) Σ_{w ∈ W_c} logits[answer, id(w)].

  masked LM (BERT + MLM head)   the answer slot becomes tokenizer.mask_token; answer position = that token
  causal LM (GPT-2, Llama)      the model sees only the text BEFORE the answer slot (text after [MASK] is dropped);
                                answer position = its last token, whose next-token logits score the label words

Templates: "<s1> It was [MASK] ." (one sentence), "<s1> ? [MASK] , <s2>" (a pair). Verbalizers: "terrible,great"
(label i -> i-th entry), "bad|awful,good|great" ('|' separates several words of one label).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ...errors import ConfigError
from ..common.training import takes_logits_to_keep

INPUT_SLOTS = ("<s1>", "<s2>")
ANSWER = "[MASK]"  # the answer slot as written in a template (for masked LMs replaced by tokenizer.mask_token)
_SPLIT = re.compile(r"(<s1>|<s2>|\[MASK\])")
_SLOT_LIKE = re.compile(r"<[^<>\s]+>")
_PAIR = "<s1> ? [MASK] , <s2>"

TEMPLATES: dict[str, tuple[str, str]] = {
    "sst": ("<s1> It was [MASK] .", "terrible,bad,okay,good,great"),
    "sst-binary": ("<s1> It was [MASK] .", "terrible,great"),
    "sst2": ("<s1> It was [MASK] .", "terrible,great"),
    "cfimdb": ("<s1> It was [MASK] .", "terrible,great"),
    "para": ("<s1> [MASK] , <s2>", "No,Yes"),  # label 0 = not a paraphrase
    "qqp": ("<s1> [MASK] , <s2>", "No,Yes"),
    "mrpc": ("<s1> [MASK] , <s2>", "No,Yes"),
    "rte": (_PAIR, "Yes,No"),  # label 0 = entailment
    "qnli": (_PAIR, "Yes,No"),
    "wnli": (_PAIR, "No,Yes"),  # GLUE's WNLI: label 1 = entailment
    "mnli": (_PAIR, "No,Yes,Maybe"),  # contradiction 0, entailment 1, neutral 2
    "cola": ("<s1> This is [MASK] .", "incorrect,correct"),
}


# A causal LM sees no text after the answer slot, so its pair templates put both sentences first.
_SAME = "<s1> <s2> Do they mean the same? [MASK]"
_ENTAILS = "<s1> Question: <s2> True or False? Answer: [MASK]"
CAUSAL_TEMPLATES: dict[str, tuple[str, str]] = {
    "para": (_SAME, "No,Yes"), "qqp": (_SAME, "No,Yes"), "mrpc": (_SAME, "No,Yes"),
    "rte": (_ENTAILS, "True,False"), "qnli": (_ENTAILS, "True,False"), "wnli": (_ENTAILS, "False,True"),
    "mnli": ("<s1> Question: <s2> True, False or Neither? Answer: [MASK]", "False,True,Neither"),
}


def default_prompt(dataset_name: str, causal: bool = False) -> tuple[str, str]:
    """The built-in (template, verbalizer) of a registry dataset, for a causal LM if `causal`."""
    if dataset_name not in TEMPLATES:
        raise ConfigError(f"no built-in prompt for dataset {dataset_name!r}; the datasets with one are "
                          f"{', '.join(sorted(TEMPLATES))} (else give a template and a verbalizer)")
    return CAUSAL_TEMPLATES.get(dataset_name, TEMPLATES[dataset_name]) if causal else TEMPLATES[dataset_name]


@dataclass(frozen=True)
class Template:
    text: str

    def __post_init__(self) -> None:
        text = self.text
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"a template must be a non-empty string such as '<s1> It was [MASK] .', got {text!r}")
        unknown = sorted({s for s in _SLOT_LIKE.findall(text) if s not in INPUT_SLOTS})
        if unknown:
            raise ConfigError(f"template {text!r} has unknown slot(s) {', '.join(unknown)}; the input slots are "
                              f"<s1> and <s2>, the answer slot is {ANSWER}")
        for slot in INPUT_SLOTS:
            if text.count(slot) > 1:
                raise ConfigError(f"template {text!r} has {slot} {text.count(slot)} times; each input slot "
                                  f"appears at most once")
        if "<s1>" not in text:
            got = "<s2> but no <s1>" if "<s2>" in text else "no <s1>"
            raise ConfigError(f"template {text!r} has {got}; a template takes its sentence as <s1> (a pair's "
                              f"second sentence as <s2>)")
        if text.count(ANSWER) != 1:
            raise ConfigError(f"template {text!r} has {text.count(ANSWER)} {ANSWER}; a template has exactly one "
                              f"answer slot {ANSWER}")

    @staticmethod
    def parse(text: str) -> "Template":
        return Template(text)

    @property
    def slots(self) -> int:
        """How many sentences the template takes: 1 (<s1>) or 2 (<s1> and <s2>)."""
        return 2 if "<s2>" in self.text else 1

    def parts(self) -> list[str]:
        """Literal texts and slot markers in order: "<s1> It was [MASK] ." -> ["<s1>", " It was ", "[MASK]", " ."]."""
        return [p for p in _SPLIT.split(self.text) if p]


@dataclass(frozen=True)
class Verbalizer:
    words: tuple[tuple[str, ...], ...]  # per label id, its label words

    def __post_init__(self) -> None:
        if isinstance(self.words, str) or not all(isinstance(w, str) for ws in self.words for w in ws):
            raise ConfigError(f"Verbalizer.words is one tuple of label words (str) per label, got {self.words!r}; "
                              f"to read 'bad|awful,good|great' use Verbalizer.parse(text, n_classes)")
        object.__setattr__(self, "words", tuple(tuple(ws) for ws in self.words))
        owner: dict[str, int] = {}
        v = self._text()
        for label, words in enumerate(self.words):
            if not words or any(not w for w in words):
                raise ConfigError(f"verbalizer {v}: label {label} has an empty word; separate labels by ',' and "
                                  f"the words of one label by '|', e.g. 'bad|awful,good|great'")
            for w in words:
                if any(c.isspace() for c in w):
                    raise ConfigError(f"verbalizer {v}: label word {w!r} contains whitespace; a label word is one "
                                      f"word (one token)")
                if w in owner:
                    where = f"labels {owner[w]} and {label}" if owner[w] != label else f"label {label} twice"
                    raise ConfigError(f"verbalizer {v}: word {w!r} is under {where}; each word names one label once")
                owner[w] = label

    def _text(self) -> str:
        return repr(",".join("|".join(ws) for ws in self.words))

    @staticmethod
    def parse(text: str, n_classes: int) -> "Verbalizer":
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"a verbalizer must be a non-empty string such as 'terrible,great', got {text!r}")
        words = tuple(tuple(w.strip() for w in entry.split("|")) for entry in text.split(","))
        return Verbalizer(words).check(n_classes)

    def check(self, n_classes: int) -> "Verbalizer":
        """Itself, if it has one entry per class."""
        if len(self.words) != n_classes:
            raise ConfigError(f"verbalizer {self._text()} gives {len(self.words)} labels but the dataset has "
                              f"{n_classes} classes; give {n_classes} comma-separated entries, entry i for label id i")
        return self


def _single_token(tokenizer: Any, word: str, text: str) -> int:
    """The id of `text` (word, or ' ' + word), which must be one known token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"label word {word!r} (tokenized as {text!r}) is {pieces} for this tokenizer; each label "
                          f"word must be a single token of the vocabulary: pick another word")
    return ids[0]


def _answer_after_space(template: Template) -> bool:
    """Causal LM: does the answer token carry a leading space? (byte-level BPE puts a space in the next token).
    The model sees only the text before the answer slot, so every input slot must come before it."""
    parts = template.parts()
    before, after = parts[:parts.index(ANSWER)], parts[parts.index(ANSWER) + 1:]
    if not "".join(before).strip():
        raise ConfigError(f"template {template.text!r} starts with the answer slot; a causal LM predicts the answer "
                          f"from the text before it: put <s1> or some text before {ANSWER}")
    late = [s for s in INPUT_SLOTS if s in after]
    if late:
        raise ConfigError(f"template {template.text!r} puts {', '.join(late)} after the answer slot; a causal LM sees "
                          f"only the text before {ANSWER}, so that sentence would be dropped: put every input slot "
                          f"before {ANSWER}, e.g. '<s1> ? <s2> ? {ANSWER}'")
    return before[-1] in INPUT_SLOTS or before[-1][-1].isspace()


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (BERT: [CLS], [SEP])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for s in range(len(full) - len(bare) + 1):
        if full[s:s + len(bare)] == bare:
            return full[:s], full[s + len(bare):]
    return [], []


def _fit(lengths: list[int], room: int) -> list[int]:
    """Sentence lengths cut to sum <= room: one sentence is cut to room; of two, the longer loses a token at a time
    (a tie cuts the second, like transformers' 'longest_first')."""
    if len(lengths) == 1:
        return [min(lengths[0], room)]
    a, b = lengths
    excess = a + b - room
    if excess <= 0:
        return [a, b]
    cut = min(excess, abs(a - b))
    a, b = (a - cut, b) if a > b else (a, b - cut)
    excess -= cut
    return [a - excess // 2, b - (excess - excess // 2)]


@dataclass(frozen=True)
class Prompt:
    """A template + verbalizer bound to one tokenizer and LM kind."""
    template: Template
    verbalizer: Verbalizer
    causal: bool
    label_ids: tuple[tuple[int, ...], ...]  # the token id of every label word, per label
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @staticmethod
    def build(template: str | Template, verbalizer: str | Verbalizer, tokenizer: Any, causal: bool,
              n_classes: int) -> "Prompt":
        template = template if isinstance(template, Template) else Template.parse(template)
        verbalizer = (verbalizer.check(n_classes) if isinstance(verbalizer, Verbalizer)
                      else Verbalizer.parse(verbalizer, n_classes))
        if causal:
            space = " " if _answer_after_space(template) else ""
        elif tokenizer.mask_token is None:
            raise ConfigError("tokenizer has no mask token; a masked-LM template needs one; use a causal LM "
                              "(causal=True) with this tokenizer")
        else:
            space = ""
        label_ids = tuple(tuple(_single_token(tokenizer, w, space + w) for w in ws) for ws in verbalizer.words)
        seen: dict[int, str] = {}
        for ws, ids in zip(verbalizer.words, label_ids):
            for w, i in zip(ws, ids):
                if i in seen:
                    raise ConfigError(f"label words {seen[i]!r} and {w!r} are the same token for this tokenizer; "
                                      f"give words that are different tokens")
                seen[i] = w
        return Prompt(template, verbalizer, bool(causal), label_ids, tokenizer)

    def _plan(self) -> list[tuple]:
        """The template as pieces to concatenate: ("lit", ids), ("mask", [mask id]) or ("slot", index, leading
        whitespace). A literal's trailing whitespace goes with the sentence after it (byte-level BPE: a space begins
        the next token) and is dropped before the answer slot (causal: it is the answer token's; masked: mask
        tokens absorb it, like RoBERTa's lstrip <mask>); causal: the pieces end before the answer slot."""
        parts = self.template.parts()
        if self.causal:
            parts = parts[:parts.index(ANSWER)]
            parts[-1] = parts[-1] if parts[-1] in INPUT_SLOTS else parts[-1].rstrip()
        plan: list[tuple] = []
        for i, part in enumerate(parts):
            nxt = parts[i + 1] if i + 1 < len(parts) else None
            if part in INPUT_SLOTS:
                prev = parts[i - 1] if i else ""
                lead = "" if prev in INPUT_SLOTS + (ANSWER,) else prev[len(prev.rstrip()):]
                plan.append(("slot", INPUT_SLOTS.index(part), lead))
            elif part == ANSWER:
                plan.append(("mask", [self.tokenizer.mask_token_id]))
            elif text := (part.rstrip() if nxt in INPUT_SLOTS + (ANSWER,) else part):
                plan.append(("lit", self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return plan

    def _sentences(self, example: Any) -> list[str]:
        b = getattr(example, "b", None)
        if self.template.slots == 1 and b is not None:
            raise ConfigError(f"template {self.template.text!r} takes one sentence, dataset has pairs; use a "
                              f"template with <s1> and <s2>, such as {_PAIR!r}")
        if self.template.slots == 2 and b is None:
            raise ConfigError(f"template {self.template.text!r} takes two sentences (<s1>, <s2>), dataset has single "
                              f"sentences; use a template with <s1> only, such as '<s1> It was [MASK] .'")
        return [example.a.strip()] + ([b.strip()] if self.template.slots == 2 else [])

    def _ids(self, example: Any, plan: list[tuple], room: int) -> tuple[list[int], int]:
        """One example's token ids (no special tokens) and the index of its answer token among them."""
        leads = {p[1]: p[2] for p in plan if p[0] == "slot"}
        sents = [self.tokenizer(leads[i] + s, add_special_tokens=False)["input_ids"] if s else []
                 for i, s in enumerate(self._sentences(example))]
        keep = _fit([len(s) for s in sents], room)
        ids: list[int] = []
        answer = -1
        for p in plan:
            answer = len(ids) if p[0] == "mask" else answer
            ids += sents[p[1]][:keep[p[1]]] if p[0] == "slot" else p[1]
        return ids, (len(ids) - 1 if self.causal else answer)

    def encode(self, examples: Sequence[Any], max_length: int) -> dict[str, torch.Tensor]:
        """Token ids of the filled templates, right-padded. Only the sentences are truncated (to fit max_length with
        the template's tokens and the special tokens; of two, the longer is cut first). Returns input_ids and
        attention_mask (B, T), token_type_ids (B, T) zeros where the tokenizer uses them, and answer (B,): the
        [MASK] position (masked LM) or the last token's (causal LM; special tokens after the text are left out)."""
        if not examples:
            raise ConfigError("encode needs at least one example; got none")
        tok = self.tokenizer
        before, after = _specials(tok)
        after = [] if self.causal else after
        plan = self._plan()
        fixed = len(before) + len(after) + sum(len(p[1]) for p in plan if p[0] != "slot")
        if max_length - fixed < self.template.slots:
            raise ConfigError(f"template {self.template.text!r} takes {fixed} tokens (with special tokens), leaving "
                              f"no room for its {self.template.slots} sentence(s) in max_length={max_length}; give "
                              f"max_length >= {fixed + self.template.slots} or a shorter template")
        rows, answers = [], []
        for e in examples:
            ids, answer = self._ids(e, plan, max_length - fixed)
            rows.append(before + ids + after)
            answers.append(len(before) + answer)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ConfigError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)  # (B, T)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # (B, T)
        batch = {"input_ids": input_ids, "attention_mask": mask, "answer": torch.tensor(answers, dtype=torch.long)}
        if "token_type_ids" in tok.model_input_names:
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        return batch

    def class_logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C) class scores s_c = mean over c's label words w of logits[b, answer_b, id(w)].

        Positions are counted from the end (answer - T < 0), so components that prepend positions (prompt tuning's
        soft tokens: logits (B, P+T, V)) are read right. Where model.forward takes `logits_to_keep`, only the answer
        rows are projected to the vocabulary."""
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)  # (B, T)
        B, T = ids.shape
        back = batch["answer"].to(device) - T  # (B,) negative positions from the end
        kw = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        keep = torch.unique(back)  # (K,) sorted
        if takes_logits_to_keep(model):
            kw["logits_to_keep"] = keep
        logits = model(**kw).logits  # (B, L, V), or (B, K, V) when logits_to_keep was honoured
        rows = torch.arange(B, device=device)
        if "logits_to_keep" in kw and logits.shape[1] == keep.numel():
            picked = logits[rows, torch.searchsorted(keep, back)]  # (B, V)
        else:
            picked = logits[rows, back]  # (B, V)
        flat = torch.tensor([i for ids_c in self.label_ids for i in ids_c], device=device)  # (K_w,)
        average = torch.zeros(len(self.label_ids), flat.numel(), device=device)  # (C, K_w)
        j = 0
        for c, ids_c in enumerate(self.label_ids):
            average[c, j:j + len(ids_c)] = 1.0 / len(ids_c)
            j += len(ids_c)
        return picked[:, flat].float() @ average.T  # (B, C)
