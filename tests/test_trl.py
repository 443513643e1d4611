"""AdapterCheckpoints on TRL's SFTTrainer and DPOTrainer: adapter-only checkpoints, a resumed run ends bit-exact,
DPO's reference is the base (BaseReference: the policy with its components disabled)."""
import pytest
import torch
from helpers import StopAt, tiny_gpt2, tiny_llama, weights

pytest.importorskip("trl")  # trl needs Python >= 3.11 (setup.py's test extra installs it there)
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from adaptune import ConfigError, LoRA, attach  # noqa: E402
from adaptune.trainer import ADAPTERS_FILE, AdapterCheckpoints, BaseReference  # noqa: E402

STEPS, SAVE_EVERY = 4, 2
WORDS = "the a cat dog sat ran on under mat log red blue big small and is was happy sad good bad".split()
FULL_WEIGHTS = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "config.json"}


class SFT(AdapterCheckpoints, SFTTrainer):
    pass


class DPO(AdapterCheckpoints, DPOTrainer):
    pass


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (ids below helpers.VOCAB); </s> ends and pads."""
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>")


def texts() -> Dataset:
    return Dataset.from_dict({"text": [
        "the cat sat on the mat", "a dog ran under the log", "the red cat is happy", "a big dog was sad",
        "the small cat ran on the mat", "a blue dog sat under the log", "the cat and the dog sat", "a good dog is big"]})


def preferences() -> Dataset:
    return Dataset.from_dict({"prompt": ["the cat", "a dog", "the red cat", "a big dog"],
                              "chosen": [" sat on the mat", " ran under the log", " is happy", " was good"],
                              "rejected": [" bad bad", " sad sad", " log log", " mat mat"]})


def base():
    """The same base every time (as from_pretrained gives it); big enough that LoRA(4) is under 5% of it."""
    return tiny_llama(hidden=64).train()


def adapted(seed: int):
    model = base()
    torch.manual_seed(seed)
    attach(model, {"attn": LoRA(4, dropout=0.1)})
    return model


COMMON = dict(max_steps=STEPS, save_steps=SAVE_EVERY, learning_rate=1e-2, warmup_steps=1, seed=0, use_cpu=True,
              report_to=[], disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0, max_length=16)


def sft(model, out, **kw) -> SFT:
    """SFTConfig's defaults as they are (bf16 autocast, gradient checkpointing)."""
    args = SFTConfig(str(out), per_device_train_batch_size=4, **COMMON)
    return SFT(model, args, train_dataset=texts(), processing_class=tokenizer(), **kw)


def dpo(model, out, ref=None, **kw) -> DPO:
    args = DPOConfig(str(out), per_device_train_batch_size=2, **COMMON)
    ref = BaseReference(model) if ref is None else ref
    return DPO(model, ref, args, train_dataset=preferences(), processing_class=tokenizer(), **kw)


