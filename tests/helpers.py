"""What the tests share: tiny models built from configs (nothing is downloaded), and helpers on their outputs."""
import inspect

from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from transformers import TrainerCallback

VOCAB = 96


def tiny_gpt2(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, seed: int = 0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=VOCAB, n_positions=128,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0, **kw):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, vocab_size=VOCAB, max_position_embeddings=128, **kw)
    return BertModel(cfg).eval()


def tiny_llama(layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=2 * hidden, vocab_size=VOCAB,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)
    return LlamaForCausalLM(cfg).eval()


def bound(adaptation, site: str, layer: int | None = None, group: str | None = None) -> list[torch.nn.Module]:
    """The component modules of `group` (None: the shared set) bound at `site` ("attn.q", "ffn", "embed", a
    module path: as the point names it) in `layer` (None: embeddings and module paths), in binding order."""
    return [b.module for b in adaptation.bindings([group]) if b.point.site == site and b.point.layer == layer]


class StopAt(TrainerCallback):
    """Interrupt a Trainer's training after step `step` (after its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def weights(model) -> dict:
    """The adaptation's state of `model`, cloned."""
    return {k: v.detach().clone() for k, v in model.adaptune.state_dict().items()}


def with_cache(model, cache) -> dict:
    """`cache` as the keyword model.forward takes it by: `cache` in newer transformers, else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def cache_of(out):
    """The KV cache a forward returned, under either of transformers' names for it."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def randomize(module: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every parameter of `module` random values (components start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def perturb(module: torch.nn.Module, std: float = 0.1, seed: int = 3) -> None:
    """Add noise to every parameter of `module` (moves factors off their start, as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def caught(call, catch: type[BaseException] = Exception) -> str:
    """What `call` raised, as "<class>: <message>" ("returned" if nothing); exceptions not of `catch` propagate."""
    try:
        call()
    except catch as e:
        return f"{type(e).__name__}: {e}"
    return "returned"


def main_output(out):
    """The logits of an LM head model, else the last hidden states."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_grads_on_components_only(model, base_names) -> None:
    """Base parameters (names in base_names) stay frozen with no grad; every component got a gradient."""
    for name, p in model.named_parameters():
        if name in base_names:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert name.startswith("adaptune.") and p.grad is not None and p.grad.abs().sum() > 0, name


def greedy(model, ids, mask, steps):
    """Greedy decoding re-running the whole sequence without a cache, positions as generate makes them."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def out(model, ids):
    """The main output of `model` on `ids`, without gradients."""
    with torch.no_grad():
        return main_output(model(ids))


class OnDevice(TorchFunctionMode):
    """Tensors made without a device are made on `device`, as under torch.set_default_device, so a test written
    for the CPU runs on a GPU unchanged; those drawn from a CPU generator are drawn on the CPU and moved, so they
    hold the values the CPU run draws."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors() and kwargs.get("device") is None:
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != self.device.type:
                return func(*args, **kwargs).to(self.device)
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def two_ranks(worker: Path, *args: str, timeout: int = 600) -> tuple[dict, dict]:
    """Run tests/`worker` on 2 CPU processes under torchrun (gloo) with `args`, the last being its output
    directory; rank 0's and rank 1's results (OUT/rank{R}.pt), checked to come from a world of 2 with gloo."""
    import os
    import subprocess
    import sys
    # --standalone: torchrun takes a free port itself (no window for another process to take it first)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, cwd=worker.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    out = Path(args[-1])
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r0["backend"]) == (0, 1, 2, "gloo")
    return r0, r1
