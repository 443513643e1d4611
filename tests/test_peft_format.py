"""LoRA / DoRA in Hugging Face PEFT's format: same outputs as PEFT both ways, clean errors, safe writes."""
import json
import os

import peft
import pytest
import torch
from helpers import bound, randomize, tiny_bert, tiny_gpt2
from safetensors.torch import load_file, save_file

from adaptune import Adapter, AdaptuneError, DoRA, LoadError, LoRA, TaskError, attach
from adaptune import files, peft_export
from adaptune.peft_export import CONFIG_NAME, WEIGHTS_NAME, export_peft
from adaptune.peft_import import import_peft

ATOL = 1e-5


def every_output(model, ids):
    """Every output of the tiny models: GPT-2 logits, or BERT hidden states and pooled output."""
    o = model(input_ids=ids)
    if getattr(o, "logits", None) is not None:
        return o.logits
    return torch.cat([o.last_hidden_state.flatten(), o.pooler_output.flatten()])


def randomize_adaptation(adaptation, seed=1):
    """Random A and B; DoRA magnitudes randomly scaled around their row norms."""
    mags = {n: p.detach().clone() for n, p in adaptation.named_parameters() if n.endswith("magnitude")}
    randomize(adaptation, std=0.2, seed=seed)
    with torch.no_grad():
        for n, p in adaptation.named_parameters():
            if n in mags:
                p.copy_(mags[n] * (1 + p))


def randomize_peft(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def load_peft(build, directory):
    return peft.PeftModel.from_pretrained(build(), str(directory)).eval()


def assert_untouched(model, before, ids):
    """No adaptation, no hooked forward, base trainable and outputs bit-identical."""
    assert not hasattr(model, "adaptune")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(every_output(model, ids), before, atol=0, rtol=0)


# ---- adaptune -> PEFT -> adaptune ---------------------------------------------------------------

CASES = {  # name: (base model, spec given the kind)
    "bert-qkv-ffn": (tiny_bert, lambda K: {"attn": K(4, alpha=8), "ffn": K(2)}),
    "gpt2-fused-attn-o": (tiny_gpt2, lambda K: {"attn": K(4, alpha=8), "attn.o": K(2)}),
    "gpt2-q-v-only": (tiny_gpt2, lambda K: {"attn.q": K(4, alpha=8), "attn.v": K(2, alpha=3),
                                            "layers.1.ffn.down": K(3)}),
}


@pytest.mark.parametrize("kind", [LoRA, DoRA])
@pytest.mark.parametrize("case", CASES)
def test_export_matches_peft_and_round_trips(case, kind, ids, tmp_path):
    build, spec = CASES[case]
    model = build()
    base = every_output(model, ids)
    randomize_adaptation(attach(model, spec(kind)))
    expected = every_output(model, ids)
    assert (expected - base).abs().max() > 1e-2  # the components do change the outputs
    export_peft(model, tmp_path / "x")
    assert json.loads((tmp_path / "x" / CONFIG_NAME).read_text())["use_dora"] == (kind is DoRA)
    torch.testing.assert_close(every_output(load_peft(build, tmp_path / "x"), ids), expected, atol=ATOL, rtol=0)
    fresh = build()
    import_peft(fresh, tmp_path / "x")
    torch.testing.assert_close(every_output(fresh, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", [LoRA, DoRA])
def test_fused_slices_become_one_block_lora(kind, tmp_path):
    model = tiny_gpt2()
    a = attach(model, {"layers.0.attn.q": kind(4, alpha=8), "layers.0.attn.v": kind(2, alpha=3)})
    randomize_adaptation(a)
    export_peft(a, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (6, 6, True)  # scales folded into B
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn"]
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.transformer.h.0.attn.c_attn."
    A, B = t[key + "lora_A.weight"], t[key + "lora_B.weight"]  # (6, 32), (96, 6)
    q, v = bound(a, "attn.q", 0)[0], bound(a, "attn.v", 0)[0]
    torch.testing.assert_close(A, torch.cat([q.A, v.A]).detach())
    torch.testing.assert_close(B[:32, :4], 2.0 * q.B.detach())
    torch.testing.assert_close(B[64:, 4:], 1.5 * v.B.detach())
    assert B[32:64].abs().max() == 0 and B[:32, 4:].abs().max() == 0 and B[64:, :4].abs().max() == 0
    if kind is DoRA:
        m = t[key + "lora_magnitude_vector"]  # (96,)
        W = model.transformer.h[0].attn.c_attn.weight.t()  # (96, 32)
        torch.testing.assert_close(m[32:64], W[32:64].norm(dim=1))  # unadapted k rows: factor 1
        torch.testing.assert_close(m[:32], q.magnitude.detach())


def test_export_takes_shared_plus_chosen_task(ids, tmp_path):
    model = tiny_gpt2()
    a = attach(model, {"attn.q": LoRA(4)},
               tasks={"a": {"attn.v": LoRA(2)}, "b": {"attn.v": LoRA(2, alpha=4), "attn.o": LoRA(2)}})
    randomize_adaptation(a)
    with a.using("b"):
        expected = every_output(model, ids)
    export_peft(model, tmp_path / "b", task="b")  # "a" stays active
    assert a.task == "a"
    torch.testing.assert_close(every_output(load_peft(tiny_gpt2, tmp_path / "b"), ids), expected, atol=ATOL, rtol=0)
    with pytest.raises(TaskError, match="'c'"):
        export_peft(model, tmp_path / "c", task="c")


# ---- PEFT -> adaptune ----------------------------------------------------------------------------

PEFT_CASES = {
    "bert": (tiny_bert, dict(target_modules=["query", "value", "dense"], rank_pattern={"intermediate.dense": 2},
                             alpha_pattern={"value": 3})),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             rank_pattern={"h.1.mlp.c_proj": 2})),
}


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("case", PEFT_CASES)
def test_import_matches_peft(case, use_dora, ids, tmp_path):
    build, kw = PEFT_CASES[case]
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, **kw)).eval()
    randomize_peft(peft_model)
    expected = every_output(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path))
    model = build()
    assert (expected - every_output(model, ids)).abs().max() > 1e-2
    a = import_peft(model, tmp_path)
    torch.testing.assert_close(every_output(model, ids), expected, atol=ATOL, rtol=0)
    kind = DoRA if use_dora else LoRA
    specs = {sel: stack[0] for sel, stack in a.specs[None].items()}
    assert all(type(c) is kind for c in specs.values())
    if case == "bert":  # rank_pattern and alpha_pattern read as PEFT reads them
        assert specs["encoder.layer.1.intermediate.dense"] == kind(2, alpha=8)
        assert specs["encoder.layer.0.attention.self.value"] == kind(4, alpha=3)
        assert specs["pooler.dense"] == kind(4, alpha=8)
    else:
        assert specs["transformer.h.1.mlp.c_proj"] == kind(2, alpha=8)
        assert specs["transformer.h.0.attn.c_attn"] == kind(4, alpha=8)


