"""`adaptune pretrain-lm`: a small GPT-2 trained from scratch on this machine, the base `small-gpt2` of
`adaptune run vae` for fast CPU experiments (any size, on any device: `--layers 12 --hidden 768 --heads 12
--device cuda` is GPT-2 small's shape).

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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import ConfigError
from ...files import atomic_write_dir
from ..common.causal import SMALL_GPT2, cache_root
from ..common.config import check_device, set_seed
from ..common.errors import TrainingError
from ..common.machine import device_info
from ..common.training import warmup_linear
from .config import PretrainConfig
from .data import CORPORA, Collate, length_grouped, load_corpus, on_device
from .model import sentence_log_px

FORMAT = "adaptune-pretrain-lm/1"
EOT = "<|endoftext|>"


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
    device = next(model.parameters()).device
    for batch in on_device((collate(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)), device):
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
    device = torch.device(check_device(cfg.device))
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
    model = build_model(cfg, tokenizer).to(device)
    params = sum(p.numel() for p in model.parameters())
    log(f"tokenizer: {len(tokenizer):,} tokens; model: {params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = warmup_linear(opt, cfg.steps, cfg.warmup)
    batches = on_device(length_grouped(texts, cfg.batch_size, collate, cfg.seed), device)
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
              "device": device_info(cfg.device)}

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
