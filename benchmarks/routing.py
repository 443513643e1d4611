"""Mixed-task batches: a BERT-base-shaped model (random weights) whose batch mixes T tasks evenly
(sample i runs task i mod T, the interleaved worst case for grouping by task).

For each method (LoRA r=8 on q, k, v; DoRA r=8 on q, k, v; Adapter 64 after attention and feed-forward,
one set per task) and T tasks (CPU: 1, 3, 8, 32; CUDA and --quick: 8, 32): forward (inference) and one AdamW
training step of
- mixed:     the whole batch in one forward, `adaptation.route(tasks)` (T = 1 is a route with one task)
- single:    the same batch under one task, `adaptation.use(task)` (the yardstick)
- per-task:  one forward (and backward) per task on its samples, one optimizer step (CPU full runs)
- peft:      PEFT with T LoRA adapters and `adapter_names` (LoRA, inference only: PEFT trains one adapter
             per forward)
GPU: batch 64 x 128 tokens, 12 layers. CPU: batch 64 x 32 tokens, 2 layers of the same width (a full
BERT-base forward of 8192 tokens takes tens of seconds on 2 cores; the routed ops' share per layer is
what the ratios measure).
"""
from __future__ import annotations

import torch

from .models import dtype_for
from .train_step import adaptune_paths
from .worker import Built, Case, Skip

NAME = "routing"
SIZES = {"cuda": (64, 128, 12, 768), "cpu": (64, 32, 2, 768), "tiny": (8, 8, 2, 64)}  # batch, tokens, layers, width
TASKS = (1, 3, 8, 32)
METHODS = ("lora", "dora", "adapter")


def cases(device: str, kernels: bool, tiny: bool = False, quick: bool = False) -> list[list[Case]]:
    batch, seq, layers, width = SIZES["tiny" if tiny else device]
    tasks = (1, 8) if tiny else (8, 32) if quick or device == "cuda" else TASKS
    per_task = device == "cpu" and not quick  # one forward per task: the CPU's full runs only
    paths = adaptune_paths(kernels, both=False)
    groups = []
    for method in METHODS:
        for mode in ("fwd", "train"):
            group = []
            base = {"method": method, "mode": mode, "batch": batch, "seq": seq, "layers": layers, "width": width}
            for path, kmode in paths:
                group.append(Case(NAME, f"{method} {mode} single [{path}]",
                                  {**base, "how": "single", "tasks": 8, "path": path}, kmode))
                for t in tasks:
                    group.append(Case(NAME, f"{method} {mode} mixed T={t} [{path}]",
                                      {**base, "how": "mixed", "tasks": t, "path": path}, kmode))
                    if t > 1 and (per_task or tiny):
                        group.append(Case(NAME, f"{method} {mode} per-task T={t} [{path}]",
                                          {**base, "how": "per-task", "tasks": t, "path": path}, kmode))
            if method == "lora" and mode == "fwd":
                group += [Case(NAME, f"lora fwd peft adapter_names T={t}",
                               {**base, "how": "peft", "tasks": t, "path": "-"}, "off") for t in tasks]
            groups.append(group)
    return groups


def _model(layers: int, width: int):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=width // 64,
                                intermediate_size=4 * width))


def _spec(method: str) -> dict:
    from adaptune import Adapter, DoRA, LoRA
    return {"lora": lambda: {"attn": LoRA(8)}, "dora": lambda: {"attn": DoRA(8)},
            "adapter": lambda: {"attn": Adapter(64), "ffn": Adapter(64)}}[method]()


def _peft(layers: int, width: int, n: int, device: str):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise Skip("Hugging Face PEFT is not installed (pip install peft)") from e
    config = lambda: LoraConfig(r=8, lora_alpha=8, target_modules=["query", "key", "value"])  # noqa: E731
    model = get_peft_model(_model(layers, width), config(), adapter_name="t0")
    for t in range(1, n):
        model.add_adapter(f"t{t}", config())
    return model.to(device=device, dtype=dtype_for(device)).eval()


def build(params: dict, device: str) -> Built:
    batch, seq, layers, width, n = (params[k] for k in ("batch", "seq", "layers", "width", "tasks"))
    ids = torch.randint(0, 30522, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    names = [f"t{i % n}" for i in range(batch)]  # evenly mixed, interleaved
    info = {"tokens": batch * seq, "tasks": n}
    if params["how"] == "peft":
        model = _peft(layers, width, n, device)
        info["trainable"] = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)

        def peft_step() -> None:
            with torch.inference_mode():
                model(input_ids=ids, adapter_names=names)
        return Built(peft_step, info)
    from adaptune import attach
    model = _model(layers, width)
    adaptation = attach(model, tasks={f"t{i}": _spec(params["method"]) for i in range(n)})
    with torch.no_grad():  # factors off their identity start, as after training
        for p in adaptation.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model = model.to(device=device, dtype=dtype_for(device))
    train = params["mode"] == "train"
    model.train(train)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) if train else None
    how = params["how"]
    rows = {t: [i for i in range(batch) if names[i] == f"t{t}"] for t in range(n)}
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x).last_hidden_state

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return out.float().pow(2).sum() / (batch * seq)

    def run() -> None:
        if how == "per-task":
            for t, r in rows.items():
                with adaptation.using(f"t{t}"):
                    out = forward(ids[r])
                    if train:
                        loss_of(out).backward()
            return
        if how == "mixed":
            with adaptation.route(names):
                out = forward(ids)
        else:
            adaptation.use("t0")
            out = forward(ids)
        if train:
            loss_of(out).backward()

    def step() -> None:
        if not train:
            with torch.inference_mode():
                run()
            return
        opt.zero_grad(set_to_none=True)
        run()
        opt.step()

    return Built(step, info)


def add_rates(record: dict) -> dict:
    if "median_s" in record:
        record["tokens_per_s"] = record["tokens"] / record["median_s"]
    return record
