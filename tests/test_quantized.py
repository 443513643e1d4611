"""Components on quantized frozen bases (bitsandbytes nf4, fp4, int8 on the CPU), against a float twin whose
weights are the dequantized ones.

Tolerances: with a float32 compute dtype, nf4 and fp4 layers compute x·Wᵀ from the dequantized W in float32,
so the twin agrees to float32 rounding (ATOL_4BIT). LLM.int8() also quantizes the activations (int8 rows with
absmax scales), so an int8 layer differs from its dequantized twin by about |x|·|W|/127 per product; the logits
and gradients of these tiny models agree to a few percent of their scale (RTOL_INT8)."""
import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.on_device  # on $ADAPTUNE_TEST_DEVICE when set (conftest.py): bitsandbytes' CUDA kernels

from helpers import VOCAB, bound, tiny_llama  # noqa: E402

from adaptune import (Adapter, BindError, BitFit, ConfigError, DoRA, HyperAdapter, LoRA, MergeError, Prefix,  # noqa: E402
                      PromptTuning, Trainable, attach, detach, load)
from adaptune.quantized import QuantizedWeight, quantize, scheme  # noqa: E402

SCHEMES = ["nf4", "fp4", "int8"]
ATOL_4BIT = 2e-4
RTOL_INT8 = 0.05
SPECS = {
    "lora": {"attn": LoRA(4), "ffn": LoRA(4)},
    "dora": {"attn": DoRA(4), "ffn": DoRA(4)},
    "bitfit": {"attn": BitFit(), "ffn": BitFit()},
    "adapter": {"attn": Adapter(8), "ffn": Adapter(8, placement="parallel")},
    "hyper": {"ffn": HyperAdapter(8, task_dim=8, hidden=16)},
    "prefix": {"attn": Prefix(3)},
    "prompt": {"embed": PromptTuning(3)},
    "head": {"lm_head": Trainable()},
}


def quantized_pair(name: str, seed: int = 0):
    """A tiny Llama quantized to `name`, and its float twin holding the dequantized weights."""
    model = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=seed)
    quantize(model, name)
    twin = tiny_llama(hidden=64, heads=4, kv_heads=2, seed=seed)
    with torch.no_grad():
        for path, module in model.named_modules():
            if scheme(module):
                twin.get_submodule(path).weight.copy_(QuantizedWeight(module).dequantize())
    return model, twin


def ids_batch(n: int = 2, t: int = 7):
    return torch.randint(2, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))


def randomize(adaptation, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adaptation.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def close(a, b, name: str) -> None:
    if name == "int8":
        assert (a - b).abs().max() <= RTOL_INT8 * b.abs().max(), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b, atol=ATOL_4BIT, rtol=0)


def test_quantize_makes_bitsandbytes_layers_and_leaves_the_head():
    model, _ = quantized_pair("nf4")
    kinds = {type(m).__name__ for m in model.model.layers.modules()}
    assert "Linear4bit" in kinds and "Linear" not in kinds
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ConfigError, match="unknown quantization 'nf3'; valid: nf4, fp4, int8"):
        quantize(tiny_llama(), "nf3")


