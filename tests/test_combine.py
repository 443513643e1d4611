"""combine(): new tasks from existing ones, checked against PEFT's add_weighted_adapter and against the
definitions of TIES and DARE; Adaptation.add_task, which it builds on."""
import math

import peft
import pytest
import torch
from helpers import VOCAB, randomize, tiny_gpt2, tiny_llama

from adaptune import Adapter, DoRA, HyperAdapter, LoRA, Prefix, Stack, attach, export_peft, load, save
from adaptune.combine import combine, mix
from adaptune.errors import AdaptuneError, ConfigError, MergeError, TaskError

TARGETS = ["embed_tokens", "q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
# (r, alpha) of the two tasks: scales 2 and 1; ranks differ where the method allows it
SAME, DIFFERENT = ((4, 8), (4, 4)), ((4, 8), (2, 4))


def _factors(module, adapter):
    """PEFT's (A, B) of `adapter` on one LoRA layer (Linear or Embedding)."""
    if adapter in module.lora_A:
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight
    return module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]


def twins(ranks=SAME, dora=False):
    """A PEFT model with LoRAs 'sst' and 'sts' of random factors, and an adaptune adaptation of the same base with
    the same factors in tasks 'sst' and 'sts' (ffn before attn: build order unlike module order)."""
    targets = TARGETS[1:] if dora else TARGETS
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=ranks[0][0], lora_alpha=ranks[0][1], use_dora=dora,
                                target_modules=targets), adapter_name="sst").eval()
    model.add_adapter("sts", peft.LoraConfig(r=ranks[1][0], lora_alpha=ranks[1][1], use_dora=dora, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.3).abs() if "magnitude" in name
                        else torch.randn(p.shape, generator=g) * 0.3)
    kind = DoRA if dora else LoRA
    spec = {name: {"ffn": kind(r, alpha=a), "attn": kind(r, alpha=a), **({} if dora else {"embed": LoRA(r, alpha=a)})}
            for name, (r, a) in zip(("sst", "sts"), ranks)}
    ours = attach(tiny_llama(), tasks=spec)
    for b in ours.bindings(["sst", "sts"]):
        layer = model.base_model.model.get_submodule(_path(ours, b))
        A, B = _factors(layer, b.group)
        with torch.no_grad():
            b.module.A.copy_(A)
            b.module.B.copy_(B)
            if dora:
                b.module.magnitude.copy_(layer.lora_magnitude_vector[b.group].weight)
    return model, ours


def _path(adaptation, binding):
    return next(n for n, m in adaptation.model.named_modules() if m is binding.point.module)


def peft_combine(model, weights, method, seed=None, monkeypatch=None, **kw):
    """add_weighted_adapter into 'soup'; with `seed`, the global RNG is seeded as its merging starts (PEFT first
    draws its new layers' initial values from it)."""
    if seed is not None:
        import peft.tuners.lora.model as lora_model
        freeze = lora_model._freeze_adapter
        monkeypatch.setattr(lora_model, "_freeze_adapter", lambda *a: (freeze(*a), torch.manual_seed(seed)))
    model.add_weighted_adapter(list(weights), list(weights.values()), "soup", combination_type=method, **kw)


def soup_deltas(model, ours):
    """{module path: (PEFT's ΔW, adaptune's ΔW)} of the task 'soup', each s·B·A in (out, in) orientation."""
    out = {}
    for b in ours.bindings(["soup"]):
        path = _path(ours, b)
        layer = model.base_model.model.get_submodule(path)
        A, B = _factors(layer, "soup")
        out[path] = (layer.scaling["soup"] * (B @ A), b.module.scale * (b.module.B @ b.module.A))
    return out


def logits_both(model, ours, task="soup"):
    with torch.no_grad():
        model.set_adapter(task)
        ours.use(task)
        return model(IDS).logits, ours.model(IDS).logits


