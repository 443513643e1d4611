"""Bad input, table-driven: each case raises the named error with a message naming the problem, and
leaves the model and every file on disk as they were. (More cases: test_errors.py, test_save_load.py,
test_peft_format.py, test_crash_safe.py, test_half_precision.py.)"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from adaptune import (PSA, Adapter, AdaptuneError, BindError, BitFit, ConfigError, DoRA, LoadError, LoRA,
                      MergeError, Prefix, PromptTuning, SiteError, TaskError, Trainable, WriteError, attach, detach,
                      export_peft, import_peft, load, parse_spec)
from adaptune.peft_export import CONFIG_NAME, WEIGHTS_NAME
from helpers import bound, tiny_gpt2, tiny_llama, VOCAB

NAN, INF = math.nan, math.inf


class Ctx:
    """A tiny GPT-2 (no adaptation), and a directory holding a saved adaptation and a PEFT export."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.model = tiny_gpt2()
        donor = tiny_gpt2()
        adaptation = attach(donor, {"attn": LoRA(4)}, tasks={"t1": {"ffn": Adapter(8)}})
        self.saved = adaptation.save(tmp_path / "a.safetensors")
        self.peft = export_peft(adaptation, tmp_path / "peft", skip_unsupported=True)

    def files(self):
        return {str(p.relative_to(self.dir)): p.read_bytes() for p in sorted(self.dir.rglob("*")) if p.is_file()}

    def state(self):
        return {k: v.clone() for k, v in self.model.state_dict().items()}, hasattr(self.model, "adaptune")

    def tampered(self, name, meta=None, tensors=None):
        """A copy of the saved file with other metadata or tensors."""
        from safetensors import safe_open
        with safe_open(str(self.saved), framework="pt") as f:
            raw, own = f.metadata()["adaptune"], {k: f.get_tensor(k) for k in f.keys()}
        path = self.dir / name
        save_file(tensors(own) if tensors else own, str(path), metadata={"adaptune": meta(raw) if meta else raw})
        return path

    def peft_with(self, name, **config):
        """A copy of the PEFT export with config keys replaced (written with NaN / Infinity as JSON allows)."""
        path = self.dir / name
        path.mkdir()
        (path / WEIGHTS_NAME).write_bytes((self.peft / WEIGHTS_NAME).read_bytes())
        data = json.loads((self.peft / CONFIG_NAME).read_text()) | config
        (path / CONFIG_NAME).write_text(json.dumps(data))
        return path


def _detached(c):
    a = attach(c.model, {"attn": LoRA(4)})
    detach(c.model)
    return a


def _merged_training(c):
    a = attach(c.model, {"attn": LoRA(4)})
    a.merge()
    c.model.train()
    try:
        c.model(input_ids=torch.randint(2, VOCAB, (1, 4)))
    finally:
        c.model.eval()
        detach(c.model)


