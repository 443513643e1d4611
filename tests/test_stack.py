"""Stacks: `a | b | c` is flat, ordered, printable, and plain data (JSON round trip)."""
import dataclasses
import json

import pytest

from adaptune import Adapter, Component, ConfigError, DoRA, LoRA, Stack


def test_pipe_builds_a_flat_ordered_stack():
    a, b, c, d = LoRA(4), Adapter(8), DoRA(2), Adapter(16, placement="parallel")
    stack = a | b | c
    assert isinstance(stack, Stack)
    assert list(stack) == [a, b, c] and len(stack) == 3 and stack[1] == b
    nested = (a | b) | (c | d)
    assert list(nested) == [a, b, c, d]
    assert all(isinstance(x, Component) for x in nested)
    assert list(a | (b | c)) == [a, b, c]


def test_stack_of_a_single_component_and_equality():
    assert list(Stack(LoRA(4))) == [LoRA(4)]
    assert (LoRA(4) | Adapter(8)) == (LoRA(4) | Adapter(8))
    assert (LoRA(4) | Adapter(8)) != (Adapter(8) | LoRA(4))
    assert hash(LoRA(4) | Adapter(8)) == hash(LoRA(4) | Adapter(8))
    assert LoRA(4) != DoRA(4)  # a DoRA is not a LoRA spec with the same arguments


def test_repr_lists_components_in_order():
    text = repr(LoRA(12, alpha=24.0) | Adapter(64, placement="parallel"))
    assert text.index("LoRA(") < text.index(" | ") < text.index("Adapter(")
    assert "r=12" in text and "alpha=24.0" in text and "placement='parallel'" in text
    assert repr(Stack()) == "Stack()"


def test_components_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRA(4).r = 8  # type: ignore[misc]


def test_json_round_trip_gives_an_equal_stack():
    stack = (LoRA(4, alpha=8.0, dropout=0.1) | DoRA(2, detach_norm=False)
             | Adapter(8, act="gelu", placement="parallel", scale=0.5))
    text = json.dumps(stack.to_dict())
    back = Stack.from_dict(json.loads(text))
    assert back == stack and repr(back) == repr(stack)
    assert [type(c) for c in back] == [LoRA, DoRA, Adapter]
    assert json.loads(text)[0] == {"type": "LoRA", "r": 4, "alpha": 8.0, "dropout": 0.1, "rslora": False,
                                   "init": "default"}


def test_a_stack_saved_before_a_field_existed_loads_with_its_default():
    (lora,) = Stack.from_dict([{"type": "LoRA", "r": 4, "alpha": 8.0, "dropout": 0.1}])
    assert lora == LoRA(4, alpha=8.0, dropout=0.1) and not lora.rslora and lora.init == "default"


def test_from_dict_rejects_an_unknown_type_naming_the_known_ones():
    with pytest.raises(ConfigError, match="unknown component type 'Nope'") as err:
        Stack.from_dict([{"type": "LoRA", "r": 4}, {"type": "Nope"}])
    assert "LoRA" in str(err.value) and "Adapter" in str(err.value)
    with pytest.raises(ConfigError, match="unknown component type None"):
        Component.from_dict({"r": 4})


def test_from_dict_rejects_unknown_arguments_and_bad_shapes():
    with pytest.raises(ConfigError, match="rank") as err:
        Component.from_dict({"type": "LoRA", "rank": 4})
    assert "dropout" in str(err.value)  # the valid arguments are listed
    with pytest.raises(ConfigError, match="list"):
        Stack.from_dict({"type": "LoRA"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dict"):
        Stack.from_dict(["LoRA"])  # type: ignore[list-item]


def test_from_dict_validates_arguments_like_the_constructor():
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        Component.from_dict({"type": "LoRA", "r": 0})


def test_stack_rejects_non_components():
    with pytest.raises(ConfigError, match="a stack holds components"):
        Stack(LoRA(4), "Adapter(8)")  # type: ignore[arg-type]
