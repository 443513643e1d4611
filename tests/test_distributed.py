"""Scale-out on CPU: 2 processes (gloo) under torchrun with DDP and under accelerate launch.

Each rank trains distributed_worker.STEPS steps on its own data shard; the ranks' gradients (after the
all-reduce) and final component weights must be identical, changed from the start, and equal (to float
tolerance) to one process training on the mean of the two shards' losses. Per-task components need
find_unused_parameters=True: without it DDP stops at the second step, which is checked too.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import STEPS, build, shard
from test_experiments_run import tiny_data  # noqa: F401  (a fixture)

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, case: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port]
    else:  # --multi_gpu is accelerate's torchrun launcher; Accelerator(cpu=True) makes it MULTI_CPU with gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HOME": str(out / "hf")}  # no user accelerate config is read
    return subprocess.run([*cmd, str(WORKER), launcher, case, str(out), *flags], cwd=out, env=env,
                          capture_output=True, text=True, timeout=180)


def reference(case: str) -> tuple[list[dict], dict]:
    """One process, the same steps on the mean of both ranks' losses: what DDP's averaged gradient is."""
    torch.use_deterministic_algorithms(True)
    model, adaptation = build(case)
    names = {p: n for n, p in model.adaptune.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = []
    for step in range(STEPS):
        if case == "tasks":
            adaptation.use("ab"[step % 2])
        loss = sum(model(ids, labels=ids).loss for ids in (shard(0, step), shard(1, step))) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append({names[p]: None if p.grad is None else p.grad.detach().clone() for p in model.adaptune.parameters()})
        opt.step()
    return grads, model.adaptune.state_dict()


def check(out: Path, case: str) -> None:
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["wrapped"] == "DistributedDataParallel" and "gloo" in r0["how"]
    ref_grads, ref_final = reference(case)
    for step, (g0, g1, gr) in enumerate(zip(r0["grads"], r1["grads"], ref_grads, strict=True)):
        assert g0.keys() == g1.keys() == gr.keys()
        for name in g0:
            if case == "tasks" and name.startswith(f"tasks.{'ba'[step % 2]}."):  # the inactive task: no gradient
                assert g0[name] is None and g1[name] is None and gr[name] is None, (step, name)
                continue
            assert torch.equal(g0[name], g1[name]), (step, name)
            torch.testing.assert_close(g0[name], gr[name], rtol=1e-4, atol=1e-6, msg=f"step {step} {name}")
    assert r0["final"].keys() == r1["final"].keys() == ref_final.keys()
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name]), name
        assert not torch.equal(r0["final"][name], r0["init"][name]), name  # every component trained
        torch.testing.assert_close(r0["final"][name], ref_final[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("launcher,case,flags", [("torchrun", "shared", ()),
                                                 ("torchrun", "tasks", ("--find-unused",)),
                                                 ("accelerate", "tasks", ("--find-unused",))],
                         ids=["torchrun-shared", "torchrun-tasks", "accelerate-tasks"])
def test_ranks_agree(tmp_path, launcher, case, flags):
    done = launch(launcher, case, tmp_path, *flags)
    assert done.returncode == 0, done.stderr[-4000:]
    check(tmp_path, case)


def test_per_task_without_find_unused_parameters_fails(tmp_path):
    """What the README warns of: alternating tasks under plain DDP stop at the second step."""
    done = launch("torchrun", "tasks", tmp_path)
    assert done.returncode != 0
    assert "find_unused_parameters=True" in done.stderr
    assert not (tmp_path / "rank0.pt").exists()


@pytest.fixture(scope="module")
def no_dropout_model_dir(tmp_path_factory):
    """A tiny random BERT (MiniLM's tokenizer) without dropout, so 2 ranks and 1 process compute the same."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adaptune.models import minilm_path
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=len(tok), max_position_embeddings=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0))
    d = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("batching,fsdp", [("round-robin", False), ("mixed", False), ("round-robin", True),
                                           ("mixed", True)], ids=["round-robin", "mixed", "fsdp", "fsdp-mixed"])
def test_run_multitask_under_torchrun(no_dropout_model_dir, tiny_data, tmp_path, batching, fsdp):  # noqa: F811
    """`torchrun --no-python -- adaptune run multitask` (`--` keeps torchrun from reading `--r` as its `--rdzv...`): each batch split over 2 ranks (5 examples in batches of 4:
    the last one leaves rank 1 without any), one run directory, the same adapters, heads and dev metrics as one
    process on the whole batches (to float tolerance); round robin, and mixed batches (every batch mixes the
    datasets, each sample routed to its dataset's adapters); and with --fsdp (FSDP2 shards the BERT's layers and
    the components; in mixed batches a rank's share often lacks a dataset, whose adapter then gets a zero gradient
    there)."""
    import json

    from safetensors.torch import load_file

    from adaptune.experiments.common.methods import Method
    from adaptune.experiments.multitask.run import ExperimentConfig, run
    settings = dict(model=no_dropout_model_dir, data_dir=tiny_data, epochs=2, train_limit=5, dev_limit=8,
                    max_length=24, batch_size=4, seed=0, batching=batching)
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cli = Path(sys.executable).with_name("adaptune")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--no-python", "--", str(cli), "run", "multitask", "--method", "lora+adapter",
           "--r", "2", "--dim", "4", "--name", "ddp", "--out", str(tmp_path / "runs"), *opts, *(["--fsdp"] * fsdp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("saved to") == 1  # rank 0 prints, rank 1 is quiet
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    ddp = json.loads((tmp_path / "runs" / "ddp" / "results.json").read_text())
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo", "fsdp": fsdp}
    assert ddp["train_examples"] == 2 * 3 * 5

    one = run(ExperimentConfig(Method("lora+adapter", r=2, dim=4), name="one", out=str(tmp_path / "one"), **settings))
    assert one["distributed"] == {"world_size": 1, "backend": None, "fsdp": False}
    for f in ("adapters.safetensors", "heads.safetensors"):
        a, b = load_file(tmp_path / "runs" / "ddp" / f), load_file(tmp_path / "one" / "one" / f)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{f} {k}")
    for t, r in one["tasks"].items():
        assert ddp["tasks"][t]["dev"] == pytest.approx(r["dev"], rel=1e-3, abs=1e-4), t
        assert ddp["tasks"][t]["train_loss_by_epoch"] == pytest.approx(r["train_loss_by_epoch"], rel=1e-4), t


def test_fsdp_is_refused_in_one_process_and_with_what_it_cannot_shard(tmp_path):
    from adaptune.errors import ConfigError
    from adaptune.experiments.common.methods import Method
    from adaptune.experiments.multitask.run import ExperimentConfig, run
    with pytest.raises(ConfigError, match="--fsdp shards the model across torchrun's ranks, and this run has one "
                                          "process"):
        run(ExperimentConfig(Method("lora"), fsdp=True, out=str(tmp_path)))
    assert not any(tmp_path.iterdir())
    for kw, what in (({"method": Method("full")}, "--method full"), ({"quantize": "nf4"}, "--quantize nf4")):
        with pytest.raises(ConfigError, match=f"--fsdp shards a float frozen base .*; {what}"):
            ExperimentConfig(fsdp=True, **kw)