WEIGHTS = {"sst": 0.7, "sts": -0.4}  # a negative weight: task negation
CASES = [  # method, ranks, options, (tolerance for ΔW: exact factors, or through an SVD)
    ("linear", SAME, {}, 1e-6),
    ("cat", DIFFERENT, {}, 1e-6),
    ("svd", DIFFERENT, {"rank": 3}, 1e-5),
    ("ties", SAME, {"density": 0.5}, 1e-6),
    ("ties", SAME, {"density": 0.6, "majority_sign_method": "frequency"}, 1e-6),
    ("dare_linear", SAME, {"density": 0.5, "seed": 7}, 1e-6),
    ("dare_ties", SAME, {"density": 0.4, "seed": 3}, 1e-6),
    ("magnitude_prune", SAME, {"density": 0.3}, 1e-6),
    ("ties_svd", DIFFERENT, {"density": 0.5, "rank": 2}, 1e-5),
    ("dare_linear_svd", DIFFERENT, {"density": 0.5, "seed": 5}, 1e-5),
    ("dare_ties_svd", DIFFERENT, {"density": 0.5, "seed": 5, "majority_sign_method": "frequency"}, 1e-5),
    ("magnitude_prune_svd", DIFFERENT, {"density": 0.5}, 1e-5),
]
PEFT_NAMES = {"rank": "svd_rank", "clamp": "svd_clamp"}


@pytest.mark.parametrize("method, ranks, options, tol", CASES, ids=lambda c: str(c) if isinstance(c, str) else "")
def test_every_method_equals_peft(method, ranks, options, tol, monkeypatch):
    model, ours = twins(ranks)
    kw = {PEFT_NAMES.get(k, k): v for k, v in options.items() if k != "seed"}
    peft_combine(model, WEIGHTS, method, options.get("seed"), monkeypatch, **kw)
    combine(ours, WEIGHTS, method, into="soup", **options)
    deltas = soup_deltas(model, ours)
    assert len(deltas) == 11
    scale = max(theirs.abs().max().item() for theirs, _ in deltas.values())
    assert scale > 0.1
    worst = max((theirs - mine).abs().max().item() for theirs, mine in deltas.values())
    assert worst <= tol * max(1.0, scale), (method, worst)
    theirs, mine = logits_both(model, ours)
    assert (theirs - mine).abs().max() < 1e-4
    _, sst = logits_both(model, ours, "sst")
    assert (mine - sst).abs().max() > 1e-3  # the soup is not a task it came from


def test_factors_are_peft_bit_for_bit_where_no_svd_is_involved(monkeypatch):
    model, ours = twins()
    peft_combine(model, WEIGHTS, "dare_ties", 11, monkeypatch, density=0.5)
    combine(ours, WEIGHTS, "dare_ties", into="soup", density=0.5, seed=11)
    for b in ours.bindings(["soup"]):
        A, B = _factors(model.base_model.model.get_submodule(_path(ours, b)), "soup")
        assert torch.equal(A, b.module.A) and torch.equal(B, b.module.B)


def test_a_generator_draws_as_a_seed_and_another_seed_draws_otherwise():
    _, first = twins()
    combine(first, WEIGHTS, "dare_linear", into="soup", density=0.5, seed=4)
    _, second = twins()
    combine(second, WEIGHTS, "dare_linear", into="soup", density=0.5, generator=torch.Generator().manual_seed(4))
    combine(second, WEIGHTS, "dare_linear", into="other", density=0.5, seed=5)
    pairs = [(a.module.A, b.module.A, c.module.A) for a, b, c in
             zip(first.bindings(["soup"]), second.bindings(["soup"]), second.bindings(["other"]))]
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)


def test_svd_clamp_equals_peft_with_the_reduced_svd():
    model, ours = twins(DIFFERENT)
    model.add_weighted_adapter(["sst", "sts"], [0.6, 0.6], "soup", combination_type="svd", svd_rank=3, svd_clamp=0.9,
                               svd_full_matrices=False)
    combine(ours, {"sst": 0.6, "sts": 0.6}, "svd", into="soup", rank=3, clamp=0.9)
    for b in ours.bindings(["soup"]):
        A, B = _factors(model.base_model.model.get_submodule(_path(ours, b)), "soup")
        assert (A - b.module.A).abs().max() < 1e-5 and (B - b.module.B).abs().max() < 1e-5
    deltas = soup_deltas(model, ours)
    unclamped = combine(ours, {"sst": 0.6, "sts": 0.6}, "svd", into="plain", rank=3)
    assert any((b.module.A.abs().max() > a.module.A.abs().max()) for a, b in
               zip(ours.bindings(["soup"]), unclamped.bindings(["plain"])))  # the clamp clamped something
    assert max((t - m).abs().max().item() for t, m in deltas.values()) < 1e-5


