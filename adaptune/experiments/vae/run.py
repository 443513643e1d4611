"""`adaptune run vae`: train AdaVAE on one corpus, evaluate it on the test split, save runs/<name>/:

    results.json              metrics (PPL under both token conventions, −ELBO, MI, AU, base PPL),
                              parameter counts, budgets, timings, device, the training curves, the base's
                              --quantize and the quantized layers it had
    command.txt               the exact command line
    adapters.safetensors      the encoder's and decoder's components (adaptune.save)
    posterior.safetensors     q(z|x)'s Latent Attention (or pooled) layers
    model.safetensors         with --finetune only: the fine-tuned base
    samples.txt               sentences decoded from z ~ N(0, I)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ... import load
from ...errors import ConfigError, LoadError
from ...files import atomic_write_dir
from ..common.causal import load_base
from ..common.config import check_device, set_seed
from ..common.machine import device_info, peak_memory_mb
from ...quantized import parameter_count as count_base
from ..common.quantize import binding, quantize_base, quantized_layers
from ..common.runs import check_destination, malformed
from .config import QUANTIZABLE, QUICK, RunConfig, TrainConfig, VAEConfig
from .data import Collate, by_length, length_grouped, load_corpus, on_device
from .evaluation import evaluate
from .generation import decode
from .model import VAE
from .results import FORMAT, read_vae
from .training import train

ARTIFACTS = ("results.json", "command.txt", "adapters.safetensors", "posterior.safetensors", "model.safetensors",
             "samples.txt")
def run(cfg: RunConfig, progress: Any = None) -> dict:
    """Train and evaluate; save under out/<name>/ (atomically); returns the results."""
    run_dir = Path(cfg.out) / cfg.run_name()
    check_destination(run_dir, cfg.overwrite, ARTIFACTS)
    steps, batch_size = cfg.budget("steps"), cfg.budget("batch_size")
    training = TrainConfig(**{**asdict(cfg.training), "steps": steps})
    device = torch.device(check_device(cfg.device))
    set_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    base, tokenizer = load_base(cfg.base, seed=cfg.seed)
    quantize_base(base, cfg.quantize, device, QUANTIZABLE)
    collate = Collate(tokenizer, cfg.max_length)
    train_set = load_corpus(cfg.corpus, "train", cfg.data_dir, cfg.budget("train_limit"), cfg.seed)
    test_set = load_corpus(cfg.corpus, "test", cfg.data_dir, cfg.budget("eval_limit"), cfg.seed)
    if len(train_set.texts) < batch_size:
        raise ConfigError(f"--batch-size {batch_size} is more than the {len(train_set.texts)} training sentences")
    with binding(cfg.quantize):
        vae = VAE(base, cfg.vae).to(device)
    load_s = time.perf_counter() - start
    bar = progress.add_task("train", total=steps) if progress is not None else None

    def on_step(row: dict) -> None:
        if progress is not None:
            progress.update(bar, advance=1, description=f"train  rec {row['rec']:.2f}  KL {row['kl']:.2f}  "
                                                         f"β {row['beta']:.2f}")
    t0 = time.perf_counter()
    history = train(vae, on_device(length_grouped(train_set.texts, batch_size, collate, cfg.seed), device), training,
                    generator=torch.Generator(device).manual_seed(cfg.seed), on_step=on_step)
    train_s = time.perf_counter() - t0
    eval_batches = on_device(by_length(test_set.texts, batch_size, collate), device)
    ebar = progress.add_task("test metrics", total=len(test_set.texts)) if progress is not None else None
    t0 = time.perf_counter()
    metrics = evaluate(vae, eval_batches, samples=cfg.budget("eval_samples"), seed=cfg.seed,
                       on_batch=(lambda n: progress.update(ebar, advance=n)) if progress is not None else None)
    eval_s = time.perf_counter() - t0
    for key in ("ppl", "neg_elbo", "mi"):
        if not math.isfinite(metrics[key]):
            raise ConfigError(f"the test {key} is not finite after {steps} steps; nothing is saved")
    z = torch.randn(3, cfg.vae.latent_dim, generator=torch.Generator().manual_seed(cfg.seed))  # z ~ N(0, I)
    z = z.to(device)  # drawn on the CPU: the same latents on every device
    samples = decode(vae, tokenizer, z, max_length=cfg.max_length, seed=cfg.seed)
    memory, memory_how = peak_memory_mb(cfg.device)
    base_params = count_base(base, {id(p) for p in vae.adaptation.parameters()})  # as in float, if quantized
    trained = sum(p.numel() for p in vae.trainable("encoder") + vae.trainable("decoder"))
    result = {
        "format": FORMAT, "experiment": "vae", "name": run_dir.name, "command": cfg.command,
        "config": {**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("vae", "training")},
                   "vae": asdict(cfg.vae), "training": asdict(training),
                   **{k: cfg.budget(k) for k in QUICK}},  # the budgets as run
        "spec": vae.adaptation.spec(), "base": {"name": cfg.base, "class": type(base).__name__, "params": base_params},
        "quantize": cfg.quantize, "quantized_layers": quantized_layers(base),
        "params": {"trainable": trained, "pct_trainable": 100 * trained / base_params},
        "data": {"train": train_set.info, "test": test_set.info},
        "test": metrics, "samples": samples,
        "history": history,
        "load_s": load_s, "train_s": train_s, "eval_s": eval_s, "peak_memory_mb": memory,
        "peak_memory_how": memory_how, "device": device_info(cfg.device),
    }
    adapters = {k: v.detach().cpu().contiguous() for k, v in vae.posterior.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / "command.txt").write_text(cfg.command + "\n")
        vae.adaptation.save(tmp / "adapters.safetensors")
        save_file(adapters, str(tmp / "posterior.safetensors"))
        if cfg.vae.finetune:
            save_model(base, str(tmp / "model.safetensors"))
        (tmp / "samples.txt").write_text("\n".join(samples) + "\n")
        (tmp / "results.json").write_text(json.dumps(result, indent=2))

    check_destination(run_dir, cfg.overwrite, ARTIFACTS)
    atomic_write_dir(run_dir, write)
    result["run_dir"] = str(run_dir)
    return result


def load_run(run_dir: str | Path) -> tuple[VAE, Any, dict]:
    """(the VAE, its tokenizer, results.json) of a saved run: the base rebuilt from its name (and quantized as
    the run's --quantize was), the components
    and the posterior (and with --finetune the base weights) loaded from the run's files. LoadError names the
    file and what is wrong: results.json checked by read_vae, a missing file, tensors of other shapes."""
    run_dir = Path(run_dir)
    results = read_vae(run_dir)
    cfg = results["config"]
    files = ["adapters.safetensors", "posterior.safetensors"] + ["model.safetensors"] * cfg["vae"]["finetune"]
    for name in files:
        if not (run_dir / name).is_file():
            raise LoadError(f"{run_dir / name}: missing; this run of adaptune run vae holds {', '.join(files)} "
                            f"beside results.json")
    try:
        vae_cfg = VAEConfig(**cfg["vae"])
    except (TypeError, ConfigError) as e:
        raise LoadError(f"{run_dir / 'results.json'}: config.vae does not rebuild the VAE ({e})") from e
    base, tokenizer = load_base(cfg["base"], seed=cfg["seed"])
    quantize_base(base, cfg.get("quantize"), "cpu", QUANTIZABLE)  # the base as the run had it
    vae = VAE(base, vae_cfg, adaptation=load(base, run_dir / "adapters.safetensors"))
    _load_state(vae.posterior, run_dir / "posterior.safetensors", f"the posterior of latent size {vae_cfg.latent_dim}")
    if vae_cfg.finetune:
        _load_state(base, run_dir / "model.safetensors", f"the base {cfg['base']!r}", base=True)
    vae.eval()
    return vae, tokenizer, results


def _load_state(module: torch.nn.Module, path: Path, what: str, base: bool = False) -> None:
    """Load a safetensors file into `module`, strictly (a base through load_model: its tied weights are saved
    once); LoadError naming the file and what does not fit."""
    try:
        if base:
            load_model(module, str(path))
            return
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from e
    except RuntimeError as e:  # load_model: missing, unexpected or mismatched tensors
        raise LoadError(f"{path}: does not fit {what} of this run ({' '.join(str(e).split())[:300]})") from e
    own = module.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    wrong += [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    if wrong:
        raise LoadError(f"{path}: does not fit {what} of this run ({'; '.join(wrong[:3])})")
    module.load_state_dict(state)


def reevaluate(run_dir: str | Path) -> dict:
    """The saved run's test metrics computed again from its files (equal to results.json's)."""
    wrong = malformed(read_vae(run_dir), {f"config.{k}": int for k in ("eval_limit", "batch_size", "eval_samples")})
    if wrong:
        raise LoadError(f"{Path(run_dir) / 'results.json'}: missing or malformed {', '.join(wrong)}; the test "
                        f"metrics cannot be computed again without the budgets they were computed with")
    vae, tokenizer, results = load_run(run_dir)
    cfg = results["config"]
    test = load_corpus(cfg["corpus"], "test", cfg["data_dir"], cfg["eval_limit"], cfg["seed"])
    batches = by_length(test.texts, cfg["batch_size"], Collate(tokenizer, cfg["max_length"]))
    return evaluate(vae, batches, samples=cfg["eval_samples"], seed=cfg["seed"])
