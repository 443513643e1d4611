"""Test settings (offline, two threads) and the shared fixtures; helpers live in helpers.py."""
import os

import pytest
import torch
from helpers import VOCAB, tiny_bert, tiny_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["gpt2", "bert"])
def model(request):
    return tiny_gpt2() if request.param == "gpt2" else tiny_bert()


@pytest.fixture
def ids():
    return torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
