"""`adaptune run fewshot`: LM-BFF's few-shot protocol around any adaptune method. Per seed: K training examples per
class and a dev set of the same size sampled from the dataset's training file (recipes.few_shot), a fresh base with
the method's components (or `adaptune tapt`'s), training (train.py), and accuracy on the test set, the dataset's dev
file (one seeded subset with --test-limit, the same for every seed). Zero-shot trains nothing and samples nothing:
one evaluation. The summary is the mean and the population std over the seeds (numpy's default, as LM-BFF).

With --quantize each seed's base is quantized on the run's device as it is loaded, before the components attach.

OUT/NAME/ holds results.json (config, every seed's numbers and curves, the summary, device) and command.txt;
it is written atomically, after every seed has run, and a run that fails writes nothing.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...files import atomic_write_dir
from ..common.config import check_device, set_seed
from ..common.data import default_data_dir, load_dataset, subset
from ..common.datasets import CLASSES, get_dataset
from ..common.machine import device_info, peak_memory_mb
from ..common.methods import param_groups
from ..common.quantize import binding, quantize_base, quantized_layers
from ..common.runs import check_destination
from ..common.training import EVAL_BATCH, Encoder
from .bases import CAUSAL, ENCODER, kind_of, load_lm
from .config import QUANTIZABLE, FewShotConfig
from .prompts import Prompt, default_prompt
from .recipes import ParameterAverage, few_shot
from .tapt import TASK, load_tapt, read_tapt
from .train import accuracy, predict, scorer, train_seed

FORMAT = "adaptune-fewshot/1"
ARTIFACTS = ("results.json", "command.txt")


def run(cfg: FewShotConfig, progress: Any = None) -> dict:
    """Every seed of the experiment; the results (also OUT/NAME/results.json)."""
    check_device(cfg.device)
    run_dir = Path(cfg.out) / cfg.run_name()
    check_destination(run_dir, cfg.overwrite, ARTIFACTS)
    kind = kind_of(cfg.model)
    if cfg.mode != "head" and kind == ENCODER:  # before anything is loaded
        raise ConfigError(f"{cfg.model!r} has no LM head, so no label-word logits: prompts need a causal LM "
                          f"(smollm2-135m) or a masked LM with its MLM head; use --mode head with this base")
    if cfg.init_from:
        read_tapt(cfg.init_from, cfg.model, cfg.method)
    start = time.perf_counter()
    dataset = get_dataset(cfg.dataset)
    n_classes = dataset.n_out if dataset.kind == CLASSES else 2
    splits = load_dataset(dataset, Path(cfg.data_dir or default_data_dir()))
    test = subset(splits.dev, cfg.budget("test_limit"), seed=0)
    template, verbalizer = cfg.template, cfg.verbalizer
    if cfg.mode != "head" and (template is None or verbalizer is None):
        built_in = default_prompt(dataset.name, causal=kind == CAUSAL)
        template, verbalizer = template or built_in[0], verbalizer or built_in[1]
    seeds = [None] if cfg.mode == "zero-shot" else cfg.seed_list()
    per_seed = []
    for seed in seeds:
        per_seed.append(_one_seed(cfg, seed, splits.train, test, n_classes, template, verbalizer, progress))
        if progress is not None:  # a line per seed, which a log file keeps too
            progress.console.print(_seed_line(per_seed[-1]), highlight=False)
    summary = {key: _mean_std([r[key] for r in per_seed]) for key in ("test", "ensemble_test") if key in per_seed[0]}
    layers = [r.pop("quantized_layers") for r in per_seed][0]  # every seed's fresh base alike
    memory, memory_how = peak_memory_mb(cfg.device)
    result = {
        "format": FORMAT, "experiment": "fewshot", "name": run_dir.name, "command": cfg.command,
        "config": {**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "method"},
                   "method": cfg.method.label(), **{k: cfg.budget(k) for k in ("steps", "eval_every", "test_limit")}},
        "quantize": cfg.quantize, "quantized_layers": layers,
        "template": template, "verbalizer": verbalizer, "classes": n_classes,
        "data": {**splits.info, "test": len(test)}, "seeds": per_seed, "summary": summary,
        "wall_s": time.perf_counter() - start, "peak_memory_mb": memory, "peak_memory_how": memory_how,
        "device": device_info(cfg.device),
    }

    def write(tmp: Path) -> None:
        (tmp / "command.txt").write_text(cfg.command + "\n")
        (tmp / "results.json").write_text(json.dumps(result, indent=2))

    check_destination(run_dir, cfg.overwrite, ARTIFACTS)
    atomic_write_dir(run_dir, write)
    result["run_dir"] = str(run_dir)
    return result


def _one_seed(cfg: FewShotConfig, seed: int | None, pool: list, test: list, n_classes: int, template: str | None,
              verbalizer: str | None, progress: Any) -> dict:
    set_seed(seed or 0)
    model, tok, kind = load_lm(cfg.model, seed=seed or 0)
    device = torch.device(cfg.device)
    quantize_base(model, cfg.quantize, device, QUANTIZABLE)
    prompt = Prompt.build(template, verbalizer, tok, kind == CAUSAL, n_classes) if cfg.mode != "head" else None
    encoder = Encoder(model, tok, cfg.max_length, device)
    head = None
    if cfg.mode == "head":
        torch.manual_seed(seed or 0)
        head = nn.Linear(model.config.hidden_size, n_classes)
    if cfg.mode != "zero-shot":
        with binding(cfg.quantize):
            _components(cfg, model)  # attached to the model: its hooks run inside model's forward
    model.to(device)
    layers = quantized_layers(model)  # the base as it runs
    modules = [model] + ([head.to(device)] if head is not None else [])
    score = scorer(model, prompt, head, encoder, cfg.max_length, device)
    label = "zero-shot" if seed is None else f"seed {seed}"
    if seed is None:
        preds = _test(score, modules, test, progress, label)
        return {"seed": None, "test": accuracy(preds, test), "quantized_layers": layers}
    train, dev = few_shot(pool, cfg.k, seed, n_classes)
    lr = cfg.lr if cfg.lr is not None else cfg.method.default_lr
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", 1)
    groups = param_groups(model, head if head is not None else nn.Identity(), lr, cfg.head_lr, n_layers)
    if not groups:
        raise ConfigError(f"method {cfg.method.name!r} trains nothing in --mode {cfg.mode} (head-only trains a "
                          f"head: use --mode head)")
    params = [p for g in groups for p in g["params"]]
    ensemble = ParameterAverage(params, cfg.self_ensemble, cfg.ensemble_every) if cfg.self_ensemble else None
    steps = cfg.budget("steps")
    bar = progress.add_task(f"{label} train", total=steps) if progress is not None else None

    def on_step(row: dict) -> None:
        if bar is not None:
            dev = f"  dev {row['dev']:.3f}" if "dev" in row else ""
            progress.update(bar, advance=1, description=f"{label} train  loss {row['loss']:.3f}{dev}")
    t0 = time.perf_counter()
    log = train_seed(score, modules, groups, train, dev, steps=steps, batch_size=cfg.batch_size,
                     eval_every=cfg.budget("eval_every"), seed=seed, ensemble=ensemble, distill=cfg.self_distill,
                     on_step=on_step)
    out = {"seed": seed, "train": len(train), "dev": len(dev), "best_dev": log["best_dev"],
           "best_step": log["best_step"], "train_s": time.perf_counter() - t0, "history": log["history"],
           "trainable": sum(p.numel() for p in params), "quantized_layers": layers}
    out["test"] = accuracy(_test(score, modules, test, progress, label), test)
    if ensemble is not None:
        with ensemble.swapped():
            out["ensemble_test"] = accuracy(_test(score, modules, test, progress, f"{label} self-ensemble"), test)
        out["ensemble_snapshots"] = ensemble.count
    return out


def _components(cfg: FewShotConfig, model: nn.Module) -> Any:
    """The method's components on `model` (one task), or the TAPT run's, loaded to continue from."""
    if cfg.init_from:
        return load_tapt(cfg.init_from, model, cfg.model, cfg.method)
    adaptation = cfg.method.prepare(model, [TASK])
    if adaptation is not None:
        adaptation.use(TASK)
    return adaptation


def _test(score: Any, modules: list, test: list, progress: Any, label: str) -> list[int]:
    batches = -(-len(test) // EVAL_BATCH)
    bar = progress.add_task(f"{label} test", total=batches) if progress is not None else None
    return predict(score, modules, test, on_batch=(lambda: progress.advance(bar)) if bar is not None else None)


def _seed_line(r: dict) -> str:
    if r["seed"] is None:
        return f"zero-shot: test {r['test']:.4f}"
    ens = f", self-ensemble {r['ensemble_test']:.4f}" if "ensemble_test" in r else ""
    return (f"seed {r['seed']}: best dev {r['best_dev']:.4f} (step {r['best_step']}), test {r['test']:.4f}{ens}; "
            f"trained in {r['train_s']:.0f} s")


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values), "values": values}
