"""A saved `adaptune run vae` run's results.json, read and checked in one place: what `adaptune report`, the
`vae` commands (load_run) and reevaluate read, so every reader refuses the same broken files, naming the file
and the keys that are missing or of the wrong type."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import LoadError
from ..common.runs import NUMBER, malformed

FORMAT = "adaptune-vae/1"
REQUIRED = {
    "name": str, "config": dict, "config.base": str, "config.corpus": str, "config.seed": int,
    "config.max_length": int, "config.vae": dict, "config.vae.latent_gen": str, "config.vae.injection": str,
    "config.vae.placement": str, "config.vae.latent_dim": int, "config.vae.finetune": bool,
    "config.training": dict, "config.training.free_bits": NUMBER, "params.pct_trainable": NUMBER,
    "test.ppl": NUMBER, "test.ppl_optimus_tokens": NUMBER, "test.neg_elbo": NUMBER, "test.mi": NUMBER,
    "test.au": int, "test.base_ppl": NUMBER, "history": list}
OPTIONAL = {"train_s": NUMBER, "config.steps": int, "config.vae.prefix": int, "config.quantize": str}
HISTORY = {"step": int, "rec": NUMBER, "kl": NUMBER, "beta": NUMBER}  # per training step


def is_vae(result: Any) -> bool:
    return isinstance(result, dict) and result.get("format") == FORMAT


def check_vae(result: Any, path: Path) -> dict:
    """`result` if it is a VAE run's results.json, else LoadError naming what is wrong and what is valid."""
    valid = f"expected a results.json written by adaptune run vae (format {FORMAT!r})"
    if not is_vae(result):
        found = result.get("format") if isinstance(result, dict) else f"a JSON {type(result).__name__}"
        raise LoadError(f"{path}: format {found!r}, not {FORMAT!r}; {valid}")
    wrong = malformed(result, REQUIRED, OPTIONAL)
    if "history" not in wrong:
        wrong += [f"history[{i}].{k}" for i, row in enumerate(result["history"]) for k in malformed(row, HISTORY)]
    if wrong:
        raise LoadError(f"{path}: missing or malformed {', '.join(wrong[:6])}; {valid}")
    return result


def read_vae(run_dir: str | Path) -> dict:
    """The checked results.json of a VAE run directory."""
    path = Path(run_dir) / "results.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not a saved VAE run ({e})") from e
    return check_vae(result, path)
