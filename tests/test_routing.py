"""route(): a task per sample. Mixed batches equal each sample run alone under its task, for every component
type and stack shape (shared only, per task only, shared and per task on the same and on other sites), with
padding, with and without shared-only samples; gradients equal the per-task batches'; generate with routing
equals per-sample generate."""
import pytest
import torch

from adaptune import (Adapter, AdaptuneError, BitFit, DoRA, HyperAdapter, LoRA, MergeError, Prefix, PromptTuning,
                      TaskError, Trainable, attach)
from adaptune.save_format import read
from helpers import VOCAB, main_output, randomize, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.on_device  # on $ADAPTUNE_TEST_DEVICE when set (conftest.py)

MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama}
HEADS = {"gpt2": "lm_head", "bert": "pooler.dense", "llama": "lm_head"}  # the selector "head" in SPECS


def _none() -> dict:
    return {"a": {}, "b": {}, "c": {}}  # tasks with no components of their own: their samples run the shared ones

# name -> (shared spec, {task: spec})
SPECS = {
    "lora": ({}, {"a": {"attn": LoRA(4)}, "b": {"attn": LoRA(2), "ffn": LoRA(3)}, "c": {"attn.q": LoRA(5)}}),
    "dora": ({}, {"a": {"attn": DoRA(4)}, "b": {"attn": DoRA(2, detach_norm=False)}, "c": {"ffn": DoRA(3)}}),
    "lora+dora": ({}, {"a": {"attn": LoRA(4)}, "b": {"attn": DoRA(2)}, "c": {"attn": LoRA(3)}}),
    "adapter": ({}, {"a": {"ffn": Adapter(8)}, "b": {"ffn": Adapter(4, placement="parallel")},
                     "c": {"attn": Adapter(6, act="gelu"), "ffn": Adapter(6, act="gelu")}}),
    "shared lora + task adapters": ({"attn": LoRA(4)}, {"a": {"ffn": Adapter(8)}, "b": {"ffn": Adapter(4)},
                                                        "c": {"ffn": Adapter(8) | Adapter(4)}}),
    "hyper (shared)": ({"ffn": HyperAdapter(8, task_dim=8, hidden=16)}, {"a": {}, "b": {}, "c": {}}),
    "hyper (per task)": ({}, {"a": {"ffn": HyperAdapter(8, task_dim=8, hidden=16)},
                              "b": {"ffn": HyperAdapter(4, task_dim=8, hidden=16)}, "c": {}}),
    "prefix": ({}, {"a": {"attn": Prefix(3)}, "b": {"attn": Prefix(5)}, "c": {"layers.0.attn": Prefix(2)}}),
    "shared prefix + task prefixes": ({"attn": Prefix(2)}, {"a": {"attn": Prefix(3)}, "b": {}, "c": {"attn": Prefix(4)}}),
    "prompt": ({}, {"a": {"embed": PromptTuning(3)}, "b": {"embed": PromptTuning(5)}, "c": {}}),
    "shared prompt + task prompts": ({"embed": PromptTuning(2)}, {"a": {"embed": PromptTuning(3)}, "b": {}, "c": {}}),
    "bitfit": ({}, {"a": {"ffn": BitFit()}, "b": {"attn": BitFit(), "ffn": BitFit()}, "c": {}}),
    "lora on embed": ({}, {"a": {"embed": LoRA(4)}, "b": {"embed": LoRA(2)}, "c": {"attn": LoRA(2)}}),
    "mixed kinds": ({}, {"a": {"attn": LoRA(4) | Prefix(3), "ffn": Adapter(8)}, "b": {"embed": PromptTuning(4)},
                         "c": {"attn": DoRA(2), "ffn": HyperAdapter(8, task_dim=8, hidden=16)}}),
    "head (per task)": ({}, {"a": {"head": Trainable()}, "b": {"head": Trainable()}, "c": {}}),
    # shared only
    "lora (shared)": ({"attn": LoRA(4), "ffn": LoRA(2)}, _none()),
    "dora (shared)": ({"attn": DoRA(4)}, _none()),
    "adapter (shared)": ({"ffn": Adapter(8), "attn": Adapter(4, placement="parallel")}, _none()),
    "prefix (shared)": ({"attn": Prefix(3)}, _none()),
    "prompt (shared)": ({"embed": PromptTuning(3)}, _none()),
    "bitfit (shared)": ({"attn": BitFit(), "ffn": BitFit()}, _none()),
    "head (shared)": ({"head": Trainable()}, _none()),
    # shared and per task on the same site
    "shared + task adapters on ffn": ({"ffn": Adapter(8)}, {"a": {"ffn": Adapter(4)},
                                                            "b": {"ffn": Adapter(6, placement="parallel")}, "c": {}}),
    "shared hyper + task adapters on ffn": ({"ffn": HyperAdapter(8, task_dim=8, hidden=16)}, {
        "a": {"ffn": Adapter(4)}, "b": {"ffn": HyperAdapter(4, task_dim=8, hidden=16)}, "c": {}}),
    "shared lora + task adapters on attn": ({"attn": LoRA(4)}, {"a": {"attn": Adapter(8)},
                                                                "b": {"attn": Adapter(4, placement="parallel")}, "c": {}}),
    "shared lora on q + task lora/dora on v": ({"attn.q": LoRA(4)}, {"a": {"attn.v": LoRA(2)}, "b": {"attn.v": DoRA(3)},
                                                                     "c": {}}),
    "shared dora + task bitfit on attn": ({"attn": DoRA(4)}, {"a": {"attn": BitFit()}, "b": {"attn": BitFit()}, "c": {}}),
    "shared bitfit + task lora/dora on ffn": ({"ffn": BitFit()}, {"a": {"ffn": LoRA(4)}, "b": {"ffn": DoRA(2)}, "c": {}}),
    # shared and per task on other sites
    "shared adapter + task lora/dora/bitfit": ({"ffn": Adapter(8)}, {"a": {"attn": LoRA(4)}, "b": {"attn": DoRA(2)},
                                                                      "c": {"attn": BitFit()}}),
    "shared prefix + task adapter/lora": ({"attn": Prefix(3)}, {"a": {"ffn": Adapter(8)}, "b": {"ffn": LoRA(2)}, "c": {}}),
    "shared prompt + task lora/adapter": ({"embed": PromptTuning(3)}, {"a": {"attn": LoRA(4)}, "b": {"ffn": Adapter(4)},
                                                                       "c": {}}),
    "shared bitfit + task adapters": ({"attn": BitFit()}, {"a": {"ffn": Adapter(8)}, "b": {"ffn": Adapter(4)}, "c": {}}),
    "shared hyper + task lora/prefix": ({"ffn": HyperAdapter(8, task_dim=8, hidden=16)}, {
        "a": {"attn": LoRA(4)}, "b": {"attn": Prefix(2)}, "c": {}}),
    "shared dora + task prompt/bitfit": ({"attn": DoRA(4)}, {"a": {"embed": PromptTuning(3)}, "b": {"ffn": BitFit()},
                                                             "c": {}}),
    "shared head + task adapter/lora": ({"head": Trainable()}, {"a": {"ffn": Adapter(8)}, "b": {"attn": LoRA(2)}, "c": {}}),
}
SHARED = sorted(name for name, (shared, _) in SPECS.items() if shared)
TASKS = ["a", None, "b", "c", "a", "b"]
ROUTES = (TASKS, ["a", "c", "b", "c", "a", "b"])  # with a shared-only sample, and without one


