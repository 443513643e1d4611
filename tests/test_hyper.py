"""HyperAdapter: one shared hypernetwork generating every (task, layer, position) adapter."""
import pytest
import torch

from adaptune import BindError, ConfigError, HyperAdapter, attach, load
from adaptune.components.contract import Context
from adaptune.components.hyper import HyperNetwork
from helpers import main_output, out, randomize, tiny_bert, tiny_gpt2

M, T_DIM, HIDDEN = 4, 8, 16


def spec(**kw):
    return HyperAdapter(dim=M, task_dim=T_DIM, hidden=HIDDEN, **kw)


def nets(adaptation):
    return [m for m in adaptation.modules() if isinstance(m, HyperNetwork)]


def expected_params(t, h, m, n_tasks, n_layers, widths):
    """The documented formula: embeddings + projector + per-width generators (all with biases)."""
    embeddings = t * (n_tasks + n_layers + 1 + 3)
    projector = (3 * t + 1) * h + (h + 1) * t + 2 * t
    generators = sum((t + 1) * (2 * m * d + m + 3 * d) for d in widths)
    return embeddings + projector + generators


def test_fresh_hyper_adapter_is_identity(model, ids):
    before = out(model, ids)
    h = spec()
    attach(model, {"attn": h, "ffn": h}, tasks={"a": {}, "b": {}})
    assert torch.equal(out(model, ids), before)


def test_tasks_differ_and_switching_back_is_exact(model, ids):
    base = out(model, ids)
    h = spec()
    a = attach(model, {"attn": h, "ffn": h}, tasks={"a": {}, "b": {}})
    randomize(a.shared)
    first = out(model, ids)
    assert not torch.allclose(first, base, atol=1e-4)
    a.use("b")
    second = out(model, ids)
    assert not torch.allclose(second, first, atol=1e-4)
    a.use("a")
    assert torch.equal(out(model, ids), first)
    a.use(None)  # no active task: the hyper adapters are the identity
    assert torch.equal(out(model, ids), base)


def test_single_row_without_tasks_and_in_a_task_group(ids):
    model = tiny_gpt2()
    base = out(model, ids)
    a = attach(model, {"ffn": spec()})
    (net,) = nets(a)
    assert net.task.num_embeddings == 1
    randomize(a.shared)
    assert not torch.allclose(out(model, ids), base, atol=1e-4)

    model = tiny_gpt2()
    a = attach(model, tasks={"a": {"ffn": spec()}, "b": {"attn": spec()}})
    assert [n.task.num_embeddings for n in nets(a)] == [1, 1]
    assert nets(a.tasks["a"]) and nets(a.tasks["b"]) and not nets(a.shared)


def test_positions_and_layers_give_different_adapters():
    torch.manual_seed(0)
    net = HyperNetwork(spec(), None, n_layers=2)
    net.add_width(6)
    randomize(net)
    h = torch.randn(2, 3, 6)  # (B, T, d)
    ys = [net(h, layer, pos, Context()) for layer, pos in [(0, 0), (0, 1), (1, 0), (2, 2)]]
    for i in range(len(ys)):
        for j in range(i):
            assert not torch.allclose(ys[i], ys[j], atol=1e-5)


def test_gradients_reach_only_the_hypernetwork_and_training_lowers_loss(ids):
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    h = spec()
    a = attach(model, {"attn": h, "ffn": h}, tasks={"a": {}, "b": {}})
    model.train()
    (net,) = nets(a)
    own = {id(p) for p in net.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == own
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in own), name
        opt.step()
    assert losses[-1] < losses[0] - 0.05
    assert net.heads["32"].down.weight.grad.abs().sum() > 0  # D/U generators learn once γ moved off 0


@pytest.mark.parametrize("n_layer", [2, 4])
def test_one_shared_network_with_the_documented_parameter_count(n_layer):
    model = tiny_gpt2(n_layer=n_layer)  # n_embd 32; c_fc outputs 128
    h = spec()
    a = attach(model, {"attn": h, "ffn": h, "transformer.h.0.mlp.c_fc": h}, tasks={"a": {}, "b": {}, "c": {}})
    (net,) = nets(a)
    count = expected_params(T_DIM, HIDDEN, M, n_tasks=3, n_layers=n_layer, widths=[32, 128])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert sum(p.numel() for p in net.parameters()) == count
    state = {k: v for k, v in model.state_dict().items() if k.startswith("adaptune.")}
    assert sum(v.numel() for v in state.values()) == count  # each parameter saved once
    assert len({v.data_ptr() for v in state.values()}) == len(state)
    bindings = list(a.bindings([None]))
    assert all(not list(b.module.parameters()) for b in bindings)  # bound modules are tiny
    assert len(bindings) == 2 * n_layer + 1


def test_save_and_load_round_trip(tmp_path, ids):
    model = tiny_gpt2()
    h = spec()
    a = attach(model, {"attn": h, "ffn": h}, tasks={"a": {}, "b": {}})
    randomize(a.shared)
    a.use("b")
    expected = out(model, ids)
    a.save(tmp_path / "hyper.safetensors")
    fresh = tiny_gpt2()
    b = load(fresh, tmp_path / "hyper.safetensors", active="b")
    assert torch.equal(out(fresh, ids), expected)
    assert len(nets(b)) == 1


def test_different_specs_get_different_networks():
    model = tiny_bert()
    a = attach(model, {"attn": spec(), "ffn": HyperAdapter(dim=M + 1, task_dim=T_DIM, hidden=HIDDEN)})
    assert len(nets(a)) == 2


@pytest.mark.parametrize("kwargs", [
    {"dim": 0}, {"dim": -3}, {"dim": 2.5}, {"dim": True}, {"task_dim": 0}, {"task_dim": "64"},
    {"hidden": 0}, {"act": "swish"},
])
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        HyperAdapter(**kwargs)


def test_projection_sites_raise_bind_error(model):
    with pytest.raises(BindError):
        attach(model, {"attn.q": spec()})
    assert not hasattr(model, "adaptune")


def test_spec_round_trips_as_data():
    h = HyperAdapter(dim=16, task_dim=32, hidden=64, act="relu")
    assert HyperAdapter.from_dict(h.to_dict()) == h


@pytest.mark.parametrize("task_dim", [8, 64])
def test_one_adam_step_moves_generated_weights_by_about_lr_whatever_task_dim(model, ids, task_dim):
    """Through their generators, γ, D and U move by O(lr) per Adam step, not O(task_dim·lr): one
    learning rate suits HyperAdapter and Adapter alike (with W·I instead of W·(I / t), ~t·lr).
    Only the generators train here, so I stays fixed and what moves is the generators' own doing."""
    h = HyperAdapter(dim=M, task_dim=task_dim, hidden=HIDDEN)
    a = attach(model, {"attn": h, "ffn": h}, tasks={"a": {}})
    (net,) = nets(a)
    generated = lambda: net.heads["32"](net.embedding(0, 1, 0))  # noqa: E731  (task a, layer 1, attn)
    before = [w.detach().clone() for w in generated()]
    opt = torch.optim.Adam(list(net.heads.parameters()), lr=1e-3)
    model.train()
    for _ in range(2):  # the first step moves only γ/β (D and U get gradients once γ is off 0)
        loss = main_output(model(ids)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [(w - b).abs().max().item() for w, b in zip(generated(), before)]
    assert max(moved) < 5 * 2e-3, moved  # two steps of lr 1e-3, a few units of lr at most
    assert moved[4] > 1e-4  # γ did move
