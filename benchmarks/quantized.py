"""One AdamW step on a quantized frozen base: a Llama-shaped model whose weights dominate, beside the same model
with a float base and beside PEFT on the same quantized layers.

The model: hidden 2048, 8 layers, intermediate 5632, GQA 32 / 4 heads, vocabulary 32000 (TinyLlama-1.1B's layer
shape, 8 of its 22 layers), random weights from a LlamaConfig. LoRA r = 16 (alpha = r, no dropout) on q, k, v, o
and the MLP (gate, up, down) of every layer; the loss is the language-model loss. Batch 4 × 256 tokens on CUDA,
4 × 128 on CPU: the six workers live side by side through the rounds, each keeping the memory of its step, and at
4 × 256 they would need about 25 GB together (4.7 GB for the float one) and over 12 minutes on two cores.

Cases: LoRA on the float base (float32 on CPU, bfloat16 on CUDA: the yardstick), adaptune nf4 LoRA, PEFT nf4 LoRA,
adaptune int8 LoRA, adaptune nf4 DoRA, PEFT nf4 DoRA. `adaptune.quantize` makes the bitsandbytes layers (Linear4bit
with the compute dtype float32 on CPU, bfloat16 on CUDA; Linear8bitLt) of every Linear but the head, and marks the
model as transformers does (`is_loaded_in_4bit`), so PEFT wraps the same layers with its bitsandbytes LoRA / DoRA.
The embedding table, the norms and the head stay in the float dtype; the adapters' parameters are each library's
default on a quantized base (float32 in both). adaptune's ops always take their reference path on a quantized
weight (adaptune.ops), so every case runs with ADAPTUNE_KERNELS=off.

The base is made layer by layer (the model on the meta device, each part then given memory, initialised from one
seeded generator and quantized at once), so no process ever holds the float weights of a quantized model: its
peak memory is that of the quantized model. Every case imports bitsandbytes, the float one too, so that the
import is in every peak alike. One warm step takes the one-time costs (DoRA's cached ‖W‖², the optimizer's
state); its time is kept in each record as `warm_s`. The model trains in train mode, where bitsandbytes does not
repack 4-bit weights for its CPU inference kernel.
"""
from __future__ import annotations

import torch

from .worker import Built, Case, Skip

NAME = "quantized"
LIVE_MEMORY = True  # on the CPU, each case's memory is also measured with freed memory unmapped (worker.measure_live)
MODEL = "llama-8l"
DEEP = "llama-24l"  # the same layers, 24 of them: 89% of the weights in the layers, as in Llama-3-8B (87%)
SHAPES = {  # LlamaConfig fields
    MODEL: dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000),
    DEEP: dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512),
}
R = 16
TOKENS = {"cpu": (4, 128), "cuda": (4, 256), "tiny": (2, 16)}  # (batch, tokens) of a step
REPETITIONS = {"cpu": (1, 2)}  # (warm, timed) of a full CPU run: a step of this model takes 10-40 s on two cores
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTUNE_TARGETS = ("attn", "attn.o", "ffn", "ffn.gate")  # q, k, v; o; up, down; gate
CASES = (("float", "adaptune-lora"), ("nf4", "adaptune-lora"), ("nf4", "peft-lora"), ("int8", "adaptune-lora"),
         ("nf4", "adaptune-dora"), ("nf4", "peft-dora"))
CHECKPOINTED = (("float", "adaptune-lora"), ("nf4", "adaptune-lora"), ("nf4", "peft-lora"))  # also with gradient
# checkpointing (QLoRA's setting): the layers' activations recomputed in the backward, so the weights dominate
DEEP_CASES = (("float", "adaptune-lora"), ("nf4", "adaptune-lora"))  # on DEEP, with checkpointing, a group of their
# own (after the others, so the float one's 4 GB never sits beside them): where the embedding table and the head,
# which stay float, are as small a share of the weights as in an LLM, the memory that 4 bits saves


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def base_label(base: str, device: str) -> str:
    return {"cuda": "bf16", "cpu": "fp32"}[device] if base == "float" else base


def cases(device: str, kernels: bool, tiny: bool = False, quick: bool = False) -> list[list[Case]]:
    """Two groups, each timed side by side: every case on MODEL, then the DEEP ones (not with --tiny)."""
    batch, seq = TOKENS["tiny" if tiny else device]

    def case(model: str, base: str, method: str, checkpointing: bool) -> Case:
        impl, kind = method.split("-")
        params = {"model": model, "base": base, "method": method, "impl": impl, "kind": kind, "r": R,
                  "batch": batch, "seq": seq, "dtype": str(dtype_for(device)).removeprefix("torch."),
                  "path": "reference", "checkpointing": checkpointing}
        return Case(NAME, f"{model} {base_label(base, device)} {method}{' +checkpointing' * checkpointing}", params,
                    "off")

    model = "llama-tiny" if tiny else MODEL
    groups = [[case(model, base, method, checkpointing)
               for checkpointing, chosen in ((False, CASES), (True, CHECKPOINTED)) for base, method in chosen]]
    if not tiny:
        groups.append([case(DEEP, base, method, True) for base, method in DEEP_CASES])
    return groups


def _init(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """As LlamaPreTrainedModel initialises: normal(0, std) weights, zero biases, unit norms."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif type(m).__name__.endswith("RMSNorm"):
                m.weight.fill_(1.0)


def base_model(model_name: str, base: str, device: str, seed: int = 0) -> torch.nn.Module:
    """The random Llama, its layers' Linears quantized to `base` (nf4, int8) or left float; made one part at a
    time on `device`, so that a quantized model's float weights are never all in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from adaptune import quantize
    dtype = dtype_for(device)
    config = LlamaConfig(**SHAPES[model_name], max_position_embeddings=2048)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):  # its buffers are computed, not initialised
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = list(model.model.layers)
    for part in [model.model.embed_tokens, *layers, model.model.norm, model.lm_head]:
        part.to_empty(device=device)
        _init(part, config.initializer_range, generator)
        if base != "float" and any(part is layer for layer in layers):
            quantize(part, base, compute_dtype=dtype)
    if base != "float":  # every Linear but the head is quantized now; this marks the model as transformers does
        quantize(model, base, compute_dtype=dtype)
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"left on the meta device: {meta}"
    return model


