"""GLUE-style multitask fine-tuning and evaluation (seed 004, with seed 002's round-robin and EDA
and seed 003's layer-wise learning-rate decay).

One base model; one plain nn.Linear head per dataset on the mean-pooled last hidden states (see
common/training.py); a regression head's bias starts at the mean training score. Losses: classes cross entropy, binary one logit with BCE, regression one output with
MSE (STS, scored by Pearson r). Within each epoch the datasets take turns batch by batch (round
robin); the active adaptune task is switched to the dataset's before each step. With batching "mixed"
every batch mixes the datasets: each sample runs its dataset's task (adaptation.route), head and loss,
and the datasets' mean losses are weighted by their share of the batch (every sample weighs the same). AdamW, linear
warm-up (10% of the steps) then linear decay, gradients clipped to norm 1. Seeded: the same config
and seed give the same metrics on CPU (torch.use_deterministic_algorithms during the run).

With --quantize the base is quantized on the run's device as it is loaded, before the components attach
(common/quantize.py); a reloaded run quantizes its base the same way.

Under torchrun (WORLD_SIZE > 1) the run is data parallel: each batch is split across the ranks and the
gradients summed with one all-reduce per step (distributed.py); only rank 0 writes the run directory. With
--fsdp the model is sharded by FSDP2 across the ranks (distributed.py `shard`).

Before anything is loaded the destination is checked (common/runs.py check_destination); a non-finite loss or
gradient norm stops training with a TrainingError naming the step and the dataset, and non-finite dev
predictions stop the run too: a failed run saves nothing (runs.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...trainer_routing import AbsentTasks
from ..common.config import set_seed
from ..common.data import DatasetSplits
from ..common.encoders import load_base, load_tokenizer
from ..common.errors import TrainingError
from ..common.machine import device_info, peak_memory_mb
from ..common.methods import param_groups
from ..common.quantize import binding, quantize_base, quantized_layers
from ..common.runs import check_destination
from ..common.training import Encoder, warmup_linear
from . import metrics
from .config import QUICK, ExperimentConfig, default_name, load_data
from .distributed import Ranks, setup, shard
from .heads import accounting, make_heads
from .runs import ARTIFACTS, FORMAT, QUANTIZABLE, load_run, predict_run, save_run
from .training import evaluate, loss_of, mixed_loss, mixed_schedule, routed, schedule


def score(data: dict[str, DatasetSplits], preds: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Every metric of each dataset's kind; the dataset's own metric is the one averaged."""
    out = {}
    for t, d in data.items():
        gold = [e.label for e in d.dev]
        names = {"classes": ["accuracy", "matthews"] if d.dataset.n_out == 2 else ["accuracy"],
                 "binary": ["accuracy", "f1"], "regression": ["pearson", "spearman"]}[d.dataset.kind]
        out[t] = {m: metrics.METRICS[m](preds[t], gold) for m in dict.fromkeys([d.dataset.metric, *names])}
    return out


def build(cfg: ExperimentConfig, data: dict[str, DatasetSplits]) -> tuple[nn.Module, Any, nn.ModuleDict, Encoder]:
    set_seed(cfg.seed)
    model = load_base(cfg.model, cfg.seed)
    quantize_base(model, cfg.quantize, cfg.device, QUANTIZABLE)
    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but the model's embedding only {vocab}")
    heads = make_heads(model.config.hidden_size, {t: d.dataset.n_out for t, d in data.items()}, cfg.seed)
    with torch.no_grad():  # a regression head starts at the mean training score: MSE then trains the slope
        for t, d in data.items():
            if d.dataset.kind == "regression":
                heads[t].bias.fill_(sum(e.label for e in d.train) / len(d.train))
    with binding(cfg.quantize):
        adaptation = cfg.method.prepare(model, list(data))
    model.to(cfg.device), heads.to(cfg.device)
    return model, adaptation, heads, Encoder(model, tok, cfg.max_length, cfg.device)


