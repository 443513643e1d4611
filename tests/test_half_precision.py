"""Half-precision bases: components keep float32 parameters, train without overflow, merge safely."""
import pytest
import torch

from adaptune import Adapter, DoRA, LoRA, MergeError, Prefix, attach
from helpers import VOCAB, tiny_gpt2

pytestmark = pytest.mark.on_device  # on $ADAPTUNE_TEST_DEVICE when set (conftest.py)

HALF = [torch.float16, torch.bfloat16]
COMPONENTS = {"lora": {"attn": LoRA(4)}, "dora": {"attn": DoRA(4)}, "adapter": {"ffn": Adapter(8)},
              "prefix": {"attn": Prefix(4)}}


def half_model(dtype):
    model = tiny_gpt2().to(dtype)
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", COMPONENTS)
def test_twenty_steps_on_a_half_base_keep_the_loss_finite_and_falling(dtype, name):
    model = half_model(dtype)
    adaptation = attach(model, COMPONENTS[name])
    assert {p.dtype for p in adaptation.parameters()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("adaptune.")} == {dtype}
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(2, VOCAB, (4, 12))
    opt = torch.optim.AdamW([p for p in adaptation.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert all(torch.isfinite(p).all() for p in adaptation.parameters())


@pytest.mark.parametrize("cast", ["half", "float"])
def test_the_adaptation_can_be_cast_on_a_half_base(cast):
    model = half_model(torch.float16)
    adaptation = attach(model, {"attn": LoRA(4) | Prefix(2), "ffn": Adapter(8)})
    getattr(adaptation, cast)()
    logits = model(input_ids=torch.randint(2, VOCAB, (2, 5))).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("component", [LoRA(4), DoRA(4)], ids=["lora", "dora"])
def test_merging_past_the_half_range_is_refused_and_changes_nothing(component):
    model = half_model(torch.float16)
    adaptation = attach(model, {"attn": component})
    with torch.no_grad():
        for b in adaptation.bindings():
            b.module.A.fill_(1.0)
            b.module.B.fill_(300.0)  # s·B·A = 4·300 = 1200 per entry: fine in float32 ...
            if hasattr(b.module, "magnitude"):
                b.module.magnitude.fill_(1e6)  # ... DoRA: rows of norm 1e6 overflow float16
    if isinstance(component, LoRA):
        with torch.no_grad():
            for b in adaptation.bindings():
                b.module.B.fill_(1e5)  # 4·1e5 > 65504
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match="non-finite weights in torch.float16"):
        adaptation.merge()
    assert not adaptation.merged
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_dora_on_a_half_base_is_as_close_to_float32_as_peft(dtype, tmp_path):
    import peft
    from adaptune import export_peft, load
    torch.manual_seed(0)
    ids = torch.randint(2, VOCAB, (2, 10))
    model = tiny_gpt2()
    adaptation = attach(model, {"attn": DoRA(4)})
    with torch.no_grad():
        for b in adaptation.bindings():
            b.module.B.normal_(0, 0.5)
            b.module.magnitude.mul_(1.3)
        exact = model(input_ids=ids).logits
    adaptation.save(tmp_path / "a.safetensors")
    export_peft(adaptation, tmp_path / "peft")
    ours = tiny_gpt2().to(dtype)
    load(ours, tmp_path / "a.safetensors")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2().to(dtype), str(tmp_path / "peft"))
    with torch.no_grad():
        error = (ours(input_ids=ids).logits.float() - exact).abs().max()
        peft_error = (theirs(input_ids=ids).logits.float() - exact).abs().max()
    assert error <= 1.05 * peft_error + 1e-6, (error, peft_error)
