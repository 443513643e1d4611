"""adaptune in one file: shared LoRA + per-task adapters on the real all-MiniLM-L6-v2, trained a few
steps on two tasks of ../shared/data/cs224n, switched, merged, saved, reloaded, detached.

Run: python examples/quickstart.py   (CPU, about a minute)
"""
import csv
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from adaptune import Adapter, LoRA, attach, counts, detach, load
from adaptune.models import load_model, minilm_path

DATA = Path(os.environ.get("ADAPTUNE_DATA", Path(__file__).resolve().parents[2] / "shared/data/cs224n"))


def rows(name: str, n: int) -> list[dict]:
    with (DATA / name).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))[:n]


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("minilm"), AutoTokenizer.from_pretrained(str(minilm_path()))
    data = {
        "sst": ([r["sentence"] for r in rows("ids-sst-train.csv", 96)],
                torch.tensor([int(r["sentiment"]) for r in rows("ids-sst-train.csv", 96)]), 5),
        "cfimdb": ([r["sentence"][:300] for r in rows("ids-cfimdb-train.csv", 96)],
                   torch.tensor([int(r["sentiment"]) for r in rows("ids-cfimdb-train.csv", 96)]), 2),
    }
    adaptation = attach(model, {"attn": LoRA(8)},  # shared across tasks
                        tasks={t: {"attn": Adapter(32), "ffn": Adapter(32)} for t in data})
    c = counts(adaptation)
    for task, trainable, pct, own in c.rows():
        print(f"{task}: {trainable:,} trainable parameters ({pct:.2f}% of {c.base:,}), {own:,} task-specific")

    heads = {t: torch.nn.Linear(model.config.hidden_size, k) for t, (_, _, k) in data.items()}
    params = [p for p in model.parameters() if p.requires_grad] + [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def loss_of(task: str, sl: slice) -> torch.Tensor:
        text, labels, _ = data[task]
        batch = tok(text[sl], padding=True, truncation=True, max_length=64, return_tensors="pt")
        mask = batch["attention_mask"].unsqueeze(-1)
        pooled = (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)  # (B, d) mean pooling
        return torch.nn.functional.cross_entropy(heads[task](pooled), labels[sl])

    for step in range(12):  # round-robin over tasks, switching the active task on the fly
        losses = {}
        for task in data:
            adaptation.use(task)
            loss = loss_of(task, slice((step % 6) * 16, (step % 6 + 1) * 16))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[task] = loss.item()
        print(f"step {step:2d}  " + "  ".join(f"{t} train loss {v:.3f}" for t, v in losses.items()))

    model.eval()
    with torch.no_grad(), adaptation.using("sst"):
        before = loss_of("sst", slice(0, 32))
        adaptation.merge()  # LoRA folded into the weights: same outputs, no extra matmuls
        merged = loss_of("sst", slice(0, 32))
        adaptation.unmerge()
    print(f"sst loss unmerged {before.item():.6f}, merged {merged.item():.6f}")
    path = adaptation.save(Path(tempfile.mkdtemp()) / "quickstart.safetensors")
    detach(model)
    reloaded = load(model, path, active="sst")
    with torch.no_grad():
        print(f"reloaded from {path}: sst loss {loss_of('sst', slice(0, 32)).item():.6f} (active {reloaded.task!r})")


if __name__ == "__main__":
    main()