@pytest.mark.parametrize("name", SCHEMES)
def test_the_quantized_weight_is_what_the_layer_computes(name):
    model, _ = quantized_pair(name)
    layer = model.model.layers[0].self_attn.q_proj
    weight = QuantizedWeight(layer)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    close(weight.linear(x), x @ weight.dequantize().T, name)
    close(weight.times(x[:3]), weight.dequantize() @ x[:3].T, name)
    torch.testing.assert_close(weight.row_norm_sq(), weight.dequantize().pow(2).sum(1))
    torch.testing.assert_close(weight[8:24].dequantize(), weight.dequantize()[8:24])
    assert weight.shape == (64, 64) and weight[8:24].shape == (16, 64)


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("kind", list(SPECS))
def test_components_on_a_quantized_base_start_there_and_train_as_on_its_float_twin(name, kind):
    model, twin = quantized_pair(name)
    ids = ids_batch()
    base = model(input_ids=ids).logits
    adaptation = attach(model, SPECS[kind])
    if kind not in ("prefix", "prompt"):  # those two change the output from the start, by design
        torch.testing.assert_close(model(input_ids=ids).logits, base)
    randomize(adaptation)
    twin_adaptation = attach(twin, SPECS[kind])
    twin_adaptation.load_state_dict(adaptation.state_dict())
    quantized, floated = model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert torch.isfinite(quantized).all() and (quantized[:, -ids.shape[1]:] - base).abs().max() > 1e-3
    close(quantized, floated, name)
    quantized.square().mean().backward()
    floated.square().mean().backward()
    for (n, p), q in zip(adaptation.named_parameters(), twin_adaptation.parameters()):
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
            close(p.grad, q.grad, name)
    frozen = [p for p in model.parameters() if not any(p is q for q in adaptation.parameters())]
    assert all(p.grad is None for p in frozen)  # the base stays frozen (and quantized)
    assert {type(m).__name__ for m in model.model.layers.modules()} >= {"Linear4bit" if name != "int8" else
                                                                        "Linear8bitLt"}


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_gradient_checkpointing_trains_on_a_quantized_base(name):
    model, _ = quantized_pair(name)
    checkpointing = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    checkpointing()
    model.train()
    adaptation = attach(model, {"attn": DoRA(4), "ffn": LoRA(4)})
    randomize(adaptation)
    ids = ids_batch()
    model(input_ids=ids).logits.square().mean().backward()
    trained = [(n, p) for n, p in adaptation.named_parameters() if p.requires_grad]
    checkpointed = {n: p.grad.clone() for n, p in trained if p.grad is not None}
    assert trained and checkpointed.keys() == {n for n, _ in trained}
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in checkpointed.values())
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.zero_grad(set_to_none=True)  # the same step without recomputation gives the same gradients
    model(input_ids=ids).logits.square().mean().backward()
    for n, p in trained:
        torch.testing.assert_close(checkpointed[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_a_mixed_batch_routes_each_sample_as_its_task_alone(name):
    model, _ = quantized_pair(name)
    adaptation = attach(model, tasks={"a": {"attn": LoRA(4)}, "b": {"attn": DoRA(2), "ffn": Adapter(8)}})
    randomize(adaptation)
    ids = ids_batch(3)
    alone = []
    for i, task in enumerate(["a", "b", "a"]):
        with adaptation.using(task):
            alone.append(model(input_ids=ids[i:i + 1]).logits)
    with adaptation.route(["a", "b", "a"]):
        mixed = model(input_ids=ids).logits
    close(mixed, torch.cat(alone), name)


@pytest.mark.parametrize("name", SCHEMES)
def test_merge_requantizes_reports_its_error_and_unmerge_restores_the_storage_bit_for_bit(name):
    model, _ = quantized_pair(name)
    adaptation = attach(model, {"attn": LoRA(4), "ffn": DoRA(4)})
    randomize(adaptation)
    merged_at = {b.point.where(): b for b in adaptation.bindings()}  # q, k, v, up, down in 2 layers
    layers = [b.point.module for b in merged_at.values()]
    before = [(m.weight.data.clone(), QuantizedWeight(m).dequantize()) for m in layers]
    ids = ids_batch()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with pytest.warns(RuntimeWarning, match=r"requantized 10 quantized weight\(s\).*merge_errors"):
            adaptation.merge()
        merged = model(input_ids=ids).logits
    assert len(adaptation.merge_errors) == len(layers) == 10  # q, k, v, up, down in 2 layers
    assert not torch.equal(merged, unmerged)
    assert list(adaptation.merge_errors) == list(merged_at)
    for (where, (most, relative)), m, (_, w) in zip(adaptation.merge_errors.items(), layers, before):
        with torch.no_grad():
            intended = merged_at[where].module.merged_weight(w)  # W + ΔW, what requantization approximates
        error = QuantizedWeight(m).dequantize() - intended
        assert most == pytest.approx(float(error.abs().max())) and 0 < most
        assert relative == pytest.approx(float(error.norm() / intended.norm())) and relative < 0.2
    adaptation.unmerge()
    for m, (data, w) in zip(layers, before):
        current = m.weight.data if name != "int8" else m.state.CB
        if name != "int8" and getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            continue  # bitsandbytes repacked it for its CPU kernel since: compare what it computes below
        assert torch.equal(current, data)
        assert torch.equal(QuantizedWeight(m).dequantize(), w)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_save_and_load_on_a_quantized_base(name, tmp_path):
    model, _ = quantized_pair(name)
    adaptation = attach(model, {"attn": DoRA(4), "ffn": Adapter(8)})
    randomize(adaptation)
    ids = ids_batch()
    expected = model(input_ids=ids).logits
    adaptation.save(tmp_path / "q.safetensors")
    detach(model)
    fresh, _ = quantized_pair(name)
    load(fresh, tmp_path / "q.safetensors")
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected)


def test_dora_starts_at_the_row_norms_of_the_dequantized_weight():
    model, _ = quantized_pair("nf4")
    adaptation = attach(model, {"layers.0.attn.q": DoRA(4)})
    (dora,) = bound(adaptation, "attn.q", 0)
    weight = QuantizedWeight(model.model.layers[0].self_attn.q_proj).dequantize()
    torch.testing.assert_close(dora.magnitude.detach(), weight.norm(dim=1))


@pytest.mark.parametrize("spec, words", [
    ({"model.layers.0.self_attn": Trainable()}, "Trainable() at model.layers.0.self_attn (layer None): the layer "
                                                "(its submodule 'q_proj') is quantized (bitsandbytes nf4)"),
    ({"model.layers.0.self_attn.q_proj": Trainable()}, "keep Trainable for modules left in float (the heads)"),
])
def test_training_a_quantized_module_whole_is_refused_clearly(spec, words):
    model, _ = quantized_pair("nf4")
    with pytest.raises(BindError) as err:
        attach(model, spec)
    assert words in str(err.value)
    assert not hasattr(model, "adaptune")


def test_no_float_copy_of_a_quantized_weight_is_kept():
    """Attaching adds only the components: no float copy of a quantized weight is kept anywhere."""
    model, _ = quantized_pair("nf4")
    before = {id(t) for t in (*model.parameters(), *model.buffers())}
    adaptation = attach(model, {"attn": DoRA(4), "ffn": DoRA(4)})
    model(input_ids=ids_batch()).logits.sum().backward()
    added = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in before]
    ours = {id(t) for t in (*adaptation.parameters(), *adaptation.buffers())}
    assert added and all(id(t) in ours for t in added)
    assert max(t.numel() for t in (*adaptation.parameters(), *adaptation.buffers())) < 64 * 64  # no weight's size