def train(cfg: ExperimentConfig, data: dict[str, DatasetSplits], model: nn.Module, adaptation: Any,
          heads: nn.ModuleDict, encoder: Encoder, progress: Any = None, ranks: Ranks | None = None) -> dict:
    ranks = ranks or Ranks()
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 1)
    opt = torch.optim.AdamW(param_groups(model, heads, cfg.lr, cfg.head_lr, n_layers, cfg.layer_lr_decay))
    sizes = {t: len(d.train) for t, d in data.items()}
    mixed = cfg.batching == "mixed"
    make = mixed_schedule if mixed else schedule
    plans = [make(sizes, cfg.batch_size, cfg.seed, e) for e in range(cfg.epochs)]
    sched = warmup_linear(opt, sum(map(len, plans)))
    params = [p for g in opt.param_groups for p in g["params"]]
    kinds = {t: d.dataset.kind for t, d in data.items()}
    losses: dict[str, list[list[float]]] = {t: [] for t in data}
    absent = AbsentTasks() if ranks.sharded and mixed and adaptation is not None else None  # see distributed.py
    seen, seconds, step, total = 0, 0.0, 0, sum(map(len, plans))
    set_seed(cfg.seed + ranks.rank)  # the same weights on every rank (built before), not the same dropout
    for epoch, plan in enumerate(plans):
        bars = _bars(progress, plan, data, epoch, cfg.epochs, mixed)
        for t in data:
            losses[t].append([])
        model.train(), heads.train()
        t0 = time.perf_counter()
        for item in plan:
            pairs = item if mixed else [(item[0], i) for i in item[1]]  # (dataset, example index)
            mine, share = ranks.part(pairs) if ranks.world > 1 else (pairs, 1.0)
            names = [t for t, _ in mine]
            labels = torch.tensor([data[t].train[i].label for t, i in mine], dtype=torch.float32, device=cfg.device)
            if mixed:
                with routed(adaptation, names):
                    pooled = encoder([data[t].train[i] for t, i in mine])
                loss, parts = mixed_loss(kinds, heads, pooled, mine, labels)
            else:
                if adaptation is not None:
                    adaptation.use(names[0])
                loss = loss_of(kinds[names[0]], heads[names[0]](encoder([data[t].train[i] for t, i in mine])), labels)
                parts = {names[0]: None}
            if ranks.world > 1:
                loss = loss * ranks.weight(share)  # summed across ranks: the whole batch's mean
                if mixed:
                    parts = ranks.dataset_means(parts, names, list(data))
            step += 1
            where = f"step {step} of {total} (epoch {epoch + 1}, " + \
                (f"datasets {', '.join(parts)})" if mixed else f"dataset {names[0]!r})")
            opt.zero_grad(set_to_none=True)
            if absent is not None:
                absent.seen(torch.tensor([adaptation.task_names.index(t) if t in adaptation.task_names else -1
                                          for t in names]), adaptation)
                term = absent.term()
                loss = loss if term is None else loss + term
            loss.backward()
            if absent is not None:
                absent.settle()
            value = _finite(ranks.reduce(params, loss), "the loss", where, cfg)
            _finite(ranks.clip(params, 1.0), "the gradient norm", where, cfg)
            opt.step()
            sched.step()
            for t, part in parts.items():
                losses[t][-1].append(value if part is None else part)
            seen += len(pairs)
            if progress is not None:
                progress.advance(bars["mixed" if mixed else names[0]])
        seconds += time.perf_counter() - t0
    return {"losses": losses, "examples": seen, "seconds": seconds, "steps": total}


def _bars(progress: Any, plan: list, data: dict, epoch: int, epochs: int, mixed: bool) -> dict:
    """One progress bar per dataset (round robin), or one for the mixed batches, for this epoch."""
    if progress is None:
        return {}
    if mixed:
        return {"mixed": progress.add_task(f"epoch {epoch + 1}/{epochs} mixed batches", total=len(plan))}
    return {t: progress.add_task(f"epoch {epoch + 1}/{epochs} {t}", total=sum(1 for s, _ in plan if s == t))
            for t in data}


def _finite(value: float, what: str, where: str, cfg: ExperimentConfig) -> float:
    """`value`, or a TrainingError: a non-finite loss or gradient would make every later step NaN."""
    if not math.isfinite(value):
        raise TrainingError(f"training diverged at {where}: {what} is {value}; the run is stopped and nothing "
                            f"is saved (try a lower --lr than {cfg.lr:g} or --head-lr than {cfg.head_lr:g})")
    return value