def test_module_paths_match_across_model_classes(ids, tmp_path):
    from transformers import BertForSequenceClassification
    bert = tiny_bert()
    classifier = BertForSequenceClassification(bert.config).eval()
    classifier.bert.load_state_dict(bert.state_dict())
    peft_model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"])).eval()
    randomize_peft(peft_model)
    peft_model.save_pretrained(str(tmp_path / "plain"))  # keys base_model.model.encoder...
    a = import_peft(classifier, tmp_path / "plain")  # modules bert.encoder...
    assert "bert.encoder.layer.1.attention.self.value" in a.specs[None]
    torch.testing.assert_close(every_output(classifier.bert, ids), every_output(peft_model, ids), atol=ATOL, rtol=0)
    export_peft(classifier, tmp_path / "cls")  # keys base_model.model.bert.encoder... into a BertModel
    import_peft(bert, tmp_path / "cls")
    torch.testing.assert_close(every_output(bert, ids), every_output(peft_model, ids), atol=ATOL, rtol=0)


# ---- errors --------------------------------------------------------------------------------------

def _export(tmp_path, build=tiny_gpt2, kind=LoRA):
    model = build()
    randomize_adaptation(attach(model, {"attn": kind(4), "attn.o": kind(2)}))
    export_peft(model, tmp_path / "export")
    return tmp_path / "export"


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("problem, build, match", [
    ("no directory", tiny_gpt2, "not a directory"),
    ("no weights", tiny_gpt2, WEIGHTS_NAME),
    ("no config", tiny_gpt2, CONFIG_NAME),
    ("wider model", lambda: tiny_gpt2(n_embd=48), r"shape \(\d+, 32\).*expected \(\d+, 48\)"),
    ("other architecture", tiny_bert, "matches no module"),
    ("peft type", tiny_gpt2, "peft_type 'IA3'"),
    ("loftq", tiny_gpt2, "init_lora_weights='loftq'"),
    ("lora bias", tiny_gpt2, "lora_bias"),
    ("rank pattern", tiny_gpt2, r"shape \(12, 32\).*r=3: expected \(3, 32\)"),
    ("extra tensor", tiny_gpt2, "unsupported tensor 'base_model.model.transformer.wte.lora_B.bias'"),
    ("half an embedding lora", tiny_gpt2, "'transformer.wte' lacks lora_embedding_B"),
    ("dora without magnitude", tiny_gpt2, "lacks lora_magnitude_vector"),
])
def test_import_errors_leave_model_unchanged(problem, build, match, ids, tmp_path):
    directory = _export(tmp_path)
    if problem == "no directory":
        directory = tmp_path / "missing"
    elif problem in ("no weights", "no config"):
        os.remove(directory / (WEIGHTS_NAME if problem == "no weights" else CONFIG_NAME))
    elif problem in ("peft type", "loftq", "lora bias", "rank pattern", "dora without magnitude"):
        _edit_config(directory, **{"peft type": {"peft_type": "IA3"}, "loftq": {"init_lora_weights": "loftq"},
                                   "lora bias": {"lora_bias": True}, "dora without magnitude": {"use_dora": True},
                                   "rank pattern": {"rank_pattern": {"c_attn": 3}}}[problem])
    elif problem in ("extra tensor", "half an embedding lora"):
        tensors = load_file(str(directory / WEIGHTS_NAME))
        extra = "lora_B.bias" if problem == "extra tensor" else "lora_embedding_A"
        tensors["base_model.model.transformer.wte." + extra] = torch.zeros(4, 96)
        save_file(tensors, str(directory / WEIGHTS_NAME))
    model = build()
    before = every_output(model, ids)
    with pytest.raises(LoadError, match=match):
        import_peft(model, directory)
    assert_untouched(model, before, ids)