@pytest.mark.parametrize("component", [LoRA, DoRA])
def test_export_and_import_of_a_qlora_adapter_match_peft_on_the_same_4bit_base(component, tmp_path):
    peft = pytest.importorskip("peft")
    from adaptune import export_peft, import_peft

    model, _ = quantized_pair("nf4")
    # Both sides stay in train mode (no dropout here): in eval without gradients, on CPUs with AVX512-BF16,
    # bitsandbytes repacks a 4-bit weight for its bf16 kernel, and saving a state dict unpacks it with its
    # scales rounded to bf16, so the base itself would drift between the two models
    adaptation = attach(model, {"attn": component(4, alpha=8), "ffn": component(4, alpha=8)})
    randomize(adaptation)
    ids = ids_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_peft(adaptation, tmp_path / "qlora")
    detach(model)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "qlora").train()
    assert any(type(m).__module__.startswith("peft.tuners.lora.bnb") for m in theirs.modules())
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=ATOL_4BIT, rtol=0)
        import_peft(model, tmp_path / "qlora")
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_an_adapter_peft_trained_on_a_4bit_base_imports_with_its_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from adaptune import import_peft

    model, _ = quantized_pair("nf4")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    ids = ids_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path / "theirs")
    import_peft(model, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=ATOL_4BIT, rtol=0)