def run(cfg: ExperimentConfig, progress: Any = None) -> dict:
    """Train, evaluate, save under out/name; returns the results (also written to results.json).

    progress: a rich.progress.Progress (optional): one bar per dataset and epoch, one per dev set."""
    cfg = cfg.resolved()
    ranks, device = setup(cfg.device, cfg.fsdp)
    try:
        result = _run(replace(cfg, device=device), ranks, progress if ranks.main else None)
    except BaseException:
        ranks.close(ok=False)
        raise
    ranks.close()
    return result


def _run(cfg: ExperimentConfig, ranks: Ranks, progress: Any) -> dict:
    run_dir = cfg.run_dir()
    check_destination(run_dir, cfg.overwrite, ARTIFACTS)  # before any loading or training
    start = time.perf_counter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        data = load_data(cfg)
        model, adaptation, heads, encoder = build(cfg, data)
        if cfg.fsdp:
            shard(model, ranks)
        if cfg.device != "cpu":
            torch.cuda.reset_peak_memory_stats(torch.device(cfg.device))
        log = train(cfg, data, model, adaptation, heads, encoder, progress, ranks)
        t0 = time.perf_counter()
        split = (0, 1) if ranks.sharded else (ranks.rank, ranks.world)  # under FSDP2 every rank runs every batch
        preds = evaluate(encoder, heads, adaptation, data, progress=progress, shard=split,
                         mixed=cfg.batching == "mixed")
        preds = preds if ranks.sharded else ranks.gather(preds)
        eval_s = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for t, p in preds.items():
        if not all(map(math.isfinite, p)):
            raise TrainingError(f"the dev predictions of dataset {t!r} are not finite after {log['steps']} steps; "
                                f"the run is stopped and nothing is saved (try a lower --lr than {cfg.lr:g})")
    scores = score(data, preds)
    counts = accounting(cfg.method, model, adaptation, heads)
    memory, memory_how = peak_memory_mb(cfg.device)
    dev = {t: scores[t][d.dataset.metric] for t, d in data.items()}
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    result = {
        "format": FORMAT, "experiment": "multitask", "name": run_dir.name, "command": cfg.command,
        "label": cfg.method.label(), "method": cfg.method.name, "sharing": cfg.method.sharing,
        "config": cfg.to_dict(), "spec": adaptation.spec() if adaptation is not None else None,
        "model": {"name": cfg.model, "class": type(model).__name__, "params": counts["base"]},
        "quantize": cfg.quantize, "quantized_layers": quantized_layers(model),
        "data": {t: d.info for t, d in data.items()}, "skipped_rows": {t: d.skipped for t, d in data.items()},
        "tasks": {t: {"metric": d.dataset.metric, "dev": dev[t], "metrics": scores[t], "loss": d.dataset.loss,
                      "train_loss_by_epoch": [mean(e) for e in log["losses"][t]],
                      "pct_updated": counts["pct_updated"][t], "updated": counts["updated"][t]}
                  for t, d in data.items()},
        "dev_average": mean(list(dev.values())),
        "pct_updated_mean": mean(list(counts["pct_updated"].values())),
        "params": counts, "peak_memory_mb": memory, "peak_memory_how": memory_how,
        "train_examples": log["examples"], "train_steps": log["steps"], "train_s": log["seconds"],
        "train_examples_per_s": log["examples"] / log["seconds"] if log["seconds"] else None,
        "eval_examples": sum(len(d.dev) for d in data.values()), "eval_s": eval_s,
        "eval_examples_per_s": sum(len(d.dev) for d in data.values()) / eval_s if eval_s else None,
        "device": device_info(cfg.device),
        "distributed": {"world_size": ranks.world, "backend": ranks.backend, "fsdp": ranks.sharded},
    }
    result["wall_s"] = time.perf_counter() - start
    result["run_dir"] = str(run_dir)
    if ranks.sharded:  # saving the components is a collective: every rank joins rank 0's save
        save_run(run_dir, cfg, model, adaptation, heads, preds, result, ranks=ranks)
    elif ranks.main:
        save_run(run_dir, cfg, model, adaptation, heads, preds, result)
    return result


__all__ = ["ExperimentConfig", "QUICK", "TrainingError", "default_name", "load_run", "predict_run", "run"]