def test_export_refuses_other_components_unless_skipped(tmp_path):
    model = tiny_gpt2()
    a = attach(model, {"attn": LoRA(4), "ffn": Adapter(8)})
    with pytest.raises(AdaptuneError, match="only LoRA and DoRA export.*Adapter"):
        export_peft(a, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    export_peft(a, tmp_path / "x", skip_unsupported=True)
    keys = load_file(str(tmp_path / "x" / WEIGHTS_NAME))
    assert len(keys) == 4 and all(".attn.c_attn.lora_" in k for k in keys)


def test_export_refuses_mixed_kinds_and_merged_state(tmp_path):
    a = attach(tiny_gpt2(), {"attn.q": LoRA(4), "attn.o": DoRA(4)})
    with pytest.raises(AdaptuneError, match="use_dora"):
        export_peft(a, tmp_path / "x")
    a = attach(tiny_gpt2(), {"attn": LoRA(4)})
    a.merge()
    with pytest.raises(AdaptuneError, match="unmerge"):
        export_peft(a, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("failure", ["while writing", "while exchanging", "while renaming (no exchange)"])
def test_failed_export_keeps_the_previous_one(failure, tmp_path, monkeypatch):
    model = tiny_gpt2()
    a = attach(model, {"attn": LoRA(4)})
    randomize_adaptation(a, seed=1)
    export_peft(a, tmp_path / "x")
    before = _snapshot(tmp_path / "x")
    randomize_adaptation(a, seed=2)
    if failure == "while writing":
        def write(directory, config, tensors):
            save_file(tensors, str(directory / WEIGHTS_NAME))
            raise OSError("disk full")
        monkeypatch.setattr(peft_export, "_write_files", write)
    elif failure == "while exchanging":
        def exchange(a, b):
            raise OSError("exchange failed")
        monkeypatch.setattr(files, "exchange", exchange)
    else:  # a system without exchange: two renames
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
        rename, calls = os.rename, []
        def flaky(src, dst):  # the old export moves aside, then the new one fails to move in
            calls.append(src)
            if len(calls) == 2:
                raise OSError("rename failed")
            rename(src, dst)
        monkeypatch.setattr(files.os, "rename", flaky)
    with pytest.raises(OSError):
        export_peft(a, tmp_path / "x")
    monkeypatch.undo()
    assert _snapshot(tmp_path / "x") == before
    assert os.listdir(tmp_path) == ["x"]  # no temporary siblings left
    export_peft(a, tmp_path / "x")  # a working export replaces it
    assert _snapshot(tmp_path / "x") != before and os.listdir(tmp_path) == ["x"]


def test_export_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("keep me")
    with pytest.raises(AdaptuneError, match="notes.txt"):
        export_peft(attach(tiny_gpt2(), {"attn": LoRA(4)}), tmp_path / "x")
    assert os.listdir(tmp_path / "x") == ["notes.txt"]