@pytest.mark.parametrize("options", [{"double_quant": True}, {"compute_dtype": torch.bfloat16}],
                         ids=["double-quantization", "bf16-compute"])
def test_double_quantization_and_a_half_compute_dtype(options):
    """The float32 twin bounds the bf16 compute's rounding (about 2⁻⁸ of the logits' scale); double
    quantization changes the scales, not the computation, so it keeps float32's agreement."""
    model = quantize(tiny_llama(hidden=64, heads=4, kv_heads=2), "nf4", **options)
    twin = tiny_llama(hidden=64, heads=4, kv_heads=2)
    with torch.no_grad():
        for path, module in model.named_modules():
            if scheme(module):
                twin.get_submodule(path).weight.copy_(QuantizedWeight(module).dequantize())
    adaptation = attach(model, {"attn": DoRA(4), "ffn": LoRA(4)})
    randomize(adaptation)
    attach(twin, {"attn": DoRA(4), "ffn": LoRA(4)}).load_state_dict(adaptation.state_dict())
    ids = ids_batch()
    out, expected = model(input_ids=ids).logits, twin(input_ids=ids).logits
    tolerance = 2e-2 if "compute_dtype" in options else ATOL_4BIT
    assert (out.float() - expected).abs().max() <= tolerance * max(1.0, float(expected.abs().max()))
    out.float().square().mean().backward()
    grads = [p.grad for p in adaptation.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    storage = [m.weight.data.clone() for m in model.modules() if scheme(m)]
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="requantized"):
        adaptation.merge()
    adaptation.unmerge()
    assert all(torch.equal(a, m.weight.data) for a, m in zip(storage, [m for m in model.modules() if scheme(m)]))


@pytest.mark.parametrize("options", [{}, {"double_quant": True}], ids=["nf4", "nf4-double"])
def test_row_blocks_dequantize_as_the_whole(options, monkeypatch):
    """Row norms from blocks of rows (here 16) equal the whole weight's, also after bitsandbytes repacked a weight
    for its CPU kernel (eval, no gradients, where the CPU has AVX512-BF16)."""
    import adaptune.quantized as quantized
    model = quantize(tiny_llama(hidden=64, heads=4, kv_heads=2), "nf4", **options)
    layer = model.model.layers[0].mlp.up_proj  # (intermediate, 64)
    whole = quantized._dequantize(layer).float()
    monkeypatch.setattr(quantized, "ROWS_PER_BLOCK", 16)
    weight = QuantizedWeight(layer)
    torch.testing.assert_close(weight.row_norm_sq(), whole.pow(2).sum(1))
    torch.testing.assert_close(weight.dequantize((5, 40)), whole[5:40])
    model.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))  # may repack the storage (bitsandbytes' choice on this CPU), its scales in bf16
    torch.testing.assert_close(weight.dequantize((5, 40)), quantized._dequantize(layer).float()[5:40])
    torch.testing.assert_close(weight.dequantize(), whole, atol=0, rtol=2 ** -7)  # bf16 scales: 8 bits


def torchao_pair():
    """A tiny Llama with torchao weight-only int8 Linears (heads left in float), and its dequantized float twin."""
    torchao = pytest.importorskip("torchao.quantization")
    model, twin = tiny_llama(hidden=64, heads=4, kv_heads=2), tiny_llama(hidden=64, heads=4, kv_heads=2)
    torchao.quantize_(model.model, torchao.Int8WeightOnlyConfig())
    with torch.no_grad():
        for path, module in model.named_modules():
            if scheme(module):
                twin.get_submodule(path).weight.copy_(QuantizedWeight(module).dequantize())
    return model, twin


