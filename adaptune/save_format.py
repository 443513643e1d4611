"""The file of a saved adaptation: component parameters (safetensors) with the stacks as JSON in its
metadata, written atomically. Below the adaptation: it reads only what an adaptation exposes
(state_dict, spec, task, model, use), so `Adaptation.save` and `adaptune.save` share it.

On a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`; the components are then DTensors in the
root's group) saving is a collective: every rank of the default process group calls it, the components are
gathered whole (DTensor.full_tensor()), rank 0 writes the one file and every rank returns its path once it is
there. Each such call begins with `agree`, one all_gather of what every rank is doing, so a rank that calls
something else, another path, or holds other components gives an AdaptuneError on every rank rather than a
hang, and an error on one rank (a file it cannot read) is raised on all of them.

A sharded checkpoint (`write_sharded` / `read_sharded`) is a torch.distributed.checkpoint (DCP) directory
of the components, each rank writing its own shards, plus `adaptune.json` (the metadata of the file format);
it reloads onto any number of ranks, one process included.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
import torch
from torch import Tensor, nn

from .errors import AdaptuneError, LoadError, WriteError
from .files import atomic_write, atomic_write_dir

FORMAT = "adaptune/1"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    cls = type(model)
    if fsdp_modules(model):  # fully_shard made the class FSDP<name>: record the model's own
        from torch.distributed.fsdp import FSDPModule
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return {"class": cls.__name__, "model_type": getattr(config, "model_type", None),
            "hidden_size": getattr(config, "hidden_size", None)}


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, tensors) of a saved adaptation; LoadError if it is not one."""
    path = Path(path)
    if path.is_dir():
        raise LoadError(f"{str(path)!r} is a directory; a saved adaptation is one .safetensors file "
                        f"(a PEFT adapter directory loads with import_peft)")
    if not path.is_file():
        raise LoadError(f"no saved adaptation at {str(path)!r}")
    try:
        with open(path, "rb"):
            pass
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("adaptune")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError as e:
        raise LoadError(f"cannot read {str(path)!r}: permission denied") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if raw is None:
        raise LoadError(f"{str(path)!r} holds no adaptune metadata (was it written by adaptune.save?)")
    return _check_meta(raw, path), tensors


def _check_meta(raw: str, path: Path) -> dict[str, Any]:
    """The metadata JSON, checked for the shape load() reads: a clear LoadError for anything else."""
    def bad(what: str) -> LoadError:
        return LoadError(f"{str(path)!r} has damaged adaptune metadata: {what}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise bad(f"a JSON object expected, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise LoadError(f"{str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    spec, model = meta.get("spec"), meta.get("model")
    if not isinstance(model, dict) or not isinstance(spec, dict):
        raise bad("'model' and 'spec' must be JSON objects")
    if not isinstance(spec.get("shared"), dict) or not isinstance(spec.get("tasks"), dict) or \
            not all(isinstance(t, dict) for t in spec["tasks"].values()):
        raise bad("'spec' must hold 'shared' (selector -> stack) and 'tasks' (name -> selector -> stack)")
    if not isinstance(meta.get("active"), (str, type(None))):
        raise bad(f"'active' must be a task name or null, got {meta.get('active')!r}")
    return meta


def check_finite(tensors: dict[str, Tensor], where: str) -> None:
    """LoadError naming the first tensor that holds NaN or inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoadError(f"{where}: tensor {name!r} holds NaN or inf; refusing to load it "
                            f"(pass allow_nonfinite=True to load it anyway)")


def check_state(own: dict[str, Tensor], given: dict[str, Tensor], what: str, needs: str,
                error: type[Exception] = LoadError) -> None:
    """`error` (LoadError) unless `given` has exactly the names and shapes of the state dict `own`: `what` names
    the given tensors' source, `needs` what they must fit (as "<what> does not match <needs>")."""
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise error(f"{what} does not match {needs}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = [f"{k}: saved {tuple(t.shape)}, model needs {tuple(own[k].shape)}"
             for k, t in given.items() if tuple(t.shape) != tuple(own[k].shape)]
    if wrong:
        raise error(f"{what} has tensors of other shapes than {needs}: " + "; ".join(wrong[:3]))


def _meta(adaptation: Any) -> dict[str, Any]:
    return {"format": FORMAT, "spec": adaptation.spec(), "active": adaptation.task,
            "model": fingerprint(adaptation.model)}


def write(adaptation: Any, path: str | os.PathLike) -> Path:
    """Write `adaptation`'s components (not the base weights) to one .safetensors file; returns its path.
    Sharded by FSDP2: a collective (see the module docstring)."""
    path = Path(path)
    sharded = is_sharded(adaptation)
    if sharded:
        agree("save", path, adaptation)
    with gathered(adaptation):
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adaptation.state_dict().items()}
    meta = _meta(adaptation)

    def write_file() -> None:
        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"adaptune": json.dumps(meta)}))
        except SafetensorError as e:
            raise WriteError(f"cannot save to {str(path)!r}: {e}") from e
    if sharded:
        on_rank0("save", path, adaptation, write_file)
    else:
        write_file()
    return path


