"""torch.compile(model, fullgraph=True) on adapted tiny GPT-2, Llama and BERT, in training mode: the outputs
and the component parameters' gradients equal eager's. The matrix runs the aot_eager backend (dynamo's
whole-graph capture and AOT autograd, where graph breaks and tracing errors arise); inductor runs one case
(GPT-2's fused c_attn, with the kernels where they build)."""
import pytest
import torch
from helpers import VOCAB, main_output, randomize, tiny_bert, tiny_gpt2, tiny_llama

from adaptune import attach, ops
from adaptune.spec import parse_spec

MODELS = {  # dropout off: training mode without random masks, so eager and compiled see the same function
    "gpt2": lambda **kw: tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw),
    "llama": tiny_llama,
    "bert": lambda **kw: tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw),
}
SPECS = ["attn=LoRA(4)", "attn=DoRA(4)", "ffn=Adapter(8, act='gelu')", "attn=Prefix(3)", "embed=PromptTuning(3)"]
FUSED = ["attn.q=LoRA(4)", "attn.q=DoRA(4)", "attn.q=DoRA(4, detach_norm=False)"]  # GPT-2: rows of c_attn
TOL = dict(rtol=1e-4, atol=1e-5)  # float32, sums in a different order


def check_compiles(name: str, spec: str, backend: str = "aot_eager", **config) -> None:
    torch._dynamo.reset()
    model = MODELS[name](**config)
    attach(model, parse_spec(spec))
    randomize(model.adaptune)  # off the identity start, so every factor gets a gradient
    model.train()
    params = list(model.adaptune.parameters())
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))

    def run(fn):
        out = main_output(fn(ids))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # not a plain sum: a
        return out, torch.autograd.grad((out * weights).sum(), params)  # LayerNorm'd sum has no gradient

    eager, eager_grads = run(model)  # first: DoRA's ‖W_i‖² cache is filled before compiling
    compiled, grads = run(torch.compile(model, fullgraph=True, backend=backend))
    torch.testing.assert_close(compiled, eager, **TOL)
    assert len(grads) == len(eager_grads) > 0
    for got, want in zip(grads, eager_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", list(MODELS))
def test_adapted_model_compiles_fullgraph(name, spec):
    check_compiles(name, spec)


@pytest.mark.parametrize("kernels", ["off", "auto"])
@pytest.mark.parametrize("spec", FUSED)
def test_gpt2_fused_slices_compile_fullgraph(spec, kernels):
    with ops.use_kernels(kernels):
        check_compiles("gpt2", spec)


def test_inductor_compiles_lora_on_gpt2_fused_slices():
    check_compiles("gpt2", "attn=LoRA(4)", backend="inductor", n_layer=1)  # one layer: inductor's codegen is slow
