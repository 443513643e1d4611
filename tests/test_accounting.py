"""Parameter accounting against the formulas: trainable per task, % of base, stored."""
from helpers import tiny_bert

from adaptune import Adapter, LoRA, attach, counts


def test_counts_match_formulas_for_shared_lora_and_per_task_adapters():
    model = tiny_bert(layers=2, hidden=32)  # d = 32, 2 layers
    base = sum(p.numel() for p in model.parameters())
    r, m, d, L = 4, 8, 32, 2
    tasks = {"sst": {"attn": Adapter(m), "ffn": Adapter(m)}, "sts": {"ffn": Adapter(m)}}
    c = counts(attach(model, {"attn": LoRA(r)}, tasks=tasks))
    lora = L * 3 * r * (d + d)  # q, k, v per layer: r·(in + out)
    adapter = 2 * m * d + d + m  # per site
    assert c.base == base
    assert c.shared == lora
    assert c.per_task == {"sst": 2 * L * adapter, "sts": L * adapter}
    assert c.trainable("sst") == lora + 2 * L * adapter
    assert c.pct_trainable("sts") == 100.0 * (lora + L * adapter) / base
    assert c.stored == lora + 3 * L * adapter
    assert [row[0] for row in c.rows()] == ["sst", "sts"]


def test_trainable_parameters_are_exactly_the_components():
    model = tiny_bert()
    adaptation = attach(model, {"ffn": Adapter(8)})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adaptation.parameters()}
    assert counts(adaptation).trainable() == sum(p.numel() for p in model.parameters() if p.requires_grad)