def check_model(meta: dict[str, Any], model: nn.Module, where: str) -> None:
    """LoadError unless the saved `meta` was saved from a model of `model`'s type."""
    saved, here = meta["model"], fingerprint(model)
    if saved["model_type"] != here["model_type"]:
        raise LoadError(f"{where} was saved from a {saved['model_type'] or saved['class']} model; "
                        f"this model is {here['model_type'] or here['class']}")


def check_fits(meta: dict[str, Any], adaptation: Any, where: str) -> None:
    """LoadError unless the saved `meta` describes `adaptation`'s components: loading into an attached
    adaptation (a sharded one) takes values only, so the stacks must be the same."""
    check_model(meta, adaptation.model, where)
    if meta["spec"] != json.loads(json.dumps(adaptation.spec())):
        raise LoadError(f"{where} holds other components than the attached adaptation: saved "
                        f"{json.dumps(meta['spec'])[:300]}, attached {json.dumps(adaptation.spec())[:300]}; "
                        f"attach the saved stacks before fully_shard (or load(model, path) before it)")
    active = meta.get("active")
    if active is not None and active not in adaptation.task_names:
        raise LoadError(f"{where} names the active task {active!r}, which the attached adaptation lacks")


# ---- models sharded by FSDP2 --------------------------------------------------------------------

def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that FSDP2's fully_shard manages (none without an initialized process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return []
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(adaptation: Any) -> bool:
    """Whether `adaptation`'s model is sharded by FSDP2. AdaptuneError when it is but the components are not
    DTensors: attached after fully_shard, FSDP does not manage them (nor reduce their gradients)."""
    managed = fsdp_modules(adaptation.model)
    if not managed:
        return False
    from torch.distributed.tensor import DTensor
    for module in managed:  # an eval forward leaves the root's parameters gathered: shard them again
        module.reshard()
    if not any(isinstance(p, DTensor) for p in adaptation.parameters()):
        raise AdaptuneError("the model is sharded by fully_shard but its adaptation is not: it was attached after "
                            "fully_shard, so FSDP neither shards its components nor reduces their gradients across "
                            "the ranks; attach (or load) before fully_shard")
    return True


