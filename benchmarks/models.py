"""The models and methods a training step is timed on, built the same way for every method.

Methods: full (every weight trains), head-only (the base frozen, a new linear head on the first token's
hidden state trains: seed 002's "last layer"), peft-lora / peft-dora (Hugging Face PEFT), adaptune-lora /
adaptune-dora. LoRA and DoRA adapt the same weights with the same rank and scale (alpha = r, s = 1) in both
libraries: BERT's query/key/value Linears, Llama's q_proj/k_proj/v_proj, GPT-2's fused c_attn Conv1D (PEFT's
usual target; adaptune binds it by module path, so both train one update over the fused q|k|v).
"""
from __future__ import annotations

import torch
from torch import nn

METHODS = ("full", "head-only", "peft-lora", "peft-dora", "adaptune-lora", "adaptune-dora")
MODELS = {  # name: (adaptune.models preset or a Llama shape below, architecture)
    "bert-base": ("bert-base", "bert"),
    "gpt2-small": ("gpt2-small", "gpt2"),
    "llama-1b": ("llama-1b", "llama"),
    "bert-tiny": ("bert-tiny", "bert"),
    "gpt2-tiny": ("gpt2-tiny", "gpt2"),
    "llama-tiny": ("llama-tiny", "llama"),
}
LLAMA = {  # TinyLlama-1.1B's shape (1.10B parameters), and a tiny one for smoke runs
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512),
}
PEFT_TARGETS = {"bert": ["query", "key", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj"]}


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def _adaptune_targets(model: nn.Module, arch: str) -> list[str]:
    if arch in ("bert", "llama"):
        return ["attn"]  # q, k, v of every layer
    return [name for name, _ in model.named_modules() if name.endswith("attn.c_attn")]


def base_model(preset: str, device: str, seed: int = 0) -> nn.Module:
    """The random base: adaptune's presets, or a Llama shape built on the device itself, in its dtype (a 1B
    model's random initialisation takes minutes on a CPU)."""
    if preset not in LLAMA:
        from adaptune.models import load_model
        return load_model(preset, seed=seed)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype_for(device))  # made in the dtype it runs in: no float32 copy on the GPU
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**LLAMA[preset], max_position_embeddings=2048))
    finally:
        torch.set_default_dtype(previous)


def apply_method(model: nn.Module, arch: str, method: str, r: int) -> nn.Module:
    """`model` ready to train with `method`; the base frozen unless method is full."""
    if method == "full":
        return model
    if method == "head-only":
        model.requires_grad_(False)
        model.head = nn.Linear(model.config.hidden_size, 5)  # a task head, as the multitask model's
        return model
    kind = method.split("-", 1)[1]
    if method.startswith("peft-"):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            from .worker import Skip
            raise Skip("Hugging Face PEFT is not installed (pip install peft)") from e
        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=PEFT_TARGETS[arch],
                            use_dora=kind == "dora", fan_in_fan_out=arch == "gpt2")
        return get_peft_model(model, config)
    from adaptune import DoRA, LoRA, attach
    component = (DoRA if kind == "dora" else LoRA)(r)
    attach(model, {target: component for target in _adaptune_targets(model, arch)})
    return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_step(model_name: str, method: str, r: int, batch: int, seq: int, device: str, seed: int = 0):
    """(one AdamW step as a closure, facts about the work). Same seed, weights and batch for every method."""
    preset, arch = MODELS[model_name]
    model = apply_method(base_model(preset, device, seed), arch, method, r)
    model = model.to(device=device, dtype=dtype_for(device)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)

    def loss() -> torch.Tensor:
        if method == "head-only":
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # (B, T, C), no grad
            return model.head(hidden[:, 0]).float().pow(2).mean()
        if arch in ("gpt2", "llama"):
            return model(input_ids=ids, labels=ids).loss
        return model(input_ids=ids).last_hidden_state.float().pow(2).mean()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    total = sum(p.numel() for p in model.parameters())
    return step, {"trainable": trainable(model), "total_params": total, "tokens": batch * seq}
