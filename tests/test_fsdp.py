"""FSDP2 on CPU: 2 processes (gloo) under torchrun, fully_shard on each decoder layer of a tiny Llama and the root.

One launch (tests/fsdp_worker.py) runs every check on the ranks; the tests below read what each rank saw and
compare it with one process: training LoRA, DoRA, an Adapter, Prefix, PromptTuning and per-task components in
route()d batches (a sample of each task per batch, beside a shared LoRA) equals one process on the mean of both
shards' losses; the file saved under FSDP2 loads in one process as the trained adapter, bit for bit; a sharded (DCP)
checkpoint and a load of the saved file refill the sharded components exactly; export_peft writes what one process
writes; merge is refused; mismatched calls give an AdaptuneError on every rank instead of a hang.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import LR, METHODS, STEPS, build, loss_of, shard
from helpers import perturb, tiny_llama
from safetensors.torch import load_file

from adaptune import MergeError, export_peft, load

WORKER = Path(__file__).with_name("fsdp_worker.py")
# FSDP averages the ranks' gradients, (g0 + g1) / 2; one process's mean of the two shards' losses gives
# g0 / 2 + g1 / 2: equal in float32 (halving is exact), so the components come out equal bit for bit (measured:
# max |diff| 0.0 for all three methods). ATOL allows for kernels that round differently with another memory
# layout: the values stay below 0.5 (float32 spacing there 3e-8: ATOL is ~30 of those), while every tensor's
# update over the steps is at least 2e-5 (checked below to exceed 10 * ATOL), so a wrong reduction shows
ATOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """(out, rank 0's results, rank 1's results) of one torchrun launch of the worker."""
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r0["backend"]) == (0, 1, 2, "gloo")
    return out, r0, r1


def reference(method: str) -> tuple[dict, dict, dict]:
    """One process: the components at the start, after STEPS SGD steps on the mean of both ranks' losses (what
    FSDP's averaged gradient is), and after one step more."""
    model, adaptation = build(method)
    init = {k: v.clone() for k, v in adaptation.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    states = []
    for step in range(STEPS + 1):
        loss = sum(loss_of(model, adaptation, ids) for ids in (shard(0, step), shard(1, step))) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        states.append({k: v.clone() for k, v in adaptation.state_dict().items()})
    return init, states[STEPS - 1], states[STEPS]


def one_process(path: Path):
    """The saved file loaded onto a fresh, unsharded tiny Llama."""
    model = tiny_llama(seed=0)
    return model, load(model, path)


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", list(METHODS))
def test_training_equals_one_process(ranks, method):
    _, r0, r1 = ranks
    assert r0[method]["sharded"] == "DTensor"  # the components were in FSDP's shards
    assert_states_equal(r0[method]["final"], r1[method]["final"])
    init, final, after = reference(method)
    assert r0[method]["final"].keys() == final.keys()
    for name, value in r0[method]["final"].items():
        assert (value - init[name]).abs().max() > 10 * ATOL, name  # every component trained, beyond ATOL
        torch.testing.assert_close(value, final[name], rtol=0, atol=ATOL, msg=name)
    for name, value in r0[method]["after"].items():  # one step more, after the saves and loads
        torch.testing.assert_close(value, after[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_under_fsdp_loads_in_one_process(ranks, method, tmp_path):
    out, r0, r1 = ranks
    path = out / f"{method}.safetensors"
    assert r0[method]["saved"] == r1[method]["saved"] == str(path)  # every rank returns the path
    assert (r0[method]["writes"], r1[method]["writes"]) == (1, 0)  # written once, by rank 0
    model, adaptation = one_process(path)
    assert_states_equal(adaptation.state_dict(), r0[method]["final"])
    again = adaptation.save(tmp_path / "again.safetensors")  # the same file as one process writes
    assert again.read_bytes() == path.read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("method", list(METHODS))
def test_sharded_checkpoint_round_trip(ranks, method):
    out, r0, r1 = ranks
    for r in (r0, r1):
        assert r[method]["dcp"] == str(out / f"dcp-{method}")
        assert r[method]["changed"]  # the components were changed before load_sharded
        assert r[method]["dcp_local_exact"] and r[method]["dcp_exact"]  # each rank's shards, and whole
    assert sorted(os.listdir(out / f"dcp-{method}")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "adaptune.json"]
    model, adaptation = build(method)  # a 2-rank checkpoint reloads in one process
    adaptation.load_sharded(out / f"dcp-{method}")
    assert_states_equal(adaptation.state_dict(), r0[method]["final"])


@pytest.mark.parametrize("method", list(METHODS))
def test_load_into_sharded_components(ranks, method):
    _, r0, r1 = ranks
    for r in (r0, r1):
        assert r[method]["load_returned"] and r[method]["load_exact"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_peft_as_one_process(ranks, method, tmp_path):
    out, r0, r1 = ranks
    sharded = out / f"peft-{method}"
    assert r0[method]["peft"] == r1[method]["peft"] == str(sharded)
    model, _ = one_process(out / f"{method}.safetensors")
    one = export_peft(model, tmp_path / "one")
    assert sorted(os.listdir(sharded)) == sorted(os.listdir(one))
    config = [json.loads((d / "adapter_config.json").read_text()) for d in (sharded, one)]
    assert config[0] == config[1]
    assert_states_equal(load_file(sharded / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors"))


def test_merge_refused_and_done_in_one_process(ranks):
    out, r0, r1 = ranks
    for r in (r0, r1):
        for method in METHODS:
            message = r[method]["merge"]
            assert message.startswith("MergeError: cannot merge a model sharded by fully_shard"), message
            assert "load(model, path)" in message and "export_peft" in message
    model, adaptation = one_process(out / "lora.safetensors")  # what the message says to do
    ids = shard(0, 0)
    with torch.no_grad():
        unmerged = model(ids).logits
        adaptation.merge()
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-5)


def test_mismatched_calls_are_clear_errors_on_every_rank(ranks):
    out, r0, r1 = ranks
    for rank, r in enumerate((r0, r1)):
        e = r["lora"]["errors"]
        assert e["other_spec"].startswith("LoadError:") and "other components than the attached" in e["other_spec"]
        assert e["shapes"].startswith("LoadError:") and "other shapes" in e["shapes"]
        assert e["busy_dir"].startswith("WriteError:") and "notes.txt" in e["busy_dir"]
        assert e["paths"].startswith("AdaptuneError: save of a sharded model is a collective") and \
            "rank0-own" in e["paths"] and "rank1-own" in e["paths"]
        assert "rank 0: save" in e["calls"] and "rank 1: load" in e["calls"]
        assert e["missing_dir"].startswith("LoadError: no sharded checkpoint")
        assert e["other_dcp"].startswith("LoadError:") and "other components" in e["other_dcp"]
        assert e["bare_load"].startswith("LoadError: this model is sharded by fully_shard and has no adaptation")
        assert e["late_attach"].startswith("ConfigError: cannot attach on a model already sharded by fully_shard")
        assert e["late_attach_left_nothing"] == "False"
        assert e["still_together"] == str(out / "lora-again.safetensors")  # the ranks went on together
    assert not any((out / n).exists() for n in ("rank0-own.safetensors", "rank1-own.safetensors", "late.safetensors"))
    assert os.listdir(out / "busy") == ["notes.txt"]
    alone = (out / "alone.txt").read_text()  # rank 0 saved while rank 1 had left
    assert alone.startswith("AdaptuneError: save of a sharded model is a collective that every rank calls together")
    assert "not under `if rank == 0:`" in alone and not (out / "alone.safetensors").exists()


def test_sharded_checkpoint_in_one_process(tmp_path):
    """Without a process group save_sharded writes one rank's checkpoint; a second save replaces the first whole."""
    model, adaptation = build("lora")
    first = {k: v.clone() for k, v in adaptation.state_dict().items()}
    assert adaptation.save_sharded(tmp_path / "ck") == tmp_path / "ck"
    perturb(adaptation, seed=5)
    second = {k: v.clone() for k, v in adaptation.state_dict().items()}
    adaptation.save_sharded(tmp_path / "ck")  # over the earlier checkpoint
    assert sorted(os.listdir(tmp_path / "ck")) == [".metadata", "__0_0.distcp", "adaptune.json"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no sibling left
    model, adaptation = build("lora")
    assert_states_equal(adaptation.state_dict(), first)
    assert adaptation.load_sharded(tmp_path / "ck") is adaptation
    assert_states_equal(adaptation.state_dict(), second)
    adaptation.merge()
    with pytest.raises(MergeError, match="cannot load a checkpoint while updates are merged"):
        adaptation.load_sharded(tmp_path / "ck")
