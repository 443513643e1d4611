"""Per-rank memory and step time of LoRA training under DDP and under FSDP2, 2 processes with gloo on the CPU.

    python -m benchmarks.scale_out [--out benchmarks/results] [--tiny] [--steps N]

A Llama of about 100M parameters (hidden 768, 10 layers, intermediate 2048, 12 heads, vocabulary 16000; random
weights, seed 0 on every rank), LoRA r = 16 (alpha = r) on q, k, v, o, gate, up, down of every layer, AdamW;
each rank trains on its own batch of 4 × 128 tokens, one torch thread per rank. DDP: the whole model on every
rank, the adapters' gradients all-reduced. FSDP2: `fully_shard` on each decoder layer and then the root, so each
rank keeps half of every weight and gathers a layer's whole weights only while it runs.

Each mode is one `torchrun --nproc_per_node 2` launch of this module. On every rank: the resident memory after
the imports (the baseline), after the model is built, adapted and wrapped or sharded (the weights' share), and the
peak during the steps (the kernel's high-water mark, reset before the first step through /proc/self/clear_refs);
the warm step's time and the timed steps' median; each step's loss, which must agree between the modes (the same
data and initial weights, so the same training up to float sums). Writes scale_out-cpu[-tiny].json and .md.

The ranks run with MALLOC_MMAP_THRESHOLD_=1048576: glibc's malloc then maps every block of 1 MiB or more on its
own and returns it when freed. By default it raises that threshold as blocks are freed and keeps later ones in
its heap, so the resident peak of FSDP2 (which gathers and frees each layer's weights twice a step) would measure
the heap glibc keeps rather than the tensors alive at once (measured so: peak 1.58 × DDP's).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=16000),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512),
}
TOKENS = {"llama-100m": (4, 128), "llama-tiny": (2, 16)}
R = 16
MODES = ("ddp", "fsdp2")
TARGETS = ("attn", "attn.o", "ffn", "ffn.gate")  # q, k, v; o; up, down; gate
MMAP_THRESHOLD = 1 << 20  # glibc maps every block from 1 MiB on its own, so a freed tensor leaves the resident set


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's peak resident size (VmHWM) to the current one; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(mode: str, model_name: str, steps: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptune import LoRA, attach
    baseline = _status_mb("VmRSS")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[model_name], max_position_embeddings=512))
    attach(model, {t: LoRA(R) for t in TARGETS})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    if mode == "ddp":
        step_model = DistributedDataParallel(model)
    else:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        step_model = model
    import gc
    gc.collect()
    held = _status_mb("VmRSS")
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch, seq = TOKENS[model_name]
    vocab = SHAPES[model_name]["vocab_size"]
    reset = _reset_peak()
    times, losses = [], []
    for step in range(steps + 1):  # step 0: the warm step
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1000 * rank + step))
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    record = {"rank": rank, "mode": mode, "parameters": total, "trainable": sum(p.numel() for p in trainable),
              "baseline_mb": baseline, "held_mb": held, "held_over_baseline_mb": held - baseline,
              "peak_mb": _status_mb("VmHWM"), "peak_reset": reset, "warm_s": times[0], "times_s": times[1:],
              "median_s": statistics.median(times[1:]), "losses": losses}
    record["peak_over_baseline_mb"] = record["peak_mb"] - baseline
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, model_name: str, steps: int, tmp: Path) -> list[dict]:
    out = tmp / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "benchmarks.scale_out", "--worker", mode, "--model", model_name,
           "--steps", str(steps), "--result", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    lines = [f"# scale_out — cpu ({env['device_name']})", "",
             f"- {env['date']}, 2 processes (gloo) of 1 torch thread on {env['cpu_count']} CPUs; torch {env['torch']}, "
             f"transformers {env['transformers']}, adaptune {env['adaptune']}",
             f"- model: Llama {s['model']} ({result['records'][0]['parameters']:,} parameters), LoRA r = {R} on q, k, v, "
             f"o, gate, up, down ({result['records'][0]['trainable']:,} trainable), AdamW, batch {s['batch']} × "
             f"{s['seq']} tokens per rank, 1 warm + {s['steps']} timed steps",
             "- MB: resident MiB of each rank; held = after the model is built, adapted and wrapped (DDP) or sharded "
             "(FSDP2), over the baseline after the imports; peak = the high-water mark during the steps, over the "
             f"baseline; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (glibc returns every freed block of 1 MiB or more)",
             "",
             "| mode | rank | held over baseline MB | peak over baseline MB | warm s | median s | losses agree |",
             "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['mode']} | {r['rank']} | {r['held_over_baseline_mb']:,.0f} | "
                     f"{r['peak_over_baseline_mb']:,.0f} | {r['warm_s']:.3f} | {r['median_s']:.3f} | "
                     f"{'yes' if result['losses_agree'] else 'NO'} |")
    lines += ["", f"FSDP2 / DDP, mean over ranks: held {result['ratios']['held']:.3f}, peak "
              f"{result['ratios']['peak']:.3f}, median step {result['ratios']['median_s']:.3f}; largest loss "
              f"difference between the modes {result['max_loss_diff']:.2e}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tiny", action="store_true", help="a tiny Llama, for smoke tests; files get -tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    model_name = args.model or ("llama-tiny" if args.tiny else "llama-100m")
    if args.worker:
        return worker(args.worker, model_name, args.steps, args.result)
    import tempfile

    from .common import environment
    from .report import write
    env = environment("cpu", 1, "float32")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            print(f"{mode}: 2 processes, {model_name}, {args.steps} steps", flush=True)
            records += _launch(mode, model_name, args.steps, Path(tmp))
    by = {m: [r for r in records if r["mode"] == m] for m in MODES}
    mean = lambda m, k: statistics.mean(r[k] for r in by[m])  # noqa: E731
    diffs = [abs(a - b) for ra, rb in zip(by["ddp"], by["fsdp2"]) for a, b in zip(ra["losses"], rb["losses"])]
    batch, seq = TOKENS[model_name]
    result = {"suite": "scale_out", "environment": env,
              "settings": {"model": model_name, "steps": args.steps, "batch": batch, "seq": seq, "r": R},
              "records": records, "max_loss_diff": max(diffs), "losses_agree": max(diffs) < 1e-3,
              "ratios": {k: mean("fsdp2", key) / mean("ddp", key) for k, key in
                         (("held", "held_over_baseline_mb"), ("peak", "peak_over_baseline_mb"),
                          ("median_s", "median_s"))}}
    stem = "scale_out-cpu" + ("-tiny" if args.tiny else "")
    for path in write(args.out, stem, result, markdown(result)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