def _batch(seed: int = 0, n: int = len(TASKS), t: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, -2:] = 0  # right padding on some samples
    mask[3, -3:] = 0
    return ids, mask


def _attached(arch: str, name: str):
    model = MODELS[arch]()
    shared, tasks = SPECS[name]
    head = lambda spec: {HEADS[arch] if sel == "head" else sel: stack for sel, stack in spec.items()}  # noqa: E731
    adaptation = attach(model, head(shared), tasks={task: head(spec) for task, spec in tasks.items()})
    randomize(adaptation, std=0.2)
    return model, adaptation


def _outputs(out):
    """The main output, and BERT's pooler output (what a head on pooler.dense changes)."""
    pooled = getattr(out, "pooler_output", None)
    return main_output(out), pooled


def _alone(model, adaptation, ids, mask, i, task):
    with adaptation.using(task):
        return [x if x is None else x[0] for x in _outputs(model(ids[i:i + 1], attention_mask=mask[i:i + 1]))]


def assert_mixed_equals_alone(model, adaptation, atol=2e-5, rtol=1e-4):
    """The routed batch of each of ROUTES against each sample alone under its task, on its real tokens (soft
    prompts in front dropped, padding excluded)."""
    ids, mask = _batch()
    with torch.no_grad():
        for tasks in ROUTES:
            with adaptation.route(tasks):
                mixed, pooled = _outputs(model(ids, attention_mask=mask))
            for i, task in enumerate(tasks):
                alone, alone_pooled = _alone(model, adaptation, ids, mask, i, task)
                real, msg = mask[i].bool(), f"sample {i} of route {tasks}"
                torch.testing.assert_close(mixed[i, -ids.shape[1]:][real].float(),
                                           alone[-ids.shape[1]:][real].float(), atol=atol, rtol=rtol, msg=msg)
                if pooled is not None and mixed.shape[1] == alone.shape[0]:  # no other prompts' columns in front
                    torch.testing.assert_close(pooled[i].float(), alone_pooled.float(), atol=atol, rtol=rtol, msg=msg)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_mixed_batch_equals_each_sample_alone(arch, name):
    assert_mixed_equals_alone(*_attached(arch, name))


