"""The README's Python examples run as written."""
import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert scope["loss"].item() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adaptune.") for n in trainable)


def test_readme_component_example_works_per_task_and_routed(tmp_path):
    import torch
    from helpers import VOCAB, tiny_gpt2

    from adaptune import attach, detach, load

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Adding a component"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = tiny_gpt2()
    ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    base = model(input_ids=ids).logits
    adaptation = attach(model, tasks={"a": {"ffn": scope["Gain"]()}, "b": {"ffn": scope["Gain"]()}})
    torch.testing.assert_close(model(input_ids=ids).logits, base)  # a fresh Gain is the identity
    with torch.no_grad():
        for binding in adaptation.bindings(["a"]):
            binding.module.g.fill_(0.5)
    with adaptation.using("a"):
        a = model(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-3
    with adaptation.route(["a", "b"]):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], base[1])
    adaptation.save(tmp_path / "gain.safetensors")
    detach(model)
    with load(model, tmp_path / "gain.safetensors").using("a"):
        torch.testing.assert_close(model(input_ids=ids).logits, a)
