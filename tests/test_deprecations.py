"""adaptune's own calls into transformers use no deprecated name: cached forwards and generate with the
hooks that read a forward's arguments (prompt tuning) or wrap attention (prefix tuning)."""
import logging
import warnings

import pytest
import torch
from helpers import cache_of, randomize, tiny_gpt2, tiny_llama, with_cache

from adaptune import Prefix, PromptTuning, attach


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Every warning transformers logs meanwhile (its once-only cache cleared first), and Python's warnings."""
    from transformers.utils import logging as hf_logging
    logger = hf_logging.get_logger("transformers")
    handler, level = Records(), logger.level
    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield handler.messages
    handler.messages.extend(str(w.message) for w in caught)
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("spec", [{"embed": PromptTuning(3)}, {"attn": Prefix(3)}], ids=["prompt", "prefix"])
def test_cached_paths_log_no_deprecation(make, spec, transformers_warnings):
    model = make()
    model.generation_config.eos_token_id = None
    randomize(attach(model, spec), std=0.5)
    ids = torch.randint(2, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(ids[:, :3], use_cache=True)
        model(ids[:, 3:], **with_cache(model, cache_of(first)))
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=1)
    deprecated = [m for m in transformers_warnings if "deprecat" in m.lower()]
    assert not deprecated, deprecated
