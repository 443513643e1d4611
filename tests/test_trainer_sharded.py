"""AdapterTrainer under DDP, Accelerate's FSDP2 plugin and DeepSpeed ZeRO-2 / ZeRO-3: 2 CPU processes (gloo).

One torchrun launch of tests/trainer_worker.py per engine trains the tiny Llama (LoRA with dropout on attn, an
Adapter on ffn; AdamW, 4 steps of 2 samples per rank), once uninterrupted and once interrupted at its step-2
checkpoint, then resumed by a new trainer on a new model. The tests read what each rank saw: the resumed run ends
bit-exact with the uninterrupted one; the checkpoint's adapters.safetensors holds every component whole (never an
empty partition) and equal to the components gathered at that step, next to the engine's own optimizer state,
which holds the components' state only; the engines train alike; save_model writes a file one process loads; a
checkpoint of another engine is refused. DeepSpeed runs on its CPU accelerator (its tests skip without it).
A task column (multitask routing) under these engines: tests/test_multitask_sharded.py.
"""
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, two_ranks
from safetensors.torch import load_file
from trainer_worker import ENGINES, SAVE_EVERY, STEPS, adapted

from adaptune import load

WORKER = Path(__file__).with_name("trainer_worker.py")
CHECKPOINT = f"checkpoint-{SAVE_EVERY}"
# The engines reduce the same gradients in other orders (DDP's buckets, FSDP2's reduce-scatter, ZeRO's partitions,
# each clipping the norm its own way): after 4 AdamW steps the components differ from DDP's by at most 2.6e-7
# (measured; they lie below 0.5, where float32's spacing is 3e-8). ATOL is ~40 times that, while every tensor
# moves by more than 100 * ATOL over the run (checked), so a wrong reduction or a lost update shows
ATOL = 1e-5


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """engine -> (engine, out, rank 0's results, rank 1's results) of one torchrun launch of the worker, launched
    when first asked for."""
    done = {}

    def launched(engine: str):
        if engine not in done:
            done[engine] = launch(engine, tmp_path_factory.mktemp(engine))
        return done[engine]
    return launched