def test_dora_factors_equal_peft_and_the_magnitude_is_task_arithmetic():
    model, ours = twins(dora=True)
    norms = {b.point.key: b.point.module.weight.detach().norm(dim=1) for b in ours.bindings(["sst"])}
    peft_combine(model, WEIGHTS, "ties", density=0.5)
    combine(ours, WEIGHTS, "ties", into="soup", density=0.5)
    tasks = {g: {b.point.key: b.module.magnitude for b in ours.bindings([g])} for g in ("sst", "sts")}
    for b in ours.bindings(["soup"]):
        assert type(b.module).__name__ == "DoRAModule"
        layer = model.base_model.model.get_submodule(_path(ours, b))
        A, B = _factors(layer, "soup")
        assert torch.equal(A, b.module.A) and torch.equal(B, b.module.B)
        n = norms[b.point.key]
        expected = n + 0.7 * (tasks["sst"][b.point.key] - n) - 0.4 * (tasks["sts"][b.point.key] - n)
        assert torch.allclose(b.module.magnitude, expected, atol=1e-6)
        with torch.no_grad():  # PEFT's forward with our magnitude: the same function
            layer.lora_magnitude_vector["soup"].weight.copy_(b.module.magnitude)
    theirs, mine = logits_both(model, ours)
    assert (theirs - mine).abs().max() < 1e-4


# ---- the definitions, on hand-made tensors -------------------------------------------------------

def test_ties_prunes_by_magnitude_then_elects_signs_before_weighting():
    t1 = torch.tensor([[3.0, -1.0], [-2.0, 4.0]])
    t2 = torch.tensor([[-4.0, -2.0], [1.5, 0.5]])
    # density 1: no pruning; votes by total: (3-4)<0 -> '-', (-1-2) '-', (-2+1.5) '-', (4+.5) '+'
    assert torch.equal(mix([t1, t2], [1.0, 0.5], "ties", 1.0), torch.tensor([[-2.0, -1.0], [-2.0, 4.25 / 2]]))
    # by frequency: ties of +1 and -1 elect '+' (the sum 0 is >= 0)
    assert torch.equal(mix([t1, t2], [1.0, 0.5], "ties", 1.0, "frequency"),
                       torch.tensor([[3.0, -1.0], [0.75, 4.25 / 2]]))
    # density 0.5: t1 keeps 3, 4; t2 keeps -4, -2; entries no task keeps stay 0
    assert torch.equal(mix([t1, t2], [1.0, 1.0], "ties", 0.5), torch.tensor([[-4.0, -2.0], [0.0, 4.0]]))
    assert torch.equal(mix([t1, t2], [1.0, 1.0], "magnitude_prune", 0.5), torch.tensor([[-1.0, -2.0], [0.0, 4.0]]))


