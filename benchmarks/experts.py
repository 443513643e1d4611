"""LoRA on every expert of a mixture of experts: one Mixtral-shaped sparse MoE block (its router and 8 experts,
top-2), forward + backward (dX and the adapters' gradients; the base frozen) on a batch of tokens.

Shapes: CPU hidden 1024, expert intermediate 3584 (Mixtral's ratio), 1,024 tokens, float32; CUDA Mixtral-8x7B's
layer (hidden 4096, intermediate 14336) at 2,048 and 8,192 tokens, bfloat16. LoRA r = 16, alpha = r, on every
expert's gate_up_proj (E, 2I, H) and down_proj (E, H, I).

Cases: the frozen block alone (transformers' own experts forward, grouped_mm: the floor); adaptune's expert LoRA on
its grouped path (torch's grouped multiply, one call per product for every expert) and on its reference path (a
Python loop over the experts, ADAPTUNE_KERNELS=off); PEFT's LoRA on the same parameters
(LoraConfig(target_parameters=[...]), which adds B·A to each expert's weight in the forward and so computes the
full weight gradient of every expert in the backward); adaptune's DoRA on every expert (grouped path). Every
model is cast to the dtype after the adapters attach, so the adapters compute in it too.
"""
from __future__ import annotations

import torch

from .models import dtype_for
from .worker import Built, Case, Skip

NAME = "experts"
SHAPES = {  # (hidden, intermediate, experts, top-k, token counts)
    "cpu": (1024, 3584, 8, 2, (1024,)),
    "cuda": (4096, 14336, 8, 2, (2048, 8192)),
    "tiny": (64, 128, 4, 2, (64,)),
}
R = 16
REPETITIONS = {"cpu": (1, 5)}  # a step takes 1-3 s on two cores
CASES = (  # (impl, method, path, adaptune's kernel mode)
    ("transformers", "frozen", "grouped_mm", "off"),
    ("adaptune", "lora", "grouped", "auto"),
    ("adaptune", "lora", "reference", "off"),
    ("peft", "lora", "-", "off"),
    ("adaptune", "dora", "grouped", "auto"),
)
PEFT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def cases(device: str, kernels: bool, tiny: bool = False, quick: bool = False) -> list[list[Case]]:
    """One group per token count: every case timed side by side."""
    hidden, inter, experts, k, counts = SHAPES["tiny" if tiny else device]
    groups = []
    for tokens in counts[:1] if quick else counts:
        group = []
        for impl, method, path, mode in CASES:
            params = {"model": "mixtral-block", "hidden": hidden, "intermediate": inter, "experts": experts,
                      "top_k": k, "tokens": tokens, "r": R, "impl": impl, "method": method, "path": path}
            group.append(Case(NAME, f"hidden {hidden}, {tokens} tokens: {impl} {method} [{path}]", params, mode))
        groups.append(group)
    return groups


def _model(params: dict):
    from transformers import MixtralConfig, MixtralModel
    config = MixtralConfig(hidden_size=params["hidden"], intermediate_size=params["intermediate"],
                           num_local_experts=params["experts"], num_experts_per_tok=params["top_k"],
                           num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, vocab_size=128)
    torch.manual_seed(0)
    return MixtralModel(config)


def _adapt(model, params: dict):
    """The model with the case's adapters (the base frozen); its factors B made non-zero, as after training."""
    impl, method, r = params["impl"], params["method"], params["r"]
    if impl == "transformers":
        return model.requires_grad_(False)
    if impl == "peft":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise Skip("Hugging Face PEFT is not installed (pip install peft)") from e
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=[],
                                                 target_parameters=PEFT_TARGETS)).base_model.model
    else:
        from adaptune import DoRA, LoRA, attach
        attach(model, {"ffn.experts": (DoRA if method == "dora" else LoRA)(r)})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.endswith(".B")):
                p.normal_(0.0, 0.02)
    return model


def build(params: dict, device: str) -> Built:
    dtype = dtype_for(device)
    model = _adapt(_model(params), params).to(device=device, dtype=dtype)
    block = model.layers[0].mlp
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, params["tokens"], params["hidden"], generator=g).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    grad = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)

    def step() -> None:
        for p in (*trainable, x):
            p.grad = None
        y = block(x)
        (y[0] if isinstance(y, tuple) else y).backward(grad)

    return Built(step, {"trainable": sum(p.numel() for p in trainable), "tokens": params["tokens"]})


def notes(device: str, tiny: bool, records: list[dict]) -> list[str]:
    hidden, inter, experts, k, _ = SHAPES["tiny" if tiny else device]
    return [f"one Mixtral-shaped sparse MoE block: hidden {hidden}, expert intermediate {inter}, {experts} experts, "
            f"top-{k}, random weights; LoRA / DoRA r = {R} (alpha = r) on every expert's gate_up_proj and down_proj; "
            f"forward + backward (dX and the adapters' gradients, the base frozen) in {dtype_for(device)}",
            "frozen: the block with no adapter (transformers' grouped_mm experts forward), the floor; adaptune "
            "[grouped]: torch's grouped multiply; [reference]: the loop over experts; PEFT: "
            "LoraConfig(target_parameters=[gate_up_proj, down_proj])"]


def add_rates(record: dict) -> dict:
    if "median_s" in record:
        record["tokens_per_s"] = record["tokens"] / record["median_s"]
    return record


def work_checks(records: list[dict]) -> list[dict]:
    """PEFT and adaptune's LoRA must train the same number of parameters."""
    checks = []
    for rec in records:
        peft = next((r for r in records if r["impl"] == "peft" and r["tokens"] == rec["tokens"]), None)
        if rec["impl"] != "adaptune" or rec["method"] != "lora" or peft is None or "trainable" not in rec \
                or "trainable" not in peft:
            continue
        checks.append({"model": rec["model"], "a": rec["name"], "b": peft["name"], "a_trainable": rec["trainable"],
                       "b_trainable": peft["trainable"], "equal": rec["trainable"] == peft["trainable"]})
    return checks
