"""What every experiment's saved runs share: the destination check made before anything trains
(check_destination) and the schema check of a results file (malformed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...files import check_writable

NUMBER = (int, float)


def check_destination(run_dir: Path, overwrite: bool, artifacts: tuple[str, ...],
                      option: str = "--name") -> None:
    """Refuse, before training, a run directory that cannot be written or would replace a run silently
    (`artifacts`: the files a run directory of this experiment holds; `option`: the option that names the
    directory, --name for OUT/NAME, --out for a directory given whole)."""
    out = run_dir.parent
    for p in (out, *out.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                where = "runs are written to OUT/NAME: give a directory (it is made if missing)" \
                    if option == "--name" else "give a path whose parents are directories"
                raise ConfigError(f"--out {str(out if option == '--name' else run_dir)!r}: {str(p)!r} is a file, "
                                  f"not a directory; {where}")
            break
    check_writable(run_dir)
    if not os.path.lexists(run_dir):
        return
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise ConfigError(f"{str(run_dir)!r} exists and is not a run directory; give another {option}")
    if not overwrite:
        saved = "a run was saved under that name" if option == "--name" else "an earlier output is there"
        raise ConfigError(f"{str(run_dir)!r} exists: {saved}; give another {option}, or "
                          f"--overwrite to replace it (the old run is kept until the new one is complete)")
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in artifacts)
    if others:
        raise ConfigError(f"--overwrite replaces only a run directory, and {str(run_dir)!r} also holds "
                          f"{', '.join(others[:5])}: move them away, or give another {option}")


def _get(d: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _fits(value: Any, kind: Any) -> bool:
    """isinstance, but a bool is no number (JSON's true is not a metric)."""
    numeric = kind in (int, float, NUMBER)
    return isinstance(value, kind) and not (numeric and isinstance(value, bool))


def malformed(result: Any, required: dict[str, Any], optional: dict[str, Any] | None = None) -> list[str]:
    """The dotted keys of `required` that `result` lacks or holds with another type, and of `optional` that it
    holds with another type: what every reader of a saved run checks before reading (one schema per run kind)."""
    wrong = [k for k, kind in required.items() if not _fits(_get(result, k), kind)]
    return wrong + [k for k, kind in (optional or {}).items()
                    if _get(result, k) is not None and not _fits(_get(result, k), kind)]