def test_dare_keeps_entries_with_probability_density_and_rescales_them():
    t = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    out = mix([t], [1.0], "dare_linear", 0.25, generator=torch.Generator().manual_seed(2))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.equal(out[kept], t[kept] / 0.25)
    mask = torch.bernoulli(torch.full_like(t, 0.25), generator=torch.Generator().manual_seed(2))
    assert torch.equal(kept, mask.bool())
    twice = mix([t, -t], [1.0, 2.0], "dare_ties", 0.5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    d1, d2 = (x * torch.bernoulli(torch.full_like(t, 0.5), generator=g) / 0.5 for x in (t, -t))
    agree = [d.sign() == torch.where(d1 + d2 >= 0, 1, -1) for d in (d1, d2)]
    expected = (d1 * agree[0] + 2 * d2 * agree[1]) / (agree[0].int() + agree[1].int()).clamp(min=1)
    assert torch.allclose(twice, expected)


def test_linear_and_cat_of_negative_weights_are_exact_task_arithmetic():
    ours = attach(tiny_llama(), tasks={"sst": {"attn": LoRA(4, alpha=8)}, "sts": {"attn": LoRA(2)}})
    randomize(ours, std=0.3)
    combine(ours, {"sst": -1.0}, "linear", into="negated")
    combine(ours, {"sst": 1.0, "sts": -0.5}, "cat", into="diff")
    combine(ours, {"sst": 1.0, "sts": -0.5}, "svd", into="full", rank=6)

    def delta(task):
        return {b.point.key: b.module.scale * b.module.B @ b.module.A for b in ours.bindings([task])}
    sst, sts = delta("sst"), delta("sts")
    for key, d in delta("negated").items():
        assert torch.allclose(d, -sst[key], atol=1e-6)
    for task in ("diff", "full"):
        for key, d in delta(task).items():
            assert torch.allclose(d, sst[key] - 0.5 * sts[key], atol=1e-5)
    assert {b.module.A.shape[0] for b in ours.bindings(["diff"])} == {6}


def test_pissa_tasks_combine_their_whole_update():
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = attach(model, tasks={"sst": {"attn": LoRA(4, init="pissa")}, "sts": {"attn": LoRA(4, init="olora")}})
    for b in ours.bindings(["sst", "sts"]):
        with torch.no_grad():
            b.module.A.add_(0.1 * torch.randn_like(b.module.A))
    combine(ours, {"sst": 0.5, "sts": 0.5}, "cat", into="soup")
    merged = {}
    for task in ("sst", "sts", "soup"):
        ours.use(task).merge()
        merged[task] = {n: p.detach() - base[n] for n, p in model.named_parameters() if not n.startswith("adaptune")}
        ours.unmerge()
    for n, d in merged["soup"].items():
        assert torch.allclose(d, 0.5 * merged["sst"][n] + 0.5 * merged["sts"][n], atol=1e-5), n
    assert {b.module.A.shape[0] for b in ours.bindings(["soup"])} == {16}  # 2r per task


def test_adapters_combine_linearly_on_their_weights():
    ours = attach(tiny_llama(), tasks={t: {"attn": LoRA(4), "ffn": Adapter(8)} for t in ("sst", "sts")})
    randomize(ours, std=0.3)
    combine(ours, {"sst": 0.25, "sts": 0.75}, into="soup")
    per_task = {t: {b.point.key: b.module for b in ours.bindings([t], kind="sublayer")} for t in ("sst", "sts", "soup")}
    assert len(per_task["soup"]) == 2
    for key, module in per_task["soup"].items():
        for name, p in module.named_parameters():
            expected = 0.25 * getattr(per_task["sst"][key], name) + 0.75 * getattr(per_task["sts"][key], name)
            assert torch.allclose(p, expected, atol=1e-7)


# ---- the combined task works as any task ---------------------------------------------------------

def test_the_combined_task_saves_loads_routes_merges_and_exports(tmp_path):
    model = tiny_gpt2()  # fused c_attn: q, k, v slices
    ours = attach(model, {"ffn": Adapter(8)}, tasks={"sst": {"attn": LoRA(4), "ffn.up": DoRA(2)},
                                                    "sts": {"attn": LoRA(4, alpha=2), "ffn.up": DoRA(2)}})
    randomize(ours, std=0.3)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("adaptune")}
    combine(ours, {"sst": 0.5, "sts": 0.5}, "ties", into="soup", density=0.7)
    assert ours.task_names == ["sst", "sts", "soup"] and ours.task == "sst"
    with torch.no_grad():
        soup = ours.use("soup").model(IDS).logits
        sst = ours.use("sst").model(IDS).logits
        with ours.route(["soup", "sst"]):
            routed = model(IDS).logits
        ours.use("soup").merge()
        merged = model(IDS).logits
        ours.unmerge()
    assert (soup - sst).abs().max() > 1e-3
    assert torch.allclose(routed, torch.stack([soup[0], sst[1]]), atol=1e-5)
    assert torch.allclose(merged, soup, atol=1e-5)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    save(ours, tmp_path / "a.safetensors")
    again = load(tiny_gpt2(), tmp_path / "a.safetensors", active="soup")
    with torch.no_grad():
        assert torch.equal(again.model(IDS).logits, soup)
    lora_only = attach(tiny_gpt2(), tasks={t: {"attn": LoRA(4, alpha=a)} for t, a in (("sst", 4), ("sts", 2))})
    randomize(lora_only, std=0.3)
    combine(lora_only, {"sst": 1.0, "sts": 1.0}, "svd", into="soup", rank=6)
    export_peft(lora_only, tmp_path / "peft", task="soup")
    exported = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(exported(IDS).logits, lora_only.use("soup").model(IDS).logits, atol=1e-5)


# ---- errors: each clear, and the adaptation unchanged --------------------------------------------

def _state(adaptation):
    return (adaptation.spec(), list(adaptation.task_names), sorted(adaptation.state_dict()), len(adaptation.hooks),
            sum(len(h.bindings) for h in adaptation.hooks.values()), adaptation.task)