def test_tasks_differ_so_the_comparison_can_fail():
    model, adaptation = _attached("gpt2", "lora")
    ids, mask = _batch()
    with torch.no_grad():
        a = _alone(model, adaptation, ids, mask, 0, "a")[0]
        b = _alone(model, adaptation, ids, mask, 0, "b")[0]
    assert not torch.allclose(a, b, atol=1e-3)


def test_indices_and_names_route_alike():
    model, adaptation = _attached("bert", "adapter")
    ids, mask = _batch()
    index = torch.tensor([-1 if t is None else adaptation.task_names.index(t) for t in TASKS])
    with torch.no_grad():
        with adaptation.route(TASKS):
            by_name = main_output(model(ids, attention_mask=mask))
        with adaptation.route(index):
            by_index = main_output(model(ids, attention_mask=mask))
    torch.testing.assert_close(by_name, by_index, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["lora", "dora", "adapter", "prefix", "prompt", "mixed kinds", *SHARED])
def test_gradients_equal_the_sum_of_the_per_task_batches(name):
    model, adaptation = _attached("gpt2", name)
    ids, mask = _batch()
    weights = torch.randn(len(TASKS), ids.shape[1], generator=torch.Generator().manual_seed(2))

    def loss(out, rows):
        return (main_output(out)[:, -ids.shape[1]:].sum(-1) * weights[rows] * mask[rows]).sum()

    params = [p for p in adaptation.parameters() if p.requires_grad]
    groups = [*adaptation.shared.points.values(), adaptation.shared.common.values()]
    shared = [m for group in groups for m in group if list(m.parameters())]  # the shared components' modules
    for tasks in ROUTES:
        with adaptation.route(tasks):
            mixed = torch.autograd.grad(loss(model(ids, attention_mask=mask), list(range(len(tasks)))), params,
                                        allow_unused=True)
        total = [torch.zeros_like(p) for p in params]
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            with adaptation.using(task):
                value = loss(model(ids[rows], attention_mask=mask[rows]), rows)
            if not value.requires_grad:
                continue  # shared-only samples with no shared components: nothing to train
            grads = torch.autograd.grad(value, params, allow_unused=True)
            total = [s + (g if g is not None else 0) for s, g in zip(total, grads)]
        assert any(g is not None and g.abs().sum() > 0 for g in mixed)
        got = {p: g for p, g in zip(params, mixed)}
        for m in shared:  # every shared component trains, whether or not some sample runs only the shared ones
            assert any(got[p] is not None and got[p].abs().sum() > 0 for p in m.parameters()), (tasks, m)
        for p, g, want in zip(params, mixed, total):
            torch.testing.assert_close(g if g is not None else torch.zeros_like(p), want, atol=1e-4, rtol=1e-3)