def run(make, root) -> dict:
    """An uninterrupted run, and one interrupted at SAVE_EVERY then resumed by a new trainer on a new model."""
    whole, first, resumed = adapted(seed=1), adapted(seed=1), adapted(seed=2)  # seed 2: the checkpoint must win
    start = weights(whole)
    make(whole, root / "whole").train()
    make(first, root / "cut", callbacks=[StopAt(SAVE_EVERY)]).train()
    trainer = make(resumed, root / "cut")
    trainer.train(resume_from_checkpoint=str(root / "cut" / f"checkpoint-{SAVE_EVERY}"))
    return {"root": root, "start": start, "whole": whole, "first": first, "resumed": resumed, "trainer": trainer}


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    return run(sft, tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    return run(dpo, tmp_path_factory.mktemp("dpo"))


@pytest.fixture(params=["sft", "dpo"])
def runs(request):
    return request.getfixturevalue(f"{request.param}_runs")


def test_resumed_run_ends_bit_exact(runs):
    w1, w2 = weights(runs["whole"]), weights(runs["resumed"])
    assert w1.keys() == w2.keys() and w1
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert runs["trainer"].state.global_step == STEPS
    first = weights(runs["first"])
    assert all(not torch.equal(runs["start"][k], first[k]) for k in w1 if k.endswith(".B"))  # training moved them
    assert any(not torch.equal(first[k], w1[k]) for k in w1)  # and went on after the cut


def test_every_checkpoint_holds_adapters_far_smaller_than_the_base(runs):
    params = dict(runs["whole"].named_parameters())
    base_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if not n.startswith("adaptune."))
    checkpoints = sorted((runs["root"] / "whole").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    for ckpt in checkpoints:
        names = {p.name for p in ckpt.iterdir()}
        assert {ADAPTERS_FILE, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names, names
        assert not names & FULL_WEIGHTS, names
        assert not [p for p in ckpt.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
                    and p.name not in (ADAPTERS_FILE, "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                       "training_args.bin")]
        size = (ckpt / ADAPTERS_FILE).stat().st_size
        assert size < 0.05 * base_bytes, (size, base_bytes)


def test_dpo_with_base_reference_trains_as_with_a_frozen_copy_of_the_base(dpo_runs, tmp_path):
    """BaseReference is the base without a second copy: a DPO run against an explicit frozen base ends the same."""
    model, copy = adapted(seed=1), base().eval().requires_grad_(False)
    dpo(model, tmp_path, ref=copy).train()
    w1, w2 = weights(dpo_runs["whole"]), weights(model)
    assert all(torch.equal(w1[k], w2[k]) for k in w1), max((w1[k] - w2[k]).abs().max().item() for k in w1)


def test_base_reference_runs_the_base_and_holds_no_second_copy():
    model, plain = adapted(seed=1), base().eval()
    with torch.no_grad():
        for p in model.adaptune.parameters():
            p.add_(0.1)  # components that change the output
    ref, ids = BaseReference(model).eval(), torch.tensor([[3, 5, 7, 9, 3, 11]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, plain(ids).logits)
        assert not torch.allclose(model(ids).logits, plain(ids).logits)  # the policy itself is unchanged
    assert model.adaptune.enabled
    assert list(ref.parameters()) == [] and ref.config is model.config
    assert ref.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(ConfigError, match="BaseReference needs a model with an adaptation"):
        BaseReference(plain)


def test_base_reference_runs_without_dropout_and_restores_every_mode():
    """A policy in train mode (GPT-2: dropout 0.1 everywhere): the reference runs as the base in eval mode would."""
    model, plain = tiny_gpt2().train(), tiny_gpt2().eval()
    attach(model, {"attn": LoRA(4, dropout=0.1)})
    model.transformer.h[0].eval()  # a module the user put in eval mode stays there
    modes = {name: m.training for name, m in model.named_modules()}
    ids = torch.tensor([[3, 5, 7, 9, 3, 11]])
    with torch.no_grad():
        assert torch.equal(BaseReference(model)(ids).logits, plain(ids).logits)
    assert {name: m.training for name, m in model.named_modules()} == modes


def listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("make", [sft, dpo], ids=["sft", "dpo"])
def test_refuses_a_model_without_adaptation(tmp_path, make):
    name = "SFT" if make is sft else "DPO"
    plain = base()
    with pytest.raises(ConfigError, match=f"{name} needs a model with an adaptation; LlamaForCausalLM has none: "
                                          f"call adaptune.attach"):
        make(plain, tmp_path / "out", **({"ref": base().eval()} if make is dpo else {}))
    assert listing(tmp_path) == []
    with pytest.raises(ConfigError, match="SFT needs a model with an adaptation, not the model name 'org/some-lm'"):
        SFT("org/some-lm", SFTConfig(str(tmp_path / "out"), use_cpu=True), train_dataset=texts())


def test_refuses_a_peft_config(tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.raises(ConfigError, match="peft_config asks the trainer to wrap the model in PEFT adapters"):
        sft(adapted(seed=1), tmp_path / "out", peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert listing(tmp_path) == []


def test_refuses_trainable_base_parameters(tmp_path):
    model = adapted(seed=1)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="SFT saves only the adaptation, but 1 base parameters train"):
        sft(model, tmp_path / "out")
    assert listing(tmp_path) == []


def test_base_reference_refuses_sync_ref_model(tmp_path):
    model = adapted(seed=1)
    args = DPOConfig(str(tmp_path / "out"), sync_ref_model=True, **COMMON)
    with pytest.raises(ConfigError, match="BaseReference.*stays the base, but sync_ref_model=True"):
        DPO(model, BaseReference(model), args, train_dataset=preferences(), processing_class=tokenizer())
    assert listing(tmp_path) == []


def test_the_mixin_must_come_before_the_trainer():
    with pytest.raises(TypeError, match="AdapterCheckpoints must come before the Trainer class"):
        class Late(SFTTrainer, AdapterCheckpoints):
            pass


def test_after_bf16_training_the_forward_stays_in_autocast_until_restored(sft_runs, tmp_path):
    """SFTConfig defaults to bf16: Accelerate wraps the model's forward in autocast and leaves it wrapped after
    training (an outer autocast(enabled=False) does not reach inside); `_original_forward` is the forward as it was.
    With bf16=False nothing is wrapped."""
    model, ids = sft_runs["first"].eval(), torch.tensor([[3, 5, 7, 9, 3, 11]])
    fp32 = base().eval()
    attach(fp32, {"attn": LoRA(4, dropout=0.1)}).load_state_dict(model.adaptune.state_dict())
    fp32.eval()
    with torch.no_grad():
        want = fp32(ids).logits
        assert "_original_forward" in model.__dict__ and not torch.equal(model(ids).logits, want)
        with torch.autocast("cpu", enabled=False):
            assert not torch.equal(model(ids).logits, want)
        model.forward = model.__dict__.pop("_original_forward")
        assert torch.equal(model(ids).logits, want)
    plain = adapted(seed=1)
    args = SFTConfig(str(tmp_path), **{**COMMON, "max_steps": 1, "save_strategy": "no"}, bf16=False)
    SFT(plain, args, train_dataset=texts(), processing_class=tokenizer()).train()
    assert "_original_forward" not in plain.__dict__
