"""What the experiments' training shares: mean-pooled encoding (Encoder, for the multitask runs and the few-shot
head mode), the linear warm-up and decay schedule, the dev batch size.

Pooling: the mean of the last hidden states over real tokens (attention mask 1). With prompt
tuning the model's outputs carry the soft-prompt positions in front; they are dropped, so the mean
is over the input's own tokens only. Sentence pairs are cross-encoded: tokenizer(s1, s2).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

EVAL_BATCH = 64  # dev batches (no gradients): larger than training batches


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Causal LMs of transformers >= 4.50 (GPT-2, Llama) take `logits_to_keep`, also as a 1-D tensor of positions:
    only those rows are projected to the vocabulary."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class Encoder:
    """Tokenize, run the (adapted) model, mean-pool over real tokens: (B, d)."""

    def __init__(self, model: nn.Module, tok: Any, max_length: int, device: torch.device | str = "cpu") -> None:
        self.model, self.tok, self.max_length, self.device = model, tok, max_length, torch.device(device)
        self.lm = getattr(model, "lm_head", None) is not None  # an LM-head model: read hidden_states
        # pooling reads no logits: project one row, not (B, T, V) (1.6 GB for 64 x 128 tokens of a 49k vocabulary)
        self.keep = {"logits_to_keep": 1} if self.lm and takes_logits_to_keep(model) else {}
        self.types = getattr(model.config, "type_vocab_size", 0) > 0

    def tokenize(self, examples: list) -> dict[str, torch.Tensor]:
        a = [e.a for e in examples]
        pairs = [e.b is not None for e in examples]
        if any(pairs) and not all(pairs):  # a mixed batch of sentences and pairs: each encoded, then padded
            each = [self.tok(e.a, e.b, truncation=True, max_length=self.max_length) for e in examples]
            return self.tok.pad(each, padding=True, return_tensors="pt")
        b = [e.b for e in examples] if pairs[0] else None
        return self.tok(a, b, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def __call__(self, examples: list) -> torch.Tensor:
        batch = self.tokenize(examples)
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.types and "token_type_ids" in batch:
            kw["token_type_ids"] = batch["token_type_ids"]
        kw = {k: v.to(self.device) for k, v in kw.items()}
        out = self.model(**kw, **self.keep, output_hidden_states=True) if self.lm else self.model(**kw)
        hidden = out.hidden_states[-1] if self.lm else out.last_hidden_state  # (B, P+T, d)
        mask = kw["attention_mask"]  # (B, T)
        hidden = hidden[:, -mask.shape[1]:]  # drop soft-prompt positions in front, if any
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, d)


def warmup_linear(optimizer: torch.optim.Optimizer, total: int, warmup: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first `warmup` share of the steps, then linear decay to 0."""
    n_warm = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