@pytest.mark.parametrize("kind", ["lora", "dora", "adapter"])
def test_torchao_int8_weights_take_components_as_bitsandbytes_ones_do(kind):
    model, twin = torchao_pair()
    assert scheme(model.model.layers[0].self_attn.q_proj) == "torchao Int8Tensor"
    ids = ids_batch()
    base = model(input_ids=ids).logits
    adaptation = attach(model, SPECS[kind])
    torch.testing.assert_close(model(input_ids=ids).logits, base)
    randomize(adaptation)
    attach(twin, SPECS[kind]).load_state_dict(adaptation.state_dict())
    out, expected = model(input_ids=ids).logits, twin(input_ids=ids).logits
    torch.testing.assert_close(out, expected, atol=ATOL_4BIT, rtol=0)  # weight-only: float activations
    out.square().mean().backward()
    grads = [p.grad for p in adaptation.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    if kind != "adapter":
        with pytest.raises(MergeError, match=r"quantized \(torchao Int8Tensor\), which adaptune does not requantize"):
            adaptation.merge()
        assert not adaptation.merged


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_merged_float_is_a_plain_float_model_computing_what_the_adapted_one_does(name):
    from adaptune import merged_float

    model, _ = quantized_pair(name)
    adaptation = attach(model, {"attn": LoRA(4), "ffn": DoRA(4), "lm_head": Trainable()})
    randomize(adaptation)
    ids = ids_batch()
    expected = model(input_ids=ids).logits
    plain = merged_float(model)
    assert not hasattr(plain, "adaptune") and not any(scheme(m) for m in plain.modules())
    assert {type(m).__name__ for m in plain.model.layers.modules()} >= {"Linear"}
    close(plain(input_ids=ids).logits, expected, name)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)  # the adapted model as it was
    detach(model)
    attach(model, {"ffn": Adapter(8)})
    with pytest.raises(MergeError, match="the active AdapterModule cannot be folded"):
        merged_float(model)


def test_training_after_an_evaluation_still_reaches_every_component():
    """On CPUs with AVX512-BF16 bitsandbytes repacks a 4-bit weight for a kernel without backward the first time
    the layer runs in eval mode without gradients; while adapted, the layers keep their differentiable path."""
    model, _ = quantized_pair("nf4")
    adaptation = attach(model, {"layers.0.attn.q": LoRA(4), "layers.1.ffn": Adapter(8)})
    randomize(adaptation)
    ids = ids_batch()
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    model.train()
    trained = model(input_ids=ids).logits
    torch.testing.assert_close(trained, evaluated)
    trained.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adaptation.parameters())


def test_gpt2s_conv1d_projections_quantize_transposed_and_take_lora_on_fused_slices():
    from helpers import tiny_gpt2

    model, twin = quantize(tiny_gpt2(n_embd=64), "nf4"), tiny_gpt2(n_embd=64)
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    with torch.no_grad():
        for path, module in model.named_modules():
            if scheme(module):  # Conv1D stores (in, out)
                twin.get_submodule(path).weight.copy_(QuantizedWeight(module).dequantize().T)
    ids = ids_batch()
    torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, atol=ATOL_4BIT, rtol=0)
    adaptation = attach(model, {"attn.q": DoRA(4), "attn.v": LoRA(4), "ffn": LoRA(4)})
    randomize(adaptation)
    attach(twin, {"attn.q": DoRA(4), "attn.v": LoRA(4), "ffn": LoRA(4)}).load_state_dict(adaptation.state_dict())
    torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, atol=ATOL_4BIT, rtol=0)


@pytest.mark.parametrize("make", ["gpt2", "llama"])
def test_narrow_4bit_layers_evaluate_without_bitsandbytes_cpu_repacking_error(make):
    """bitsandbytes' CPU repacking needs widths in multiples of its block (64); quantize() keeps narrower layers
    off it, so evaluation of a model it quantized runs (hidden size 32 here)."""
    from helpers import tiny_gpt2

    model = quantize(tiny_gpt2() if make == "gpt2" else tiny_llama(), "nf4").eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids_batch()).logits).all()


def test_counts_take_a_quantized_weight_as_in_float():
    model, twin = quantized_pair("nf4")
    assert attach(model, {"attn": LoRA(4)}).counts() == attach(twin, {"attn": LoRA(4)}).counts()
