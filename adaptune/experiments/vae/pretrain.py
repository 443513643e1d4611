"""`adaptune pretrain-lm`: a small GPT-2 trained from scratch on this machine, the base `small-gpt2` of
`adaptune run vae` for fast CPU experiments.

  text       the train splits of yelp, ptb and wikitext2 (data.py), never their valid or test splits
  tokenizer  a byte-level BPE (the PyPI package tokenizers) trained on that text; one special token,
             <|endoftext|>, is BOS, EOS and padding (GPT-2's convention)
  model      GPT2LMHeadModel, by default 6 layers, hidden 256, 4 heads, vocab 8,192 (~6.8M parameters)
  training   sentences as the VAE sees them (BOS + tokens + EOS, at most max_length), AdamW, linear
             warm-up then linear decay, gradients clipped to norm 1, dropout 0.1
  held out   perplexity per scored token (every token after BOS) on each corpus's valid split

The result is a save_pretrained directory (config, weights, tokenizer, pretrain.json with the settings
and the held-out perplexities), written atomically to cache_root()/bases/small-gpt2 unless told where.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import ConfigError
from ...files import atomic_write_dir
from ..common.causal import SMALL_GPT2, cache_root
from ..common.config import set_seed
from ..common.errors import TrainingError
from ..common.machine import cpu_name
from ..common.training import warmup_linear
from .data import CORPORA, Collate, length_grouped, load_corpus
from .model import sentence_log_px

FORMAT = "adaptune-pretrain-lm/1"
EOT = "<|endoftext|>"


def _p(text: str, panel: str = "Model", **kw) -> dict:
    return {"help": text, "panel": panel, **kw}


@dataclass(frozen=True)
class PretrainConfig:
    """One `adaptune pretrain-lm`; the field metadata is the CLI's help."""
    layers: int = field(default=6, metadata=_p("transformer layers"))
    hidden: int = field(default=256, metadata=_p("hidden size"))
    heads: int = field(default=4, metadata=_p("attention heads"))
    vocab: int = field(default=8192, metadata=_p("BPE vocabulary size (bytes and merges, <|endoftext|> included)"))
    max_length: int = field(default=32, metadata=_p("tokens per sentence, BOS and EOS included"))
    steps: int = field(default=2000, metadata=_p("training steps", "Training"))
    batch_size: int = field(default=64, metadata=_p("sentences per step", "Training"))
    lr: float = field(default=1e-3, metadata=_p("peak learning rate (AdamW)", "Training"))
    warmup: float = field(default=0.05, metadata=_p("share of the steps of linear warm-up", "Training"))
    dropout: float = field(default=0.1, metadata=_p("dropout of embeddings, attention and residuals", "Training"))
    train_limit: int | None = field(default=None, metadata=_p(
        "training sentences per corpus, a seeded subset (default: all)", "Training"))
    eval_limit: int = field(default=2000, metadata=_p("held-out sentences per corpus", "Training"))
    seed: int = field(default=0, metadata=_p("seed of the data order and initialisation", "Run"))
    data_dir: str | None = field(default=None, metadata=_p(
        "the folder holding yelp/, ptb/, wikitext-2/ (default $ADAPTUNE_LM_DATA, else ../shared/data/lm)", "Run",
        metavar="<dir>"))

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "vocab", "steps", "batch_size", "eval_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.train_limit is not None and (not isinstance(self.train_limit, int) or self.train_limit < 1):
            raise ConfigError(f"--train-limit must be a positive integer, got {self.train_limit!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.vocab < 258:
            raise ConfigError(f"--vocab {self.vocab} is too small: the 256 bytes and <|endoftext|> come first "
                              f"(give at least 258)")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2 (BOS and EOS), got {self.max_length}")
        for name, low, high in (("lr", 0, math.inf), ("warmup", 0, 1), ("dropout", 0, 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value < high \
                    or (name == "lr" and value == 0):
                raise ConfigError(f"--{name} must be a finite number in "
                                  f"{'(0, ∞)' if name == 'lr' else '[0, 1)'}, got {value!r}")


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE of `vocab` tokens trained on the texts; <|endoftext|> is BOS, EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT)


def build_model(cfg: PretrainConfig, tokenizer: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    eot = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(64, cfg.max_length), n_embd=cfg.hidden,
                        n_layer=cfg.layers, n_head=cfg.heads, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                        attn_pdrop=cfg.dropout, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    return GPT2LMHeadModel(config)


@torch.no_grad()
def held_out_ppl(model: Any, texts: list[str], collate: Collate, batch_size: int = 128) -> float:
    """exp(−Σ log p / Σ scored tokens) over the texts (every token after BOS is scored)."""
    model.eval()
    log_p, scored = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = collate(texts[i:i + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_p += sentence_log_px(logits, batch["input_ids"], batch["attention_mask"]).sum().item()
        scored += int(batch["n_scored"].sum())
    return math.exp(-log_p / scored)


def default_out() -> Path:
    return cache_root() / "bases" / SMALL_GPT2


def pretrain(cfg: PretrainConfig, out: str | Path | None = None,
             on_step: Callable[[int, float], None] | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Train the tokenizer and the model, measure held-out perplexity, save to `out` (atomically);
    returns what pretrain.json holds."""
    out = Path(out) if out is not None else default_out()
    set_seed(cfg.seed)
    start = time.perf_counter()
    train = {name: load_corpus(name, "train", cfg.data_dir, cfg.train_limit, cfg.seed) for name in CORPORA}
    held = {name: load_corpus(name, "valid", cfg.data_dir, cfg.eval_limit, cfg.seed) for name in CORPORA}
    texts = [s for part in train.values() for s in part.texts]
    if len(texts) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(texts)} training sentences")
    log(f"{len(texts):,} training sentences ({', '.join(f'{k} {len(v):,}' for k, v in train.items())})")
    tokenizer = train_tokenizer(texts, cfg.vocab)
    collate = Collate(tokenizer, cfg.max_length)
    model = build_model(cfg, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    log(f"tokenizer: {len(tokenizer):,} tokens; model: {params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_linear(opt, cfg.steps, cfg.warmup)
    batches = length_grouped(texts, cfg.batch_size, collate, cfg.seed)
    history, t0 = [], time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        batch = next(batches)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        if not torch.isfinite(loss):
            raise TrainingError(f"step {step}: the loss is {loss.item()}; nothing is saved (lower --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4)})
        if on_step is not None:
            on_step(step, loss.item())
    train_s = time.perf_counter() - t0
    ppl = {name: held_out_ppl(model, part.texts, collate) for name, part in held.items()}
    model.eval()
    result = {"format": FORMAT, "config": asdict(cfg), "params": params, "vocab": len(tokenizer),
              "train_sentences": {k: len(v) for k, v in train.items()},
              "held_out": {k: {"split": "valid", "sentences": len(v), "ppl": ppl[k]} for k, v in held.items()},
              "history": history, "train_s": train_s, "total_s": time.perf_counter() - start,
              "device": {"device": "cpu", "name": cpu_name(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__}}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(result, indent=1) + "\n")

    atomic_write_dir(out, write)
    return {**result, "out": str(out)}


def read_pretrained(path: str | Path) -> dict | None:
    """The pretrain.json of a directory written by pretrain(), or None where there is none."""
    try:
        found = json.loads((Path(path) / "pretrain.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("format") == FORMAT else None
