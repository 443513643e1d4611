"""Saving a multitask run and reloading it: runs/<name>/ holds

    results.json          metrics, accounting, data sizes, config, device (written last, atomically)
    command.txt           the exact command line
    adapters.safetensors  the components (adaptune.save; reloads with adaptune.load, no code needed)
    model.safetensors     full fine-tuning only: the fine-tuned base
    heads.safetensors     the per-dataset heads (plain nn.Linear state)
    predictions.json      dev predictions per dataset (what a reloaded run reproduces)

head-only saves no model: its base is the unchanged pretrained model, rebuilt from config.model.
Every file is written atomically (a temporary file renamed over the target).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from ..errors import LoadError
from ..files import atomic_write
from ..persist import load as load_adaptation
from .config import ExperimentConfig, load_base, load_data, load_tokenizer, set_seed
from .datasets import get_dataset
from .methods import make_heads
from .training import Encoder, evaluate

ARTIFACTS = ("command.txt", "heads.safetensors", "predictions.json", "adapters.safetensors", "model.safetensors",
             "results.json")


def save_run(run_dir: Path, cfg: Any, model: Any, adaptation: Any, heads: Any, preds: dict) -> dict:
    """Write everything but results.json; returns {role: file name}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ARTIFACTS:  # a run saved here before (same name) must not leave its files behind
        (run_dir / stale).unlink(missing_ok=True)
    files = {"command": "command.txt", "heads": "heads.safetensors", "predictions": "predictions.json"}
    atomic_write(run_dir / "command.txt", lambda tmp: tmp.write_text(cfg.command + "\n"))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in heads.state_dict().items()}
    atomic_write(run_dir / "heads.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    if adaptation is not None:
        adaptation.save(run_dir / "adapters.safetensors")
        files["adapters"] = "adapters.safetensors"
    elif cfg.method.name == "full":
        atomic_write(run_dir / "model.safetensors", lambda tmp: st_save_model(model, str(tmp)))
        files["model"] = "model.safetensors"
    atomic_write(run_dir / "predictions.json", lambda tmp: tmp.write_text(json.dumps(preds)))
    return files


def read_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise LoadError(f"{run_dir}: no results.json (not a finished multitask run)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from e


def load_run(run_dir: str | Path) -> tuple[Any, Any, Any, Any, Any]:
    """(config, model, adaptation or None, heads, encoder) of a saved run on the CPU, ready to predict."""
    run_dir = Path(run_dir)
    result = read_results(run_dir)
    cfg = ExperimentConfig.from_dict(result["config"])
    cfg.device = "cpu"
    set_seed(cfg.seed)
    model = load_base(cfg.model, cfg.seed)
    files = result["files"]
    adaptation = None
    if "adapters" in files:
        adaptation = load_adaptation(model, run_dir / files["adapters"])
    elif "model" in files:
        st_load_model(model, str(run_dir / files["model"]))
    heads = make_heads(model.config.hidden_size, {t: get_dataset(t).n_out for t in cfg.tasks}, cfg.seed)
    heads.load_state_dict(load_file(str(run_dir / files["heads"])))
    model.eval(), heads.eval()
    return cfg, model, adaptation, heads, Encoder(model, load_tokenizer(cfg.model, cfg.tokenizer), cfg.max_length)


def predict_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, list[float]]:
    """Dev predictions of a saved run, recomputed from its saved files and its data (or data_dir)."""
    cfg, _, adaptation, heads, encoder = load_run(run_dir)
    if data_dir is not None:
        cfg.data_dir = str(data_dir)
    return evaluate(encoder, heads, adaptation, load_data(cfg))
