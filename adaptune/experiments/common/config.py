"""The checks and seeding every experiment shares: --device (check_device), a run's --name (check_run_name) and
set_seed. Importing this module imports no torch (the CLI builds its options from it); torch is imported when a
device is checked or a seed is set."""
from __future__ import annotations

import os
import random
import re
from typing import Any

from ...errors import ConfigError

DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device_name(device: Any) -> None:
    """ConfigError unless `device` is written as a device (cpu, cuda or cuda:N): the settings' own check, made
    without torch when they are built; whether this machine has the device is check_device's."""
    if not (isinstance(device, str) and DEVICE.fullmatch(device)):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {device!r}")


def available_devices() -> list[str]:
    """The devices of this machine: cpu, then cuda and cuda:0..N-1 when torch sees CUDA."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])


def check_device(device: Any) -> str:
    """`device` if this machine has it, else a ConfigError naming it and the devices there are: the one check
    of every command's --device (the CLI checks it as it parses, the experiments before they run)."""
    import torch

    valid = ", ".join(available_devices())
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ConfigError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N (here: {valid})")
    if device not in available_devices():
        why = (f"this machine has {torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else
               f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else
               "CUDA is not available (no GPU visible)")
        raise ConfigError(f"--device {device!r}: {why}; available devices here: {valid}")
    return device


def check_run_name(name: Any) -> None:
    """A run name is one plain directory name inside OUT: never a path, '.', '..' or hidden."""
    if not isinstance(name, str) or not name.strip() or name.startswith(".") or "\0" in name \
            or any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")):
        raise ConfigError(f"--name {name!r} is not a plain directory name: a run is written to OUT/NAME, so NAME "
                          f"must be non-empty, hold no '/' or '\\', and not start with '.' (no '.', '..')")


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:  # numpy is optional
        pass