def launch(engine: str, out: Path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    return engine, out, *two_ranks(WORKER, engine, out)


@pytest.fixture(scope="module", params=ENGINES)
def run(request, launches):
    return launches(request.param)


@pytest.fixture(scope="module")
def ddp(launches):
    """DDP's final components: the reference of the other engines."""
    return launches("ddp")[2]["whole"]


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_engine_ran_and_held_the_components_its_way(run):
    engine, _, r0, r1 = run
    seen = {"ddp": {"fsdp": False, "deepspeed": False}, "fsdp2": {"fsdp": True, "deepspeed": False}}
    assert r0["engine_seen"] == r1["engine_seen"] == seen.get(engine, {"fsdp": False, "deepspeed": True})
    held = {"ddp": "whole", "fsdp2": "DTensor", "zero2": "whole", "zero3": "partitioned"}[engine]
    assert r0["held"] == r1["held"] == held  # zero3: every component an empty partition between steps


def test_resumed_run_ends_bit_exact(run):
    _, _, r0, r1 = run
    for r in (r0, r1):
        assert r["steps"] == STEPS
        assert_equal(r["resumed"], r["whole"])
        assert_equal(r["after_refusal"], r["resumed"])  # the refused resume changed nothing
    assert_equal(r0["whole"], r1["whole"])  # the ranks hold the same components
    start, whole = r0["resumed_start"], r0["whole"]
    assert all(not torch.equal(start[k], whole[k]) for k in whole)  # the checkpoint overwrote other components


def test_checkpoint_holds_every_component_whole(run):
    """adapters.safetensors: full-size, non-empty tensors equal to the components gathered at the checkpoint's step."""
    _, out, r0, r1 = run
    saved = load_file(out / "cut" / CHECKPOINT / "adapters.safetensors")
    shapes = {k: v.shape for k, v in adapted(seed=1).adaptune.state_dict().items()}  # one process's components
    assert {k: v.shape for k, v in saved.items()} == shapes
    assert all(v.numel() > 0 for v in saved.values())
    assert_equal(saved, r0["cut"])
    assert_equal(saved, r1["cut"])
    assert not torch.equal(saved[next(iter(saved))], r0["whole"][next(iter(saved))])  # step 2, not the end


def tensors_and_names(obj, found=None):
    """Every tensor (path -> tensor) and every string in a loaded checkpoint file."""
    found = found if found is not None else ({}, set())
    if isinstance(obj, torch.Tensor):
        found[0][f"#{len(found[0])}"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                found[1].add(k)
            tensors_and_names(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensors_and_names(v, found)
    elif isinstance(obj, str):
        found[1].add(obj)
    return found


def test_checkpoint_holds_no_base_weight(run):
    """Beside the adapters, the engine's optimizer state: the components' state alone (Adam's moments; DeepSpeed also
    keeps fp32 masters), no file of the model's weights, no base parameter named anywhere."""
    engine, out, _, _ = run
    ckpt = out / "cut" / CHECKPOINT
    model = adapted(seed=1)
    params = dict(model.named_parameters())
    base = {n for n in params if not n.startswith("adaptune.")}
    components = sum(p.numel() for n, p in params.items() if n.startswith("adaptune."))
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert not [f for f in files if "model.safetensors" in f or "pytorch_model" in f or f == "config.json"], files
    optimizer = {"ddp": ["optimizer.pt"], "fsdp2": ["optimizer.bin"],
                 "zero2": [f"global_step{SAVE_EVERY}/mp_rank_00_model_states.pt"] +
                          [f"global_step{SAVE_EVERY}/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)],
                 "zero3": [f"global_step{SAVE_EVERY}/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                           for r in (0, 1) for kind in ("model", "optim")]}[engine]
    assert set(optimizer) <= set(files), files
    floats, placeholders = 0, 0
    for name in files:
        if not name.endswith((".pt", ".pth", ".bin")):
            continue
        tensors, strings = tensors_and_names(torch.load(ckpt / name, map_location="cpu", weights_only=False))
        assert not strings & base, (name, sorted(strings & base)[:3])
        floats += sum(t.numel() for t in tensors.values() if t.is_floating_point())
        placeholders += sum(1 for t in tensors.values() if t.is_floating_point() and t.numel() == 0)
    # the components' values, Adam's two moments, DeepSpeed's fp32 masters; a few step counters
    assert components < floats <= 4 * components + 64, (floats, components)
    # ZeRO-3's own module state lists each component as an empty placeholder (on each rank's file), as every ZeRO-3
    # checkpoint does: the values are its fp32 partitions beside, and the whole components are adapters.safetensors
    assert placeholders == (2 * len(model.adaptune.state_dict()) if engine == "zero3" else 0)
    size = (ckpt / "adapters.safetensors").stat().st_size
    assert size < 4 * components + 4096, size  # float32 parameters and a JSON header


def test_engines_train_alike(run, ddp):
    """Each engine's uninterrupted run ends where DDP's does (to ATOL), and every component trained well beyond it."""
    engine, _, r0, _ = run
    start, whole = r0["start"], r0["whole"]
    for k in whole:
        assert (whole[k] - start[k]).abs().max() > 100 * ATOL, k
        torch.testing.assert_close(whole[k], ddp[k], rtol=0, atol=ATOL, msg=f"{engine}: {k}")


def test_save_model_loads_in_one_process(run):
    _, out, r0, _ = run
    model = tiny_llama(seed=0)
    assert_equal(load(model, out / "final" / "adapters.safetensors").state_dict(), r0["resumed"])


def test_checkpoint_of_another_engine_is_refused(run):
    engine, _, r0, r1 = run
    wrote = {"ddp": "FSDP2", "fsdp2": "DeepSpeed"}.get(engine, "one process or DDP")
    runs = {"ddp": "one process or DDP", "fsdp2": "FSDP2"}.get(engine, "DeepSpeed")
    for r in (r0, r1):
        assert r["other"].startswith(f"LoadError: '{r['other'].split(chr(39))[1]}' holds the optimizer state that "
                                     f"{wrote} writes, and this trainer runs {runs}, which cannot read it"), r["other"]
