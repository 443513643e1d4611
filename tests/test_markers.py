"""The `slow` marker names modules that exist, so renaming one cannot quietly move it into the quick suite."""
from pathlib import Path

from conftest import SLOW


def test_every_slow_module_exists():
    here = Path(__file__).parent
    assert sorted(name for name in SLOW if not (here / name).is_file()) == []