@pytest.mark.parametrize("weights, method, options, error, match", [
    ({"nope": 1.0}, "linear", {}, TaskError, "unknown task 'nope'"),
    ({"sst": float("nan")}, "linear", {}, ConfigError, "finite number"),
    ({"sst": math.inf}, "linear", {}, ConfigError, "finite number"),
    ({"sst": "1"}, "linear", {}, ConfigError, "finite number"),
    ({"sst": True}, "linear", {}, ConfigError, "finite number"),
    ({}, "linear", {}, ConfigError, "weights map task names"),
    ({"sst": 1.0}, "linear", {"into": "sts"}, TaskError, "no task has"),
    ({"sst": 1.0}, "linear", {"into": "bad name"}, ConfigError, "letters, digits"),
    ({"sst": 1.0}, "svd", {"rank": 0}, ConfigError, "rank must be a positive integer"),
    ({"sst": 1.0}, "svd", {"rank": -2}, ConfigError, "rank must be a positive integer"),
    ({"sst": 1.0}, "svd", {"rank": 100}, ConfigError, "larger than the layer"),
    ({"sst": 1.0}, "svd", {"clamp": 1.5}, ConfigError, "clamp"),
    ({"sst": 1.0}, "average", {}, ConfigError, "unknown method 'average'; methods: linear, cat"),
    ({"sst": 1.0}, "linear", {"density": 0.5}, ConfigError, "'linear' takes no options; got density"),
    ({"sst": 1.0}, "ties", {"seed": 1, "density": 0.5}, ConfigError, "takes density, majority_sign_method; got seed"),
    ({"sst": 1.0}, "ties", {}, ConfigError, "needs density"),
    ({"sst": 1.0}, "dare_linear", {"density": 0.0}, ConfigError, "needs density"),
    ({"sst": 1.0}, "dare_linear", {"density": 0.5, "seed": 1, "generator": torch.Generator()}, ConfigError, "not both"),
    ({"sst": 1.0}, "ties", {"density": 0.5, "majority_sign_method": "most"}, ConfigError, "'total' or 'frequency'"),
    ({"sst": 0.5, "sts": 0.5}, "linear", {}, ConfigError, r"'linear' needs equal ranks, got \[4, 2\]"),
    ({"sst": 1.0, "sts": 1.0}, "cat", {}, None, None),  # valid: the fixture's baseline
])
def test_bad_arguments_raise_clearly_and_change_nothing(weights, method, options, error, match):
    ours = attach(tiny_llama(), tasks={"sst": {"attn": LoRA(4)}, "sts": {"attn": LoRA(2)}})
    before = _state(ours)
    options = {"into": "soup", **options}
    if error is None:
        combine(ours, weights, method, **options)
        assert _state(ours) != before
        return
    with pytest.raises(error, match=match):
        combine(ours, weights, method, **options)
    assert _state(ours) == before


@pytest.mark.parametrize("tasks, weights, method, error, match", [
    ({"sst": {"attn": LoRA(4)}, "sts": {"attn": DoRA(4)}}, None, "linear", ConfigError,
     r"differ at attn.q \(layer 0\): \['LoRAModule'\] vs \['DoRAModule'\]"),
    ({"sst": {"attn": LoRA(4)}, "sts": {"attn": LoRA(4), "ffn": LoRA(4)}}, None, "linear", ConfigError,
     r"differ at ffn.up \(layer 0\): nothing vs \['LoRAModule'\]"),
    ({"sst": {"attn": LoRA(4), "ffn": Adapter(8)}, "sts": {"attn": LoRA(4), "ffn": Adapter(8)}}, None, "svd",
     ConfigError, "method 'svd' does not apply to Adapter.*'linear' only"),
    ({"sst": {"ffn": Adapter(8)}, "sts": {"ffn": Adapter(16)}}, None, "linear", ConfigError, "differ in dim"),
    ({"sst": {"attn": Prefix(4)}, "sts": {"attn": Prefix(4)}}, None, "linear", ConfigError,
     "takes LoRA, DoRA and Adapter components; task 'sst' has Prefix"),
    ({"sst": {"attn": LoRA(4)}, "sts": {"attn.q": LoRA(2), "attn.k": LoRA(4), "attn.v": LoRA(4)}}, None, "cat",
     ConfigError, r"the combined rank differs across the points of 'attn' \(\[6, 8\]\)"),
    ({"sst": {"attn": LoRA(10)}, "sts": {"attn": LoRA(10)}}, None, "cat", ConfigError,
     "'cat' gives rank 20 at attn.k \\(layer 0\\), larger than the layer"),
])
def test_tasks_that_do_not_match_are_refused(tasks, weights, method, error, match):
    ours = attach(tiny_llama(), tasks=tasks)
    before = _state(ours)
    with pytest.raises(error, match=match):
        combine(ours, weights or {"sst": 0.5, "sts": 0.5}, method, into="soup")
    assert _state(ours) == before