def apply_method(model: torch.nn.Module, method: str, r: int) -> torch.nn.Module:
    impl, kind = method.split("-")
    if impl == "peft":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise Skip("Hugging Face PEFT is not installed (pip install peft)") from e
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                                                use_dora=kind == "dora"))
    from adaptune import DoRA, LoRA, attach
    component = (DoRA if kind == "dora" else LoRA)(r)
    attach(model, {target: component for target in ADAPTUNE_TARGETS})
    return model


def storage_mb(model: torch.nn.Module) -> float:
    """MiB of the model's parameters and buffers as stored (packed 4-bit or int8 data, their scales included)."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax (and its nested state), the code
        while state is not None:
            add(state.absmax)
            add(state.code)
            state = getattr(state, "state2", None)
    for m in model.modules():  # bitsandbytes int8: the row scales
        add(getattr(getattr(m, "state", None), "SCB", None))
    return total / 2**20


def build(params: dict, device: str) -> Built:
    try:
        import bitsandbytes  # noqa: F401  (every case, the float one too: the import is in every peak alike)
    except ImportError as e:
        raise Skip("bitsandbytes is not installed (pip install bitsandbytes)") from e
    model = apply_method(base_model(params["model"], params["base"], device), params["method"], params["r"])
    if params.get("checkpointing"):
        if hasattr(model, "activation_checkpointing_enable"):  # the name transformers gives it from 5.24 on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch, seq = params["batch"], params["seq"]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    info = {"trainable": sum(p.numel() for p in trainable), "tokens": batch * seq, "weights_mb": storage_mb(model),
            "trainable_dtype": str(trainable[0].dtype).removeprefix("torch.")}
    return Built(step, info)


def notes(device: str, tiny: bool, records: list[dict]) -> list[str]:
    """The conditions the table needs beside it (the results file's header)."""
    shape = SHAPES["llama-tiny" if tiny else MODEL]
    batch, seq = TOKENS["tiny" if tiny else device]
    dtype = str(dtype_for(device)).removeprefix("torch.")
    return [f"model: Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, intermediate "
            f"{shape['intermediate_size']}, {shape['num_attention_heads']} / {shape['num_key_value_heads']} heads, "
            f"vocabulary {shape['vocab_size']}, random weights; LoRA / DoRA r = {R} (alpha = r) on q, k, v, o, gate, "
            f"up, down of every layer; batch {batch} × {seq} tokens; one AdamW step on the language-model loss",
            f"bases: {base_label('float', device)} (the float model), nf4 (bitsandbytes Linear4bit, blocks of 64, "
            f"compute dtype {dtype}), int8 (bitsandbytes Linear8bitLt, LLM.int8()), made by adaptune.quantize for "
            f"every Linear of the layers; the embedding table, the norms and the head stay {dtype}; weights MB: the "
            "parameters and buffers as stored (quantization scales included), adapters included",
            f"{DEEP}: the same model with {SHAPES[DEEP]['num_hidden_layers']} layers (89% of its weights in the "
            "layers, as Llama-3-8B has 87%), LoRA on the float and the nf4 base with checkpointing, after the rest",
            "+checkpointing: gradient checkpointing on every decoder layer (transformers' "
            "activation_checkpointing_enable, non-reentrant), the layers' activations recomputed in the backward",
            "first step s: the warm step, which takes the one-time costs (DoRA's cached ‖W‖², the optimizer's "
            "state, first allocations); median s: the timed steps after it",
            "adaptune's ops take their reference path in every case: a quantized weight always does "
            "(ADAPTUNE_KERNELS=off for the float base too)"] + ([
            "live over baseline MB: the case built again in a fresh process started with MALLOC_MMAP_THRESHOLD_="
            "131072 (glibc maps each allocation over 128 KiB on its own and unmaps it when freed), the peak RSS over "
            "its baseline in the warm step and one more: the memory the step holds, as CUDA's max_memory_allocated "
            "counts it, where 'over baseline' also counts what glibc kept of the memory the steps freed"]
            if device == "cpu" else [])


def add_rates(record: dict) -> dict:
    """it/s and tokens/s from the median step time; the first (warm) step's time."""
    if record.get("warm_s"):
        record["first_step_s"] = record["warm_s"][0]
    if "median_s" in record:
        record["it_per_s"] = 1.0 / record["median_s"]
        record["tokens_per_s"] = record["tokens"] / record["median_s"]
    return record


def work_checks(records: list[dict]) -> list[dict]:
    """PEFT and adaptune must train the same number of parameters on the same quantized base."""
    checks = []
    for rec in records:
        if rec["impl"] != "adaptune":
            continue
        peft = next((r for r in records if r["impl"] == "peft" and r["model"] == rec["model"] and r["base"] == rec["base"]
                     and r["kind"] == rec["kind"] and r.get("checkpointing") == rec.get("checkpointing")), None)
        if peft is None or "trainable" not in peft or "trainable" not in rec:
            continue
        checks.append({"model": rec["model"], "a": rec["name"], "b": peft["name"], "a_trainable": rec["trainable"],
                       "b_trainable": peft["trainable"], "equal": rec["trainable"] == peft["trainable"]})
    return checks
