"""AdapterTrainer: adapter-only checkpoints with transformers.Trainer; a resumed run ends bit-exact."""
import pytest
import torch
from helpers import VOCAB, StopAt, tiny_gpt2, weights
from transformers import Trainer, TrainingArguments

from adaptune import ConfigError, LoRA, LoadError, WriteError, attach, load
from adaptune.trainer import ADAPTERS_FILE, AdapterCheckpoints, AdapterTrainer

STEPS, SAVE_EVERY = 8, 4


def dataset(n: int = 24, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def adapted(seed: int):
    """The same base every time (as from_pretrained gives it); components drawn with `seed`."""
    model = tiny_gpt2().train()
    torch.manual_seed(seed)
    attach(model, {"attn": LoRA(4, dropout=0.1)})
    return model


def args(out, **kw) -> TrainingArguments:
    return TrainingArguments(str(out), max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=4,
                             learning_rate=1e-2, warmup_steps=2, seed=0, use_cpu=True, report_to=[],
                             disable_tqdm=True, dataloader_num_workers=0, logging_strategy="no", **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one interrupted at step 4 then resumed by a new trainer on a new model."""
    root, data = tmp_path_factory.mktemp("trainer"), dataset()
    whole = adapted(seed=1)
    AdapterTrainer(whole, args(root / "whole"), train_dataset=data).train()
    first = adapted(seed=1)
    AdapterTrainer(first, args(root / "cut"), train_dataset=data, callbacks=[StopAt(SAVE_EVERY)]).train()
    resumed = adapted(seed=2)  # other initial components: the checkpoint must overwrite them
    trainer = AdapterTrainer(resumed, args(root / "cut"), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(root / "cut" / f"checkpoint-{SAVE_EVERY}"))
    return {"root": root, "whole": whole, "first": first, "resumed": resumed, "trainer": trainer}


def test_resumed_run_ends_bit_exact(runs):
    w1, w2 = weights(runs["whole"]), weights(runs["resumed"])
    assert w1.keys() == w2.keys() and w1
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert runs["trainer"].state.global_step == STEPS
    assert not torch.equal(w1[next(iter(w1))], weights(runs["first"])[next(iter(w1))])  # training moved on


def test_checkpoint_holds_adapters_not_the_base(runs):
    ckpt = runs["root"] / "cut" / f"checkpoint-{SAVE_EVERY}"
    names = {p.name for p in ckpt.iterdir()}
    assert ADAPTERS_FILE in names and {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                        "pytorch_model.bin.index.json", "config.json"}
    sizes = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    params = dict(runs["whole"].named_parameters())
    adapters = sum(p.numel() * p.element_size() for n, p in params.items() if n.startswith("adaptune."))
    base = sum(p.numel() * p.element_size() for n, p in params.items() if not n.startswith("adaptune."))
    assert sizes[ADAPTERS_FILE] < adapters + 4096, sizes  # parameters and a JSON header
    assert sizes["optimizer.pt"] < 2 * adapters + 16384, sizes  # Adam's two moments of the components only
    assert sum(sizes.values()) < base / 2, (sizes, base)  # rng_state.pth and training_args.bin: fixed costs


def test_save_model_writes_a_loadable_adaptation(runs, tmp_path):
    runs["trainer"].save_model(str(tmp_path))
    assert (tmp_path / ADAPTERS_FILE).is_file() and not (tmp_path / "model.safetensors").exists()
    fresh = tiny_gpt2().train()
    load(fresh, tmp_path / ADAPTERS_FILE)
    w, w2 = weights(fresh), weights(runs["resumed"])
    assert all(torch.equal(w[k], w2[k]) for k in w)


def test_refuses_a_model_without_adaptation(tmp_path):
    with pytest.raises(ConfigError, match="attach"):
        AdapterTrainer(tiny_gpt2(), args(tmp_path), train_dataset=dataset())


def test_refuses_trainable_base_parameters(tmp_path):
    model = adapted(seed=1)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="base parameters train"):
        AdapterTrainer(model, args(tmp_path), train_dataset=dataset())


def test_resume_refuses_other_checkpoints(runs, tmp_path):
    trainer = AdapterTrainer(adapted(seed=1), args(tmp_path), train_dataset=dataset())
    with pytest.raises(LoadError, match=ADAPTERS_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    other = tiny_gpt2().train()
    attach(other, {"attn": LoRA(8)})
    trainer = AdapterTrainer(other, args(tmp_path), train_dataset=dataset())
    with pytest.raises(LoadError, match="other components"):
        trainer.train(resume_from_checkpoint=str(runs["root"] / "cut" / f"checkpoint-{SAVE_EVERY}"))


def test_best_model_loads_from_an_adapter_checkpoint(runs, tmp_path):
    """load_best_model_at_end goes through _load_best_model: the adapters of the best checkpoint come back."""
    model = adapted(seed=3)
    trainer = AdapterTrainer(model, args(tmp_path), train_dataset=dataset())
    trainer.state.best_model_checkpoint = str(runs["root"] / "cut" / f"checkpoint-{SAVE_EVERY}")
    trainer._load_best_model()
    w, w4 = weights(model), weights(runs["first"])
    assert all(torch.equal(w[k], w4[k]) for k in w4)


def listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_save_model_onto_a_file_is_a_write_error_and_leaves_it(runs, tmp_path):
    target = tmp_path / "adapters"
    target.write_text("mine")
    with pytest.raises(WriteError, match="it is a file, and AdapterTrainer writes a directory there"):
        runs["trainer"].save_model(str(target))
    assert target.read_text() == "mine" and listing(tmp_path) == ["adapters"]


def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(WriteError, match="it is a file"):
        AdapterTrainer(adapted(seed=1), args(tmp_path / "out"), train_dataset=dataset())
    assert (tmp_path / "out").read_text() == "mine" and listing(tmp_path) == ["out"]


@pytest.mark.parametrize("kw, env, fragment", [
    ({"fsdp": True, "fsdp_config": {"version": 1}}, None, "fsdp_config={'version': 1}"),
    ({}, ("ACCELERATE_USE_FSDP", "true"), "ACCELERATE_USE_FSDP=true with FSDP_VERSION=1 (unset) in the environment"),
], ids=["fsdp1", "accelerate-launch-fsdp1"])
def test_fsdp1_is_refused_before_trainer_makes_anything(tmp_path, monkeypatch, kw, env, fragment):
    """FSDP2 and DeepSpeed train (tests/test_trainer_sharded.py); FSDP1, whose flat parameters are not the
    components' own, is refused, asked for in the arguments or by `accelerate launch --use_fsdp` (FSDP_VERSION
    unset: 1)."""
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    if env:
        monkeypatch.setenv(*env)
    training = args(tmp_path / "out", **kw)
    with pytest.raises(ConfigError, match="supports FSDP2 \\(fully_shard\\) and DeepSpeed, not FSDP1") as e:
        AdapterTrainer(adapted(seed=1), training, train_dataset=dataset())
    assert fragment in str(e.value) and "--fsdp_version 2" in str(e.value)
    assert listing(tmp_path) == []  # the output directory is not made


def test_accelerate_launch_with_fsdp2_is_not_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    AdapterTrainer(adapted(seed=1), args(tmp_path / "out"), train_dataset=dataset())  # one process: FSDP stays off


def test_resume_true_without_a_checkpoint_is_a_load_error(tmp_path):
    trainer = AdapterTrainer(adapted(seed=1), args(tmp_path / "out"), train_dataset=dataset())
    made = listing(tmp_path)
    with pytest.raises(LoadError, match="holds no checkpoint-N directory; train without it"):
        trainer.train(resume_from_checkpoint=True)
    trainer.args.output_dir = str(tmp_path / "missing")
    with pytest.raises(LoadError, match="'.*missing' does not exist"):
        trainer.train(resume_from_checkpoint=True)
    assert listing(tmp_path) == made and trainer.state.global_step == 0


class Counting(Trainer):
    """A Trainer subclass of its own (as TRL's trainers are): it counts its compute_loss calls."""

    def compute_loss(self, *a, **kw):
        self.calls = getattr(self, "calls", 0) + 1
        return super().compute_loss(*a, **kw)


class CountingAdapters(AdapterCheckpoints, Counting):
    pass


def test_the_mixin_gives_any_trainer_subclass_adapter_checkpoints(runs, tmp_path):
    assert issubclass(AdapterTrainer, AdapterCheckpoints)
    first = CountingAdapters(adapted(seed=1), args(tmp_path), train_dataset=dataset(), callbacks=[StopAt(SAVE_EVERY)])
    first.train()
    names = {p.name for p in (tmp_path / f"checkpoint-{SAVE_EVERY}").iterdir()}
    assert ADAPTERS_FILE in names and "optimizer.pt" in names and "model.safetensors" not in names
    resumed = adapted(seed=2)
    trainer = CountingAdapters(resumed, args(tmp_path), train_dataset=dataset())
    trainer.train(resume_from_checkpoint=True)
    assert first.calls == SAVE_EVERY and trainer.calls == STEPS - SAVE_EVERY
    w, w1 = weights(resumed), weights(runs["whole"])
    assert all(torch.equal(w[k], w1[k]) for k in w1)  # the same loss as AdapterTrainer's: the same run


def test_the_mixin_needs_a_trainer_after_it():
    class Alone(AdapterCheckpoints):
        pass

    with pytest.raises(TypeError, match="a mixin for transformers.Trainer subclasses"):
        Alone(adapted(seed=1))
    with pytest.raises(TypeError, match="AdapterCheckpoints must come before the Trainer class"):
        class Late(Trainer, AdapterCheckpoints):
            pass
