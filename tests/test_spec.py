"""Text compositions: parse, print, parse again; bad text gives ConfigError."""
import pytest

from adaptune import Adapter, ConfigError, DoRA, LoRA, parse_spec
from adaptune.spec import format_spec


def test_parse_spec_builds_stacks_per_selector():
    spec = parse_spec("attn=LoRA(12)|Adapter(8, placement='parallel'); layers.0-1.ffn = DoRA(4, alpha=8)")
    assert list(spec) == ["attn", "layers.0-1.ffn"]
    assert spec["attn"].components == (LoRA(12), Adapter(8, placement="parallel"))
    assert spec["layers.0-1.ffn"].components == (DoRA(4, alpha=8),)
    assert parse_spec(format_spec(spec)) == spec


@pytest.mark.parametrize("text, words", [
    ("attn=Lora(4)", "unknown component 'Lora'"),
    ("attn=LoRA(r=__import__('os'))", "must be literals"),
    ("attn LoRA(4)", "selector=Stack"),
    ("attn=LoRA(0)", "r must be a positive integer"),
    ("attn=LoRA(4, rank=3)", "bad arguments"),
    ("", "empty spec"),
])
def test_bad_specs_name_the_problem(text, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(text)
