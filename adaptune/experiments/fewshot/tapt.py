"""`adaptune tapt`: task-adaptive pretraining (Gururangan et al. 2020, on seed 003's slides). The chosen components
continue language-model training on the task's own unlabelled text (the sentences of the dataset's training file,
labels unused; the test set, the dev file, is never read): next-token prediction on a causal LM, the MLM loss on a
masked LM (15% of the tokens chosen; of those 80% [MASK], 10% a random token, 10% kept). Domain-adaptive
pretraining is the same on another dataset's text. The output directory holds

    adaptation.safetensors   the components (adaptune.save), what `adaptune run fewshot --init-from DIR` loads
    tapt.json                the settings, the base (and its --quantize) and method they belong to, the loss curve
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, LoadError
from ...files import atomic_write_dir
from ...save_load import load
from ..common.config import check_device, set_seed
from ..common.data import default_data_dir, load_dataset
from ..common.datasets import get_dataset
from ..common.errors import TrainingError
from ..common.methods import Method, method_label, param_groups
from ..common.quantize import binding, quantize_base, quantized_layers
from ..common.runs import check_destination, malformed
from ..common.training import warmup_linear
from .bases import CAUSAL, ENCODER, kind_of, load_lm
from .config import QUANTIZABLE, TaptConfig

TASK = "task"  # the adaptune task name of the components in tapt and fewshot runs
FORMAT = "adaptune-tapt/1"
ARTIFACTS = ("adaptation.safetensors", "tapt.json")


def lm_loss(model: nn.Module, batch: dict[str, Tensor], causal: bool, mask_token: int | None, vocab: int,
            p: float, gen: torch.Generator) -> Tensor:
    """Next-token cross entropy over real tokens (causal), or the MLM loss over the chosen tokens (masked). The
    logits are read from the end, so components that prepend positions (prompt tuning) are allowed."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    T = ids.shape[1]
    if causal:
        logits = model(input_ids=ids, attention_mask=attn).logits[:, -T:]  # (B, T, V)
        target = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    special = batch["special_tokens_mask"].bool() | (attn == 0)
    chosen = (torch.rand(ids.shape, generator=gen) < p).to(ids.device) & ~special
    if not chosen.any():  # at least one token per batch
        chosen[0, int((~special[0]).nonzero()[0])] = True
    roll = torch.rand(ids.shape, generator=gen).to(ids.device)
    inputs = ids.masked_fill(chosen & (roll < 0.8), mask_token)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs = torch.where(swap, torch.randint(vocab, ids.shape, generator=gen).to(ids.device), inputs)
    kw = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    logits = model(input_ids=inputs, attention_mask=attn, **kw).logits[:, -T:]
    return F.cross_entropy(logits.flatten(0, 1).float(), ids.masked_fill(~chosen, -100).flatten(), ignore_index=-100)


def tapt(cfg: TaptConfig, progress: Any = None) -> dict:
    """Train the components on the task's text and save them under cfg.out; returns what tapt.json holds."""
    check_device(cfg.device)
    out = Path(cfg.out)
    check_destination(out, cfg.overwrite, ARTIFACTS, option="--out")
    if kind_of(cfg.model) == ENCODER:  # before anything is loaded
        raise ConfigError(f"{cfg.model!r} has no LM head: TAPT needs a causal LM or a masked LM with its MLM head")
    set_seed(cfg.seed)
    splits = load_dataset(get_dataset(cfg.dataset), Path(cfg.data_dir or default_data_dir()))
    texts = [t for e in splits.train for t in (e.a, e.b) if t]
    model, tok, kind = load_lm(cfg.model, seed=cfg.seed)
    if kind != CAUSAL and tok.mask_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model!r} has no mask token: the MLM loss needs one")
    device = torch.device(cfg.device)
    quantize_base(model, cfg.quantize, device, QUANTIZABLE)
    with binding(cfg.quantize):
        adaptation = cfg.method.prepare(model, [TASK])
    adaptation.use(TASK)
    model.to(device).train()
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 1)
    groups = param_groups(model, nn.Identity(), cfg.lr or cfg.method.default_lr, 0.0, n_layers)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups)
    sched = warmup_linear(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress.add_task("TAPT", total=cfg.steps) if progress is not None else None
    losses, queue, t0 = [], [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        if len(queue) < cfg.batch_size:
            queue += torch.randperm(len(texts), generator=gen).tolist()
        chunk = [texts[i] for i in queue[:cfg.batch_size]]
        del queue[:cfg.batch_size]
        batch = tok(chunk, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt",
                    return_special_tokens_mask=kind != CAUSAL)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = lm_loss(model, batch, kind == CAUSAL, tok.mask_token_id, len(tok), cfg.mlm_probability, gen)
        if not torch.isfinite(loss):
            raise TrainingError(f"TAPT diverged at step {step}: the loss is {loss.item()}; nothing is saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            progress.update(bar, advance=1, description=f"TAPT  loss {losses[-1]:.3f}")
    info = {"format": FORMAT, "command": cfg.command, "model": cfg.model, "kind": kind, "dataset": cfg.dataset,
            "method": cfg.method.label(), "quantize": cfg.quantize, "quantized_layers": quantized_layers(model),
            "config": {**asdict(cfg), "method": asdict(cfg.method)},
            "texts": len(texts), "losses": losses, "train_s": time.perf_counter() - t0}

    def write(tmp: Path) -> None:
        adaptation.save(tmp / "adaptation.safetensors")
        (tmp / "tapt.json").write_text(json.dumps(info, indent=2))

    check_destination(out, cfg.overwrite, ARTIFACTS, option="--out")
    atomic_write_dir(out, write)
    return info


def read_tapt(path: str | Path, model_name: str, method: Method) -> dict:
    """tapt.json of a TAPT output directory, checked (its schema, its components file, and that it was made
    for this base and method): LoadError / ConfigError naming the file and what is wrong."""
    path = Path(path)
    file, weights = path / "tapt.json", path / "adaptation.safetensors"
    if not path.is_dir():
        raise LoadError(f"--init-from {str(path)!r}: no such directory; give an output directory of `adaptune tapt`")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not an `adaptune tapt` output directory ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LoadError(f"{file}: format {info.get('format') if isinstance(info, dict) else None!r}, "
                        f"not {FORMAT!r}")
    wrong = malformed(info, {"model": str, "method": str})
    if wrong:
        raise LoadError(f"{file}: missing or malformed {', '.join(wrong)}; expected a tapt.json written by "
                        f"adaptune tapt (format {FORMAT!r})")
    if not weights.is_file():
        raise LoadError(f"{weights}: missing; an `adaptune tapt` output directory holds {', '.join(ARTIFACTS)}")
    if info["model"] != model_name or method_label(info["method"]) != method.label():  # 'stack[...]': before --spec
        raise ConfigError(f"{path}: its components are {info['method']} on {info['model']!r}; this run is "
                          f"{method.label()} on {model_name!r}: give the same --model and method options")
    return info


def load_tapt(path: str | Path, model: nn.Module, model_name: str, method: Method) -> Any:
    """The components of a TAPT output directory on `model`, active; refused for another base or method."""
    read_tapt(path, model_name, method)
    return load(model, Path(path) / "adaptation.safetensors", active=TASK)