def full(tensor: Tensor) -> Tensor:
    """A DTensor gathered whole (a collective: every rank calls it); any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `module`'s DTensor parameters are whole tensors, gathered on every rank (a collective,
    in registration order); afterwards the sharded ones are back. Without DTensors, nothing changes."""
    whole: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for p in module.parameters():
            if hasattr(p, "full_tensor"):
                whole[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=False)
    swapped = [(m, name, p) for m in module.modules() for name, p in m._parameters.items()
               if p is not None and id(p) in whole]
    try:
        for m, name, p in swapped:
            m._parameters[name] = whole[id(p)]
        yield module
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def agree(what: str, path: Any, adaptation: Any, error: BaseException | None = None,
          failure: type[AdaptuneError] = AdaptuneError) -> None:
    """Every rank enters `what` on `path` with the same components, as one all_gather: AdaptuneError on every
    rank otherwise (a rank elsewhere times out or drops the connection; the error says so). `error`, a
    rank's own failure, is raised there and as `failure` on the other ranks."""
    dist = torch.distributed
    layout = hashlib.sha1(repr([(k, tuple(v.shape)) for k, v in adaptation.state_dict().items()]).encode()).hexdigest()
    mine = (what, str(path), layout, None if error is None else f"{type(error).__name__}: {error}")
    seen: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(seen, mine)
    except RuntimeError as e:
        raise AdaptuneError(f"{what} of a sharded model is a collective that every rank calls together, and the "
                            f"ranks did not meet ({e}); call {what} on every rank (not under `if rank == 0:`)") from e
    if len({(w, p) for w, p, _, _ in seen}) > 1:
        calls = "; ".join(f"rank {r}: {w} {p!r}" for r, (w, p, _, _) in enumerate(seen))
        raise AdaptuneError(f"{what} of a sharded model is a collective: every rank calls it with the same path "
                            f"at the same point; got {calls}")
    if len({lay for _, _, lay, _ in seen}) > 1:
        raise AdaptuneError(f"{what}: the ranks' adaptations differ (other component names or shapes); attach the "
                            f"same components on every rank before fully_shard")
    if error is not None:
        raise error
    failed = [(r, msg) for r, (_, _, _, msg) in enumerate(seen) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise failure(f"{what} {str(path)!r} failed on rank {rank}: {msg}")


def on_rank0(what: str, path: Any, adaptation: Any, write: Callable[[], object],
             failure: type[AdaptuneError] = WriteError) -> None:
    """Call `write` on rank 0 alone; every rank returns after it (agree: its error is every rank's)."""
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            write()
        except Exception as e:
            error = e
    agree(what, path, adaptation, error, failure)


# ---- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------------

SHARDED_META = "adaptune.json"
_DCP_FILE = (".metadata", SHARDED_META)  # with the ranks' __<rank>_<n>.distcp files


def _dcp_own(name: str) -> bool:
    return name in _DCP_FILE or (name.startswith("__") and name.endswith((".distcp", ".metadata")))


@contextmanager
def _one_process(alone: bool) -> Iterator[None]:
    """DCP in one process (no_dist) warns that it assumes one process: it is meant, so silence that."""
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def write_sharded(adaptation: Any, directory: str | os.PathLike) -> Path:
    """Write `adaptation`'s components as a DCP directory, each rank its own shards (no gathering): a
    collective when sharded. The directory is written in a sibling and swapped in by rank 0 (files.py) once
    every rank's shards are there; a directory holding other files is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    directory = Path(directory)
    state, meta, sharded = adaptation.state_dict(), _meta(adaptation), is_sharded(adaptation)
    place: list[str | None] = [None]  # the sibling rank 0 writes in, told to the other ranks

    def check_target() -> None:
        if directory.exists() and not directory.is_dir():
            raise WriteError(f"cannot save a sharded checkpoint to {str(directory)!r}: it is a file, not a directory")
        extra = sorted(n for n in os.listdir(directory) if not _dcp_own(n)) if directory.is_dir() else []
        if extra:
            raise WriteError(f"cannot save a sharded checkpoint to {str(directory)!r}: it holds other files "
                             f"({', '.join(extra[:5])}); give a new directory or an earlier checkpoint's")

    def save(tmp: Any) -> None:
        try:
            with _one_process(not sharded):
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not sharded)
        except CheckpointException as e:
            raise WriteError(f"cannot save a sharded checkpoint to {str(directory)!r}: {e}") from e

    def write(tmp: Path) -> None:
        if sharded:
            place[0] = str(tmp)
            torch.distributed.broadcast_object_list(place, src=0)
        save(tmp)
        with open(tmp / SHARDED_META, "w", encoding="utf-8") as f:
            json.dump(meta, f)
    if not sharded:
        check_target()
        atomic_write_dir(directory, write)
        return directory
    agree("save_sharded", directory, adaptation)
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            check_target()
            atomic_write_dir(directory, write)
        except Exception as e:
            error = e
        if place[0] is None:  # failed before the others heard where to write
            torch.distributed.broadcast_object_list(place, src=0)
    else:
        torch.distributed.broadcast_object_list(place, src=0)
        if place[0] is not None:
            try:
                save(place[0])
            except Exception as e:
                error = e
    agree("save_sharded", directory, adaptation, error, WriteError)
    return directory


def read_sharded(adaptation: Any, directory: str | os.PathLike) -> None:
    """Load a directory of write_sharded into `adaptation` (values, and the saved active task); every rank
    reads its own shards, on any number of ranks. The stacks and shapes are checked first (LoadError)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    directory = Path(directory)
    where, sharded, error, meta = repr(str(directory)), is_sharded(adaptation), None, None
    try:
        if not directory.is_dir():
            raise LoadError(f"no sharded checkpoint at {where} (save_sharded writes a directory)")
        try:
            raw = (directory / SHARDED_META).read_text(encoding="utf-8")
        except OSError as e:
            raise LoadError(f"{where} is not a sharded adaptune checkpoint: cannot read its {SHARDED_META} "
                            f"({e})") from e
        meta = _check_meta(raw, directory)
        check_fits(meta, adaptation, where)
        try:
            saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        except Exception as e:
            raise LoadError(f"{where} has no readable checkpoint metadata: {e}") from e
        shapes = {k: torch.empty(tuple(m.size), device="meta") for k, m in saved.items() if hasattr(m, "size")}
        check_state(adaptation.state_dict(), shapes, where, "the attached components")
    except Exception as e:
        error = e
    if sharded:
        agree("load_sharded", directory, adaptation, error, LoadError)
    elif error is not None:
        raise error
    state = adaptation.state_dict()
    try:
        with _one_process(not sharded):
            dcp.load(state, checkpoint_id=str(directory), no_dist=not sharded)
    except CheckpointException as e:
        raise LoadError(f"cannot load the sharded checkpoint {where}: {e}") from e
    adaptation.load_state_dict(state, strict=True)
    adaptation.use(meta.get("active"))