def test_only_the_samples_tasks_get_gradients():
    model, adaptation = _attached("bert", "lora")
    ids, mask = _batch()
    with adaptation.route(["a", None, "a"]):
        main_output(model(ids[:3], attention_mask=mask[:3])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adaptation.tasks["a"].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for g in ("b", "c") for p in adaptation.tasks[g].parameters())


@pytest.mark.parametrize("name, tasks", [
    *(pytest.param(name, ["a", "b", None, "c"], id=name) for name in ("lora", "dora", "prefix", "prompt", "mixed kinds")),
    *(pytest.param(name, ["a", "b", "c", "a"], id=name) for name in (
        "shared prompt + task prompts", "shared adapter + task lora/dora/bitfit", "shared hyper + task lora/prefix"))])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_routing_equals_per_sample_generate(arch, name, tasks):
    model, adaptation = _attached(arch, name)
    ids, mask = _batch(t=5)
    ids, mask = ids[:4], torch.ones(4, 5, dtype=torch.long)
    with torch.no_grad():
        with adaptation.route(tasks):
            mixed = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
        for i, task in enumerate(tasks):
            with adaptation.using(task):
                alone = model.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], max_new_tokens=4,
                                       do_sample=False, pad_token_id=1)
            assert torch.equal(mixed[i], alone[0]), (i, task)


def test_generate_with_beams_repeats_the_route():
    model, adaptation = _attached("gpt2", "lora")
    ids = torch.randint(2, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        with adaptation.route(["a", "b"]):
            mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        for i, task in enumerate(["a", "b"]):
            with adaptation.using(task):
                alone = model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw)
            assert torch.equal(mixed[2 * i:2 * i + 2], alone)
        with adaptation.route(["a", "b"]):  # repeated rows are generate's alone
            with pytest.raises(TaskError, match="the batch has 4 samples but the route gives 2 tasks"):
                model(ids.repeat_interleave(2, dim=0))
    assert "generate" not in model.__dict__


def test_per_task_trainable_heads_route():
    model = tiny_bert()
    adaptation = attach(model, tasks={"a": {"pooler.dense": Trainable()}, "b": {"pooler.dense": Trainable()}})
    randomize(adaptation, std=0.3)
    ids, mask = _batch()
    tasks = ["a", "b", None, "b", "a", None]
    with torch.no_grad():
        with adaptation.route(tasks):
            mixed = model(ids, attention_mask=mask).pooler_output
        for i, task in enumerate(tasks):
            with adaptation.using(task):
                alone = model(ids[i:i + 1], attention_mask=mask[i:i + 1]).pooler_output[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["adapter", "hyper (shared)"])
def test_one_task_in_the_route_is_that_task(name):
    model, adaptation = _attached("gpt2", name)
    ids, mask = _batch()
    with torch.no_grad():
        with adaptation.route(["b"] * len(TASKS)):
            assert adaptation.routing is None and adaptation.running_task == "b" and adaptation.task == "a"
            routed = main_output(model(ids, attention_mask=mask))
        assert adaptation.task == adaptation.running_task == "a"
        with adaptation.using("b"):
            plain = main_output(model(ids, attention_mask=mask))
    torch.testing.assert_close(routed, plain, atol=0, rtol=0)


# ---- errors --------------------------------------------------------------------------------------

def test_unknown_names_and_indices_are_clear_errors():
    model, adaptation = _attached("gpt2", "lora")
    with pytest.raises(TaskError, match="unknown task 'z'.*'a', 'b', 'c'"):
        with adaptation.route(["a", "z"]):
            pass
    with pytest.raises(TaskError, match="index 3 is out of range.*0-2"):
        with adaptation.route(torch.tensor([0, 3])):
            pass
    with pytest.raises(TaskError, match="1-D integer tensor"):
        with adaptation.route(torch.tensor([0.0, 1.0])):
            pass
    with pytest.raises(TaskError, match="no samples"):
        with adaptation.route([]):
            pass
    with pytest.raises(TaskError, match="name, an index or None"):
        with adaptation.route(["a", 1.5]):
            pass