def test_tasks_with_other_selectors_for_the_same_points_combine():
    ours = attach(tiny_llama(), tasks={"sst": {"attn": LoRA(4)},
                                       "sts": {"attn.q": LoRA(2), "attn.k": LoRA(4), "attn.v": LoRA(4)}})
    randomize(ours, std=0.3)
    combine(ours, {"sst": 0.5, "sts": 0.5}, "svd", into="soup", rank=8)  # ≥ the ranks' sum: exact
    assert ours.spec()["tasks"]["soup"] == {"attn": [LoRA(8).to_dict()]}
    sst = {b.point.key: b.module.B @ b.module.A for b in ours.bindings(["sst"])}
    sts = {b.point.key: b.module.B @ b.module.A for b in ours.bindings(["sts"])}
    for b in ours.bindings(["soup"]):
        assert torch.allclose(b.module.B @ b.module.A, 0.5 * sst[b.point.key] + 0.5 * sts[b.point.key], atol=1e-5)


def test_combine_refuses_while_merged_and_inside_a_route():
    ours = attach(tiny_llama(), tasks={"sst": {"attn": LoRA(4)}, "sts": {"attn": LoRA(4)}})
    ours.merge()
    with pytest.raises(MergeError, match="unmerge"):
        combine(ours, {"sst": 0.5, "sts": 0.5}, into="soup")
    ours.unmerge()
    with ours.route(["sst", "sts"]), pytest.raises(TaskError, match="inside route"):
        combine(ours, {"sst": 0.5, "sts": 0.5}, into="soup")
    assert ours.task_names == ["sst", "sts"]


# ---- Adaptation.add_task -------------------------------------------------------------------------

def test_add_task_builds_new_places_and_runs_like_an_attached_task():
    model = tiny_llama()
    ours = attach(model, tasks={"sst": {"attn": LoRA(4)}})
    ours.add_task("sts", {"ffn": Adapter(8) | LoRA(2)})
    reference = attach(tiny_llama(), tasks={"sst": {"attn": LoRA(4)}, "sts": {"ffn": Adapter(8) | LoRA(2)}})
    ours.load_state_dict(reference.state_dict())  # the same keys: the same structure
    randomize(ours, std=0.3)
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for task in ("sst", "sts"):
            assert torch.equal(ours.use(task).model(IDS).logits, reference.use(task).model(IDS).logits)
        with ours.route(["sts", "sst"]), reference.route(["sts", "sst"]):
            assert torch.allclose(model(IDS).logits, reference.model(IDS).logits, atol=1e-6)
    assert ours.counts().per_task == reference.counts().per_task
    assert ours.tasks["sts"].training == ours.training
    ours.detach()
    assert not any(m._forward_hooks or "forward" in m.__dict__ for m in model.modules())


def test_a_failed_add_task_leaves_everything_as_it_was():
    model = tiny_llama()
    ours = attach(model, tasks={"sst": {"attn": LoRA(4)}})
    randomize(ours, std=0.3)
    with torch.no_grad():
        before_logits = model(IDS).logits
    before = _state(ours)
    with pytest.raises(ConfigError, match="state given for task .sts. does not match its components: missing"):
        ours.add_task("sts", {"ffn": Adapter(8)}, state={})
    with pytest.raises(ConfigError, match="letters, digits"):
        ours.add_task("a b", {"ffn": Adapter(8)})
    with pytest.raises(TaskError, match="exists"):
        ours.add_task("sst", {"ffn": Adapter(8)})
    with pytest.raises(ConfigError, match="empty stack"):
        ours.add_task("sts", {"ffn": LoRA(2) | Adapter(8), "attn": Stack()})
    with pytest.raises(AdaptuneError, match="two low-rank updates"):
        ours.add_task("sts", {"ffn": Adapter(8), "attn": LoRA(2) | DoRA(2)})
    assert _state(ours) == before
    assert not any(m._forward_hooks for m in model.modules())  # no sublayer hook left behind
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before_logits)
    ours.merge()
    with pytest.raises(MergeError, match="unmerge"):
        ours.add_task("sts", {"ffn": Adapter(8)})


def test_add_task_refuses_a_shared_hypernetwork_that_embeds_each_task():
    ours = attach(tiny_llama(), {"ffn": HyperAdapter(8, 4, hidden=8)}, tasks={"sst": {"attn": LoRA(2)}})
    with pytest.raises(ConfigError, match="embeds each task named at attach"):
        ours.add_task("sts", {"attn": LoRA(2)})
    assert ours.task_names == ["sst"]
