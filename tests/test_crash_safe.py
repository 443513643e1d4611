"""Saves and exports survive kill -9: a writer killed at random points always leaves a target that
loads, and the next write cleans up what the killed ones left."""
import multiprocessing
import os
import random

import pytest
import torch

from adaptune import LoRA, attach, detach, export_peft, import_peft, load
from adaptune.files import atomic_write_dir, exchange
from helpers import tiny_gpt2

KILLS = 10


def _write_forever(kind: str, target: str, ready) -> None:
    torch.set_num_threads(1)
    model = tiny_gpt2()
    for i in range(10 ** 9):
        adaptation = attach(model, {"attn": LoRA(2 + 2 * (i % 2))})  # the rank alternates: a torn export shows
        if kind == "save":
            adaptation.save(target)
        else:
            export_peft(adaptation, target)
        detach(model)
        ready.set()


def _loads(kind: str, target: str) -> None:
    model = tiny_gpt2()
    adaptation = load(model, target) if kind == "save" else import_peft(model, target)
    per_rank = 2 * 3 * 64 if kind == "save" else 2 * 3 * 128  # layers · q, k, v · A + B (an export: on all of c_attn)
    assert adaptation.counts().shared in (2 * per_rank, 4 * per_rank)


@pytest.fixture(scope="module")
def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "adaptune", "helpers"])
    return ctx


@pytest.mark.parametrize("kind, name", [("save", "a.safetensors"), ("export", "peft")])
def test_a_writer_killed_at_random_points_leaves_a_target_that_loads(tmp_path, context, kind, name):
    target = str(tmp_path / name)
    rng = random.Random(0)
    for _ in range(KILLS):
        ready = context.Event()
        writer = context.Process(target=_write_forever, args=(kind, target, ready))
        writer.start()
        assert ready.wait(60), "the writer never finished a first write"
        writer.join(rng.uniform(0.0, 0.4))
        writer.kill()
        writer.join()
        _loads(kind, target)
    adaptation = attach(tiny_gpt2(), {"attn": LoRA(2)})
    adaptation.save(target) if kind == "save" else export_peft(adaptation, target)
    assert os.listdir(tmp_path) == [name]  # no .tmp / .old left beside it
    _loads(kind, target)


def test_a_stale_old_copy_is_put_back_when_its_target_is_missing(tmp_path):
    target = tmp_path / "out"
    (tmp_path / ".out.999999999-0123456789ab.old").mkdir()  # a dead writer's old copy, target never renamed in
    (tmp_path / ".out.999999999-0123456789ab.old" / "x").write_text("old")
    atomic_write_dir(target, lambda tmp: (tmp / "y").write_text("new"))
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["y"]


def test_a_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("old")

    def fail(tmp):
        (tmp / "x").write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, fail)
    assert os.listdir(tmp_path) == ["out"] and (target / "x").read_text() == "old"


def test_exchange_swaps_two_directories_or_says_it_cannot(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").touch()
    if exchange(tmp_path / "a", tmp_path / "b"):
        assert os.listdir(tmp_path / "b") == ["from_a"] and os.listdir(tmp_path / "a") == []
    else:  # nothing moved
        assert os.listdir(tmp_path / "a") == ["from_a"] and os.listdir(tmp_path / "b") == []


def test_a_saved_file_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        adaptation = attach(tiny_gpt2(), {"attn": LoRA(2)})
        path = adaptation.save(tmp_path / "a.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        adaptation.save(path)  # a replaced file keeps its mode
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