def test_a_route_of_the_wrong_length_is_a_clear_error():
    model, adaptation = _attached("gpt2", "lora")
    ids, mask = _batch()
    with pytest.raises(AdaptuneError, match="the batch has 6 samples but the route gives 4 tasks"):
        with adaptation.route(["a", "b", "c", "a"]):
            model(ids, attention_mask=mask)
    cases = [(["a", "b"], 4), (["a", "a"], 4), (["a", None, "b"], 6), (["a", "b"], 1), (["a", "b"], 0), (["b"], 0)]
    for tasks, n in cases:  # a multiple is generate's repeated samples, not a shorter route; 0 rows are no batch
        with adaptation.route(tasks):
            with pytest.raises(TaskError, match=f"the batch has {n} samples but the route gives {len(tasks)} tasks; "
                                                f"route.. takes one task per sample"):
                model(ids[:n], attention_mask=mask[:n])


def test_a_route_tensor_that_cannot_be_read_is_a_clear_error():
    model, adaptation = _attached("gpt2", "lora")
    with pytest.raises(TaskError, match="cannot read the task tensor on device meta .the model is on cpu.*a list"):
        with adaptation.route(torch.tensor([0, 1], device="meta")):
            pass
    assert adaptation.routing is None


def test_save_inside_a_route_records_the_task_set_by_use(tmp_path):
    model, adaptation = _attached("gpt2", "lora")
    for tasks in (["b", "b"], ["b", "c"]):
        with adaptation.route(tasks):
            path = adaptation.save(tmp_path / "routed.safetensors")
        assert read(path)[0]["active"] == "a", tasks


def test_merge_is_refused_while_routing_and_routing_while_merged():
    model, adaptation = _attached("gpt2", "lora")
    with adaptation.route(["a", "b"]):
        with pytest.raises(MergeError, match="cannot merge inside route"):
            adaptation.merge()
        with pytest.raises(TaskError, match="cannot switch tasks inside route"):
            adaptation.use("b")
        with pytest.raises(TaskError, match="do not nest"):
            with adaptation.route(["a", "b"]):
                pass
    adaptation.merge()
    with pytest.raises(MergeError, match="while updates are merged"):
        with adaptation.route(["a", "b"]):
            pass
    adaptation.unmerge()
    assert adaptation.task == "a" and adaptation.routing is None


BF16 = dict(atol=1.6e-2, rtol=1.6e-2)  # mixed and alone differ by at most 2e-3 here (bf16's step near 0.5: 4e-3)


def assert_each_other_task_fails(model, adaptation, atol, rtol, margin=4.0):
    """Each sample run alone under any other task (or none) misses its own task's output by more than `margin`
    times the tolerance on some real token: a sample routed to the wrong task fails assert_mixed_equals_alone."""
    ids, mask = _batch()
    with torch.no_grad():
        for i in range(ids.shape[0]):
            real = mask[i].bool()
            outs = {t: _alone(model, adaptation, ids, mask, i, t)[0][-ids.shape[1]:][real].float()
                    for t in ("a", "b", "c", None)}
            for t, want in outs.items():
                for other, got in outs.items():
                    if other != t:
                        worst = ((got - want).abs() / (atol + rtol * want.abs())).max().item()
                        assert worst > margin, (i, t, other, worst)


@pytest.mark.parametrize("name", ["lora+dora", "adapter", "mixed kinds"])
def test_routing_on_a_bfloat16_base(name):
    model, adaptation = _attached("gpt2", name)
    model.to(torch.bfloat16)  # components stay float32, as on any half-precision base
    assert_each_other_task_fails(model, adaptation, **BF16)
    assert_mixed_equals_alone(model, adaptation, **BF16)
