"""Trainable base parts: whole modules trained as copies (Trainable, PEFT's modules_to_save) and BitFit.

Round trips through save / load, detach bit-exact, per-task heads, merging, and PEFT SEQ_CLS parity both ways.
"""
import json

import peft
import pytest
import torch
from helpers import bound, perturb, VOCAB
from safetensors.torch import load_file

import adaptune
from adaptune import AdaptuneError, BindError, BitFit, LoRA, MergeError, SiteError, Trainable, attach
from adaptune.peft_export import CONFIG_NAME, WEIGHTS_NAME, export_peft
from adaptune.peft_import import import_peft

ATOL = 1e-5


def bert_cls(seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=128, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def gpt2_cls(seed=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128, num_labels=3,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return GPT2ForSequenceClassification(cfg).eval()


BUILDS = {"bert": (bert_cls, "classifier"), "gpt2": (gpt2_cls, "score")}


def logits(model, ids):
    return model(input_ids=ids).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_exact(model, before):
    assert not hasattr(model, "adaptune") and all("forward" not in m.__dict__ for m in model.modules())
    now = model.state_dict()
    assert set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_head_trains_saves_loads_and_detaches_bit_exact(arch, ids, tmp_path):
    build, head = BUILDS[arch]
    model = build()
    base, before = logits(model, ids), state(model)
    a = attach(model, {"attn": LoRA(4), head: Trainable()})
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)  # a fresh copy is the original
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("adaptune.") for n in trainable)
    assert any(f"module:{head}" in n for n in trainable)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    trained = logits(model, ids)
    assert (trained - base).abs().max() > 1e-3
    assert torch.equal(getattr(model, head).weight, before[f"{head}.weight"])  # the original is never changed
    a.save(tmp_path / "a.safetensors")
    adaptune.detach(model)
    assert_bit_exact(model, before)
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    fresh = build()
    adaptune.load(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(fresh, ids), trained, atol=0, rtol=0)


def test_per_task_heads_and_the_original_without_a_task(ids):
    model = bert_cls()
    base = logits(model, ids)
    a = attach(model, {"attn": LoRA(2)}, tasks={"x": {"classifier": Trainable()}, "y": {"classifier": Trainable()},
                                               "z": {"ffn": LoRA(2)}})
    perturb(a.tasks["x"], seed=1)
    perturb(a.tasks["y"], seed=2)
    out = {t: logits(model, ids) for t in ("x", "y", "z") if a.use(t)}
    assert (out["x"] - out["y"]).abs().max() > 1e-3
    with a.disabled():
        torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    a.use(None)
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)  # shared LoRA B = 0, original head
    a.use("x")
    torch.testing.assert_close(logits(model, ids), out["x"], atol=0, rtol=0)
    a.merge()  # the copies keep running while LoRA is merged
    torch.testing.assert_close(logits(model, ids), out["x"], atol=ATOL, rtol=0)
    a.unmerge()


def test_trainable_conflicts_and_bad_paths_are_refused_cleanly():
    model = bert_cls()
    before = state(model)
    with pytest.raises(BindError, match="trained twice"):
        attach(model, {"classifier": Trainable()}, tasks={"t": {"classifier": Trainable()}})
    with pytest.raises(BindError, match="inside it"):
        attach(model, {"bert.encoder.layer.1": Trainable(), "attn": LoRA(2)})
    with pytest.raises(SiteError, match="module path"):
        attach(model, {"head": Trainable()})
    with pytest.raises(SiteError, match="module path"):
        attach(model, {"attn": Trainable()})
    assert_bit_exact(model, before)
    a = attach(model, {"bert.pooler": Trainable()})  # any module type, not only Linear
    perturb(a)
    assert all(n.startswith("adaptune.") for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_bitfit_trains_only_bias_shifts_merges_and_round_trips(arch, ids, tmp_path):
    build, _ = BUILDS[arch]
    model = build()
    base, before = logits(model, ids), state(model)
    a = attach(model, {"attn": LoRA(2) | BitFit(), "ffn.down": BitFit()})
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    deltas = [n for n, p in a.named_parameters() if n.endswith("delta")]
    assert len(deltas) == 2 * 4 and all(p.shape == (32,) for n, p in a.named_parameters() if n in deltas)
    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(n.startswith("adaptune.") for n in grads) and sum(n.endswith("delta") for n in grads) == len(deltas)
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for n, g in grads.items() if n.endswith("delta"))
    model.eval()
    perturb(a)
    out = logits(model, ids)
    a.merge()
    torch.testing.assert_close(logits(model, ids), out, atol=ATOL, rtol=0)
    a.unmerge()
    torch.testing.assert_close(logits(model, ids), out, atol=0, rtol=0)
    a.save(tmp_path / "b.safetensors")
    adaptune.detach(model)
    assert_bit_exact(model, before)
    fresh = build()
    adaptune.load(fresh, tmp_path / "b.safetensors")
    torch.testing.assert_close(logits(fresh, ids), out, atol=0, rtol=0)


def test_bitfit_on_a_layer_without_bias_runs_but_does_not_merge(ids):
    model = gpt2_cls()  # score: Linear without bias
    a = attach(model, {"score": BitFit()})
    with torch.no_grad():
        bound(a, "score")[0].delta.fill_(0.5)
    torch.testing.assert_close(logits(model, ids), logits(gpt2_cls(), ids) + 0.5, atol=ATOL, rtol=0)
    with pytest.raises(MergeError, match="no bias"):
        a.merge()
    assert not a.merged
    with pytest.raises(BindError, match="bias shifts"):
        attach(gpt2_cls(), {"attn": BitFit(), "attn.q": BitFit()})


# ---- PEFT's format ----------------------------------------------------------------------------------

def peft_seq_cls(build, targets, seed=5):
    model = peft.get_peft_model(build(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                         target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch,targets", [("bert", ["query", "value"]), ("gpt2", ["c_attn"])])
def test_peft_seq_cls_adapter_imports_with_its_head(arch, targets, ids, tmp_path):
    build, head = BUILDS[arch]
    reference = peft_seq_cls(build, targets)
    reference.save_pretrained(tmp_path)
    expected = logits(reference, ids)
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, ids), expected, atol=ATOL, rtol=0)
    model = build()
    before = state(model)
    a = import_peft(model, tmp_path)
    assert any(type(c) is Trainable for sel, stack in a.specs[None].items() for c in stack if sel == head)
    got = logits(model, ids)
    assert (got - expected).abs().max().item() <= ATOL
    assert (got - logits(build(), ids)).abs().max() > 1e-3
    adaptune.detach(model)
    assert_bit_exact(model, before)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_export_writes_modules_to_save_that_peft_loads(arch, ids, tmp_path):
    build, head = BUILDS[arch]
    model = build()
    a = attach(model, {"attn": LoRA(4, alpha=8), head: Trainable()})
    perturb(a)
    expected = logits(model, ids)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == [head]
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert f"base_model.model.{head}.weight" in keys
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert (logits(theirs, ids) - expected).abs().max().item() <= ATOL
    back = build()
    import_peft(back, tmp_path)
    assert (logits(back, ids) - expected).abs().max().item() <= ATOL


def test_bitfit_export_is_refused_or_skipped(ids, tmp_path):
    model = bert_cls()
    attach(model, {"attn": LoRA(2) | BitFit(), "classifier": Trainable()})
    with pytest.raises(AdaptuneError, match="BitFit"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    export_peft(model, tmp_path / "y", skip_unsupported=True)
    assert not any("bias" in k and "classifier" not in k for k in load_file(str(tmp_path / "y" / WEIGHTS_NAME)))
