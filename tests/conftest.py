"""Test settings (offline, two threads) and the shared fixtures; helpers live in helpers.py.

Modules marked `on_device` (pytestmark) run on $ADAPTUNE_TEST_DEVICE when it is set (benchmarks/gpu_check.sh sets
it to cuda): every tensor made without a device is made there (helpers.OnDevice).

The modules in SLOW are marked `slow`: `pytest -m "not slow"` is the quick suite for a change in progress; CI
runs everything."""
import os

import pytest
import torch
from helpers import VOCAB, OnDevice, tiny_bert, tiny_gpt2

TEST_DEVICE = os.environ.get("ADAPTUNE_TEST_DEVICE")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["gpt2", "bert"])
def model(request):
    return tiny_gpt2() if request.param == "gpt2" else tiny_bert()


@pytest.fixture
def ids():
    return torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


SLOW = {  # module -> why it takes its time (together most of the suite's)
    "test_kernels_build.py": "builds the C++ extension, in fresh processes",
    "test_distributed.py": "torchrun, two processes",
    "test_fsdp.py": "torchrun, two processes sharding with FSDP2",
    "test_trainer_sharded.py": "torchrun, two processes per engine: DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3",
    "test_multitask_sharded.py": "torchrun, two processes per engine: a task column under DDP and FSDP2",
    "test_compile.py": "torch.compile",
    "test_crash_safe.py": "kills writer processes mid-write",
    "test_minilm.py": "a real checkpoint (all-MiniLM-L6-v2)",
    "test_vae_training.py": "trains AdaVAE",
    "test_gpu_check.py": "rehearses benchmarks/gpu_check.sh",
    "test_bench.py": "runs the benchmark suites",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "on_device: the module's tests run on $ADAPTUNE_TEST_DEVICE when it is set")
    config.addinivalue_line("markers", "slow: in a module of conftest.SLOW (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def test_device(request):
    """The device an `on_device` test runs on: $ADAPTUNE_TEST_DEVICE, else the CPU (without the device mode)."""
    if TEST_DEVICE is None or request.node.get_closest_marker("on_device") is None:
        yield "cpu"
        return
    with OnDevice(TEST_DEVICE):
        yield TEST_DEVICE