def _peft_wrapped(c):
    import peft
    wrapped = peft.get_peft_model(c.model, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    try:
        attach(wrapped, {"attn": LoRA(4)})
    finally:
        wrapped.unload()


def _export_peft_wrapped(c):
    """adaptune on a model PEFT wraps (its LoRA on c_attn, adaptune's on the feed-forward): the paths carry PEFT's
    base_model.model. prefix, which an export would write twice."""
    import peft
    wrapped = peft.get_peft_model(c.model, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    try:
        attach(wrapped, {"base_model.model.transformer.h.*.mlp.c_fc": LoRA(4)})
        export_peft(wrapped, c.dir / "wrapped")
    finally:
        if hasattr(wrapped, "adaptune"):
            detach(wrapped)
        wrapped.unload()


def _latent_divisor(c):
    """A latent of 2 rows on a batch of 4, outside generate(): not one row per sample."""
    adaptation = attach(c.model, {"attn": PSA(8)})
    with torch.no_grad(), adaptation.condition(torch.randn(2, 8)):
        c.model(input_ids=torch.randint(2, VOCAB, (4, 5)))


def _long_prompt(c):
    attach(c.model, {"embed": PromptTuning(10)})
    try:
        c.model(input_ids=torch.randint(2, VOCAB, (1, 125)))
    finally:
        detach(c.model)


def _nan_tensor(own):
    key = sorted(own)[0]
    return own | {key: torch.full_like(own[key], NAN)}


def _peft_nan(c):
    from safetensors.torch import load_file
    path = c.peft_with("pn")
    save_file(_nan_tensor(load_file(str(path / WEIGHTS_NAME))), str(path / WEIGHTS_NAME))
    return import_peft(c.model, path)


def _read_only_replace(c, monkeypatch):
    def denied(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", denied)
    attach(c.model, {"attn": LoRA(4)})
    try:
        c.model.adaptune.save(c.saved)
    finally:
        monkeypatch.undo()
        detach(c.model)


# stand-ins of quantized layers adaptune does not support: names and storage of bitsandbytes' and torchao's, but
# not their quantization state (tests/test_quantized.py runs the real bitsandbytes layers)
class Linear4bit(torch.nn.Linear):
    """bitsandbytes' 4-bit Linear: an nn.Linear whose weight is packed uint8 storage (in·out/2, 1); its forward
    dequantizes (here: a float copy kept aside)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        packed = torch.randint(0, 256, (linear.in_features * linear.out_features // 2, 1), dtype=torch.uint8)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.register_buffer("dequantized", linear.weight.detach().clone())

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantized.to(x.dtype), self.bias)


Linear4bit.__module__ = "bitsandbytes.nn.modules"


class AffineQuantizedTensor(torch.Tensor):
    """torchao's quantized weight: a tensor subclass that reports the float dtype and shape."""


AffineQuantizedTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"


def _with_weight(linear, weight):
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear


def _packed(linear):  # a plain Linear holding packed 4-bit storage, no telltale class name
    return _with_weight(linear, torch.zeros(linear.in_features * linear.out_features // 2, 1, dtype=torch.uint8))


def _int8(linear):  # bitsandbytes' Linear8bitLt after quantization: int8 rows of the weight's shape
    return _with_weight(linear, torch.zeros(linear.out_features, linear.in_features, dtype=torch.int8))


def _torchao(linear):
    return _with_weight(linear, linear.weight.detach().clone().as_subclass(AffineQuantizedTensor))


def quantized_llama(make, where=("q_proj",)):
    """A tiny Llama whose layer 0 has the projections `where` replaced by `make(projection)`."""
    model = tiny_llama()
    layer = model.model.layers[0]
    for name in where:
        parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
        setattr(parent, name, make(getattr(parent, name)))
    return model


def _attach_quantized(make, spec):
    """attach(spec) to a tiny Llama with a quantized q_proj in layer 0: refused, the model left as it was."""
    model = quantized_llama(make)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    try:
        attach(model, spec)
    finally:
        assert not hasattr(model, "adaptune") and [p.requires_grad for p in model.parameters()] == flags
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


CASES = {
    # non-finite numbers
    "LoRA alpha inf": (lambda c: LoRA(4, alpha=INF), ConfigError, "alpha must be a positive finite number, got inf"),
    "LoRA alpha nan": (lambda c: LoRA(4, alpha=NAN), ConfigError, "alpha must be a positive finite number, got nan"),
    "LoRA dropout nan": (lambda c: LoRA(4, dropout=NAN), ConfigError, "dropout must be a float in [0, 1)"),
    "Adapter scale nan": (lambda c: Adapter(8, scale=NAN), ConfigError, "scale must be a positive finite number"),
    "PEFT lora_alpha NaN": (lambda c: import_peft(c.model, c.peft_with("p1", lora_alpha=NAN)), LoadError,
                            "alpha must be a positive finite number"),
    "PEFT lora_alpha Infinity": (lambda c: import_peft(c.model, c.peft_with("p2", lora_alpha=INF)), LoadError,
                                 "alpha must be a positive finite number"),
    "saved tensor NaN": (lambda c: load(c.model, c.tampered("n.safetensors", tensors=_nan_tensor)), LoadError,
                         "holds NaN or inf"),
    "PEFT tensor NaN": (_peft_nan, LoadError, "holds NaN or inf"),
    # repeats and types in specs
    "repeated selector": (lambda c: parse_spec("attn=LoRA(4); attn=Adapter(8)"), ConfigError, "appears twice"),
    "repeated argument": (lambda c: parse_spec("attn=LoRA(r=4, r=5)"), ConfigError, "gives r more than once"),
    "positional and keyword": (lambda c: parse_spec("attn=LoRA(4, r=5)"), ConfigError, "bad arguments"),
    "spec None": (lambda c: parse_spec(None), ConfigError, "a spec is text"),
    "spec int": (lambda c: parse_spec(123), ConfigError, "got int: 123"),
    "reversed layer range": (lambda c: attach(c.model, {"layers.1-0.attn": LoRA(4)}), SiteError,
                             "is a reversed range; write 0-1"),
    # stale handles and wrong models
    "detached merge": (lambda c: _detached(c).merge(), AdaptuneError, "was detached"),
    "detached use": (lambda c: _detached(c).use(None), AdaptuneError, "was detached"),
    "detached save": (lambda c: _detached(c).save(c.dir / "new.safetensors"), AdaptuneError, "was detached"),
    "detached counts": (lambda c: _detached(c).counts(), AdaptuneError, "was detached"),
    "detached enable": (lambda c: _detached(c).disable(), AdaptuneError, "was detached"),
    "detached export": (lambda c: export_peft(_detached(c), c.dir / "new"), AdaptuneError, "was detached"),
    "training while merged": (_merged_training, MergeError, "merged components get no gradient"),
    "task as a list": (lambda c: attach(c.model, tasks={"t1": {"ffn": Adapter(4)}}).use(["t1"]), TaskError,
                       "a task is named by a string"),
    "model wrapped by PEFT": (_peft_wrapped, BindError, "already adapted, e.g. by PEFT"),
    "export from a model PEFT wraps": (_export_peft_wrapped, AdaptuneError, "wrapped or adapted by PEFT"),
    "latent repeated outside generate": (_latent_divisor, ConfigError, "the latent has 2 samples, the batch 4"),
    # one error family
    "metadata not JSON": (lambda c: load(c.model, c.tampered("j.safetensors", meta=lambda raw: raw[:-3])),
                          LoadError, "damaged adaptune metadata: not JSON"),
    "metadata without spec": (lambda c: load(c.model, c.tampered("s.safetensors", meta=lambda raw: json.dumps(
        {k: v for k, v in json.loads(raw).items() if k != "spec"}))), LoadError, "'spec' must be"),
    "metadata with a bad stack": (lambda c: load(c.model, c.tampered("k.safetensors", meta=lambda raw: json.dumps(
        json.loads(raw) | {"spec": {"shared": {"attn": [{"type": "Nope"}]}, "tasks": {}}}))), LoadError,
        "its stacks do not rebuild"),
    "metadata active not a name": (lambda c: load(c.model, c.tampered("t.safetensors", meta=lambda raw: json.dumps(
        json.loads(raw) | {"active": [1]}))), LoadError, "'active' must be a task name"),
    "load a directory": (lambda c: load(c.model, c.dir), LoadError, "is a directory"),
    "save to a directory": (lambda c: attach(c.model, {"attn": LoRA(4)}).save(c.dir), WriteError,
                            "it is a directory"),
    "prompt past the positions": (_long_prompt, AdaptuneError, "at most 118 tokens fit"),
    # quantized bases: refused by attach, before anything changes
    "LoRA on a Linear4bit without bitsandbytes' quantization state": (
        lambda c: _attach_quantized(Linear4bit, {"layers.0.attn.q": LoRA(4)}), BindError,
        "bitsandbytes.nn.modules.Linear4bit, which adaptune does not support. Supported: bitsandbytes Linear4bit "
        "(nf4, fp4) and Linear8bitLt"),
    "LoRA on attn beside a Linear4bit": (lambda c: _attach_quantized(Linear4bit, {"attn": LoRA(4)}), BindError,
                                         "at attn.q (layer 0): the layer is quantized"),
    "DoRA on an int8 weight": (lambda c: _attach_quantized(_int8, {"layers.0.attn.q": DoRA(4)}), BindError,
                               "Linear with a torch.int8 weight of shape (32, 32)"),
    "BitFit on a packed uint8 weight": (lambda c: _attach_quantized(_packed, {"layers.0.attn.q": BitFit()}), BindError,
                                        "Linear with a torch.uint8 weight of shape (512, 1)"),
    "LoRA on a float8 weight": (lambda c: _attach_quantized(lambda m: _with_weight(m, m.weight.to(torch.float8_e4m3fn)),
                                                       {"layers.0.attn.q": LoRA(4)}), BindError,
                                "Linear with a torch.float8_e4m3fn weight of shape (32, 32)"),
    "LoRA on a torchao weight": (lambda c: _attach_quantized(_torchao, {"model.layers.0.self_attn.q_proj": LoRA(4)}),
                                 BindError, "a torchao.dtypes.affine_quantized_tensor.AffineQuantizedTensor weight "
                                            "(torch.float32)"),
    "Trainable around a quantized layer": (lambda c: _attach_quantized(Linear4bit, {"model.layers.0.self_attn":
                                                                                    Trainable()}),
                                           BindError, "(its submodule 'q_proj')"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_raises_a_clear_error_and_changes_nothing(name, tmp_path):
    c = Ctx(tmp_path)
    action, error, fragment = CASES[name]
    files, (state, attached) = c.files(), c.state()
    with pytest.raises(error) as raised:
        action(c)
    assert fragment in str(raised.value), str(raised.value)
    if hasattr(c.model, "adaptune") and not attached:
        detach(c.model)  # a case whose attach succeeded before the bad call
    new_state, _ = c.state()
    assert new_state.keys() == state.keys() and all(torch.equal(new_state[k], state[k]) for k in state)
    created = {k for k in c.files() if k not in files}  # tampered inputs the case wrote itself
    assert {k: v for k, v in c.files().items() if k not in created} == files


def test_permission_denied_on_save_keeps_the_old_file(tmp_path, monkeypatch):
    c = Ctx(tmp_path)
    files = c.files()
    with pytest.raises(WriteError, match="permission denied"):
        _read_only_replace(c, monkeypatch)
    assert c.files() == files


def test_loading_a_nonfinite_file_can_be_asked_for(tmp_path):
    c = Ctx(tmp_path)
    adaptation = load(c.model, c.tampered("n.safetensors", tensors=_nan_tensor), allow_nonfinite=True)
    assert not all(torch.isfinite(p).all() for p in adaptation.parameters())


def test_an_adaptation_inside_a_sequential_leaves_its_forward_working():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    before = model(x)
    adaptation = attach(model, {"0": LoRA(2)})
    torch.testing.assert_close(model(x), before)  # B = 0: the LoRA starts as the identity update
    with torch.no_grad():
        bound(adaptation, "0")[0].B.fill_(0.1)
    assert not torch.allclose(model(x), before)
    detach(model)
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("make", [Linear4bit, _packed], ids=["Linear4bit", "packed-uint8"])
def test_components_that_never_read_the_weight_bind_beside_quantized_layers(make):
    """Adapters (serial and parallel) and Prefix size themselves from what the layers declare and live in float32
    beside integer storage; disabled or detached, the model computes what it did."""
    where = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    model = quantized_llama(make, where=where)
    ids = torch.randint(2, VOCAB, (2, 6))
    before = model(input_ids=ids).logits if make is Linear4bit else None
    spec = {"layers.0.attn": Adapter(8) | Prefix(3), "layers.0.ffn": Adapter(8, placement="parallel")}
    adaptation = attach(model, spec)
    modules = [b.module for b in adaptation.bindings()]
    assert modules and all(p.dtype == torch.float32 for m in modules for p in m.parameters())
    assert bound(adaptation, "attn", 0)[0].up_weight.shape == (32, 8)
    assert bound(adaptation, "ffn", 0)[0].down_weight.shape == (8, 32)
    if make is Linear4bit:  # the stand-in computes (its packed twin has no forward of its own)
        model(input_ids=ids).logits.sum().backward()
        with adaptation.disabled():
            torch.testing.assert_close(model(input_ids=ids).logits, before)
    detach(model)
    if make is Linear4bit:
        torch.testing.assert_close(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("which", ["fewshot", "tapt"])
def test_fewshot_and_tapt_from_python_refuse_a_device_this_machine_lacks(which, tmp_path):
    from adaptune.experiments.fewshot.config import FewShotConfig
    from adaptune.experiments.fewshot.run import run
    from adaptune.experiments.fewshot.tapt import TaptConfig, tapt
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = (FewShotConfig if which == "fewshot" else TaptConfig)(out=str(tmp_path / "out"), device="cuda")
    with pytest.raises(ConfigError, match="--device 'cuda'"):
        (run if which == "fewshot" else tapt)(cfg)
    assert not (tmp_path / "out").exists()


def test_a_layer_deepspeed_zero3_already_partitioned_is_refused_naming_zero3():
    """Under ZeRO-3's zero.Init a rank holds a slice of each weight (marked by DeepSpeed's ds_id / ds_shape): binding
    there would read the slice as the weight (it once read as a 'packed' quantized layer)."""
    model = tiny_llama()
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.ds_id, weight.ds_shape = 7, weight.shape  # as DeepSpeed marks the parameters it partitioned
    weight.data = torch.empty(0)
    with pytest.raises(BindError, match="partitioned by DeepSpeed ZeRO-3.*attach before ZeRO-3 partitions"):
        attach(model, {"attn": LoRA(2)})
    assert not hasattr(model, "adaptune")
