"""Per-op benchmarks on large square linears and bottleneck adapters.

lora / dora: forward + backward (dX and the factors' gradients; W is frozen) of one Linear(d, d) with r = 16,
through PEFT's layer or adaptune's (reference path and kernel path): d = 4096 on CPU, 4096 and 8192 on CUDA;
beside them the frozen Linear alone (forward + dX), the floor every adapted layer pays.
bottleneck: y = h + up(relu(down(h))) at hidden d, bottleneck 64/128/256, adaptune's op on the kernel path vs
the eager PyTorch reference; forward alone (inference, where the effective memory bandwidth = minimal bytes
moved / time is reported) and forward + backward.
"""
from __future__ import annotations

import torch
from torch import nn

from .models import dtype_for
from .train_step import adaptune_paths
from .worker import Built, Case, Skip

NAME = "ops"
SIZES = {  # (hidden sizes, rank, tokens for lora/dora, bottleneck dims, tokens for the bottleneck)
    "cuda": ((4096, 8192), 16, 2048, (64, 128, 256), 16384),
    "cpu": ((4096,), 16, 1024, (64, 128, 256), 1024),
    "tiny": ((256,), 4, 32, (16,), 64),
}
INNER = 20  # on CUDA each timed sample is the mean of 20 back-to-back steps (an op takes well under 1 ms)


def cases(device: str, kernels: bool, tiny: bool = False, quick: bool = False) -> list[list[Case]]:
    """One group per hidden size for the linears, one per hidden size and bottleneck dim for the adapters."""
    hiddens, r, tokens, dims, bn_tokens = SIZES["tiny" if tiny else device]
    n = INNER if device == "cuda" else 1
    groups = []
    for d in hiddens:
        frozen = {"op": "frozen", "hidden": d, "r": 0, "tokens": tokens, "mode": "fwd+bwd", "impl": "torch", "path": "-"}
        linear = [Case(NAME, f"frozen {d} linear", frozen, "off", n)]  # the floor: the base layer's own fwd+bwd
        for op in ("lora", "dora"):
            base = {"op": op, "hidden": d, "r": r, "tokens": tokens, "mode": "fwd+bwd"}
            linear.append(Case(NAME, f"{op} {d} peft", {**base, "impl": "peft", "path": "-"}, "off", n))
            for path, mode in adaptune_paths(kernels):
                linear.append(Case(NAME, f"{op} {d} adaptune [{path}]", {**base, "impl": "adaptune", "path": path},
                                   mode, n))
        groups.append(linear)
    for d in hiddens:
        for m in dims[:1] if quick else dims:
            group = []
            for mode in ("fwd", "fwd+bwd"):
                base = {"op": "bottleneck", "hidden": d, "bottleneck": m, "tokens": bn_tokens, "mode": mode}
                group.append(Case(NAME, f"bottleneck {d} m={m} {mode} eager",
                                  {**base, "impl": "eager", "path": "reference"}, "off", n))
                group.append(Case(NAME, f"bottleneck {d} m={m} {mode} kernels",
                                  {**base, "impl": "adaptune", "path": "kernels"}, "require", n))
            groups.append(group)
    return groups


def _adapted_linear(op: str, impl: str, d: int, r: int) -> nn.Module:
    """One frozen Linear(d, d) with a rank-r LoRA or DoRA from PEFT or adaptune, or none (impl "torch")."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(d, d).requires_grad_(False)
    if impl == "torch":
        return holder  # no adapter: the frozen layer alone
    if impl == "peft":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise Skip("Hugging Face PEFT is not installed (pip install peft)") from e
        get_peft_model(holder, LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], use_dora=op == "dora"))
    else:
        from adaptune import DoRA, LoRA, attach
        attach(holder, {"proj": (DoRA if op == "dora" else LoRA)(r)})
    return holder


def _linear(params: dict, device: str) -> Built:
    d, tokens, dtype = params["hidden"], params["tokens"], dtype_for(device)
    holder = _adapted_linear(params["op"], params["impl"], d, params["r"]).to(device=device, dtype=dtype)
    layer = holder.proj  # PEFT swaps in its layer; adaptune routes the same module's forward
    trainable = [p for p in holder.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype)

    def step() -> None:
        for p in (*trainable, x):
            p.grad = None
        layer(x).backward(grad)

    return Built(step, {"trainable": sum(p.numel() for p in trainable), "tokens": tokens})


def _bottleneck(params: dict, device: str) -> Built:
    from adaptune import ops
    d, m, tokens, dtype = params["hidden"], params["bottleneck"], params["tokens"], dtype_for(device)
    fn = ops.bottleneck if params["impl"] == "adaptune" else ops.reference.bottleneck
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    h = rand(tokens, d, std=1.0)
    weights = [rand(m, d), rand(m), rand(d, m), rand(d)]  # down W, down b, up W, up b
    elt = h.element_size()
    info = {"trainable": sum(w.numel() for w in weights), "tokens": tokens,
            "bytes": (2 * h.numel() + sum(w.numel() for w in weights)) * elt}  # read h, write y, weights
    if params["mode"] == "fwd":
        def step() -> None:
            with torch.inference_mode():
                fn(h, h, *weights, 1.0, "relu")  # serial placement: the input is the residual
        return Built(step, info)
    for t in (h, *weights):
        t.requires_grad_(True)
    grad = rand(tokens, d, std=1.0)

    def train() -> None:
        for t in (h, *weights):
            t.grad = None
        fn(h, h, *weights, 1.0, "relu").backward(grad)
    return Built(train, info)


def build(params: dict, device: str) -> Built:
    return _bottleneck(params, device) if params["op"] == "bottleneck" else _linear(params, device)


def add_rates(record: dict) -> dict:
    """tokens/s, and for forward-only bottlenecks the effective bandwidth in GB/s."""
    if "median_s" in record:
        record["tokens_per_s"] = record["tokens"] / record["median_s"]
        if record.get("op") == "bottleneck" and record.get("mode") == "fwd":
            record["bandwidth_gbs"] = record["bytes"] / record["median_s"] / 1e9
    return record
