"""Saving a multitask run and reloading it: runs/<name>/ holds

    results.json          metrics, accounting, data sizes, config, device
    command.txt           the exact command line
    adapters.safetensors  the components (adaptune.save; reloads with adaptune.load, no code needed)
    model.safetensors     full fine-tuning only: the fine-tuned base
    heads.safetensors     the per-dataset heads (plain nn.Linear state)
    predictions.json      dev predictions per dataset (what a reloaded run reproduces)

head-only saves no model: its base is the unchanged pretrained model, rebuilt from config.model.
A run is saved as a whole: every file is written into a hidden sibling directory, which is then swapped in
for runs/<name>/ (adaptune.files.atomic_write_dir), so runs/<name>/ is absent or complete at every instant.
A run that fails (bad data, a non-finite loss) leaves no directory; with --overwrite, a run saved before
under that name stays until the new one is complete. Without --overwrite an existing runs/<name>/ is
refused before training (check_destination), and --overwrite replaces only a directory of run files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from ...errors import LoadError
from ...files import atomic_write_dir
from ...save_load import load as load_adaptation
from ..common.config import set_seed
from ..common.datasets import get_dataset
from ..common.encoders import load_base, load_tokenizer
from ..common.quantize import quantize_base
from ..common.runs import NUMBER, check_destination, malformed
from ..common.training import Encoder
from .config import ExperimentConfig, load_data
from .heads import make_heads
from .training import evaluate

FORMAT = "adaptune-multitask/1"
ARTIFACTS = ("command.txt", "heads.safetensors", "predictions.json", "adapters.safetensors", "model.safetensors",
             "results.json")
REQUIRED = {"name": str, "label": str, "method": str, "sharing": str, "config": dict, "files": dict, "tasks": dict,
            "model.name": str, "params.base": int, "params.pct_stored": NUMBER, "dev_average": NUMBER,
            "pct_updated_mean": NUMBER, "peak_memory_mb": NUMBER, "wall_s": NUMBER}  # what reports and reloads read
OPTIONAL = {"config.quantize": str}  # runs saved before --quantize have none: a float base
QUANTIZABLE = "minilm, the bert presets, or a BERT / Llama directory"  # bases whose projections are nn.Linear
REQUIRED_PER_DATASET = {"metric": str, "dev": NUMBER, "metrics": dict, "pct_updated": NUMBER,
                        "train_loss_by_epoch": list}


def save_run(run_dir: Path, cfg: Any, model: Any, adaptation: Any, heads: Any, preds: dict, result: dict,
             ranks: Any = None) -> None:
    """Write the run, results.json last, into a new directory swapped in for run_dir; sets result["files"].
    ranks: the ranks of a model sharded by FSDP2, where every rank calls this: rank 0 writes, and the others join
    its save of the components (a collective) in the directory it shares with them."""
    if ranks is not None and not ranks.main:
        where = ranks.share(None)
        if where is not None:  # None: rank 0 failed before saving (it raises the error)
            adaptation.save(Path(where) / "adapters.safetensors")
        return
    told: list[Path] = []

    def tell(tmp: Path) -> None:
        told.append(tmp)
        ranks.share(str(tmp))
    try:
        _write_run(run_dir, cfg, model, adaptation, heads, preds, result, share=None if ranks is None else tell)
    finally:
        if ranks is not None and not told:  # failed before the save: the other ranks stop waiting
            ranks.share(None)


def _write_run(run_dir: Path, cfg: Any, model: Any, adaptation: Any, heads: Any, preds: dict, result: dict,
               share: Any) -> None:
    check_destination(run_dir, cfg.overwrite, ARTIFACTS)  # again: another process may have saved there meanwhile
    files = {"command": "command.txt", "heads": "heads.safetensors", "predictions": "predictions.json"}
    if adaptation is not None:
        files["adapters"] = "adapters.safetensors"
    elif cfg.method.name == "full":
        files["model"] = "model.safetensors"
    result["files"] = files
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in heads.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / "command.txt").write_text(cfg.command + "\n")
        save_file(tensors, str(tmp / "heads.safetensors"))
        if adaptation is not None:
            if share is not None:
                share(tmp)  # the other ranks join the save below
            adaptation.save(tmp / "adapters.safetensors")
        elif cfg.method.name == "full":
            st_save_model(model, str(tmp / "model.safetensors"))
        (tmp / "predictions.json").write_text(json.dumps(preds))
        (tmp / "results.json").write_text(json.dumps(result, indent=2))

    atomic_write_dir(run_dir, write)


def check_results(result: Any, path: Path) -> dict:
    """`result` if it is a multitask run's results.json, else LoadError naming what is wrong and what is valid."""
    valid = f"a results.json written by adaptune run multitask (format {FORMAT!r})"
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        found = f"format {result.get('format')!r}" if isinstance(result, dict) else f"a JSON {type(result).__name__}"
        raise LoadError(f"{path}: not a multitask results.json ({found}); expected {valid}")
    wrong = malformed(result, REQUIRED, OPTIONAL)
    if "tasks" not in wrong:
        wrong += [f"tasks.{t}.{k}" for t, r in result["tasks"].items() for k in malformed(r, REQUIRED_PER_DATASET)]
    if wrong:
        raise LoadError(f"{path}: missing or malformed {', '.join(wrong[:6])}; expected {valid}")
    return result


def read_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise LoadError(f"{run_dir}: no results.json (not a finished multitask run)")
    try:
        return check_results(json.loads(path.read_text(encoding="utf-8-sig")), path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e}); expected a results.json written by adaptune run multitask") from e


def load_run(run_dir: str | Path) -> tuple[Any, Any, Any, Any, Any]:
    """(config, model, adaptation or None, heads, encoder) of a saved run on the CPU, ready to predict; a run
    with --quantize on its base quantized the same way."""
    run_dir = Path(run_dir)
    result = read_results(run_dir)
    try:
        cfg = ExperimentConfig.from_dict(result["config"])
    except (TypeError, KeyError) as e:
        raise LoadError(f"{run_dir}: results.json has a config this version cannot read ({e})") from e
    cfg.device = "cpu"
    set_seed(cfg.seed)
    model = load_base(cfg.model, cfg.seed)
    quantize_base(model, cfg.quantize, "cpu", QUANTIZABLE)  # the base as the run had it
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
    return evaluate(encoder, heads, adaptation, load_data(cfg), mixed=cfg.batching == "mixed")
