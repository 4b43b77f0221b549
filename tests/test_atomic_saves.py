"""Every overwrite of a rack, stack or adapter set is atomic: a SIGKILL at any moment of a save leaves the
old or the new version complete at the path (loading exactly one of them), never a mix, and the next
save removes what the killed one left behind. Files saved beside a rack (a tokenizer) survive overwrites."""

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from stackwise_hf import StackWiseForCausalLM
from stackwise_hf.adapter_files import save_adapters
from stackwise_hf.adapters import add_stack_adapter
from stackwise_hf.atomic import remove_leftovers, replacing
from tiny import tiny_config, tiny_rack

SHAPE = dict(stack_sizes=[1, 1])


def _versions():
    """Two racks of the same shape with different weights and adapters (version 0 and 1)."""
    out = []
    for seed in (0, 1):
        rack = tiny_rack(seed=seed, **SHAPE)
        add_stack_adapter(rack, 1, r=2, lora_alpha=4, init_lora_weights=False)
        out.append(rack)
    return out


def _fingerprint(rack) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for _, p in sorted(rack.named_parameters())])


def _saver(path, stop_after):
    torch.set_num_threads(1)
    racks = _versions()
    for i in range(stop_after):
        racks[i % 2].save_rack(path, max_shard_size="4KB")  # several shards per stack: many kill points


def _kill_cycle(path, rng) -> None:
    # fork: the child reuses the imported libraries, so a cycle costs a save, not an interpreter start.
    child = multiprocessing.get_context("fork").Process(target=_saver, args=(path, 10_000))
    child.start()
    time.sleep(rng.uniform(0.05, 0.6))
    os.kill(child.pid, signal.SIGKILL)
    child.join()


def test_a_rack_overwrite_killed_anywhere_leaves_one_complete_version(tmp_path):
    path = tmp_path / "rack"
    versions = [_fingerprint(r) for r in _versions()]
    rng = random.Random(0)
    seen = set()
    for _ in range(6):
        _kill_cycle(path, rng)
        if not path.exists():  # killed before the first save completed
            continue
        loaded = StackWiseForCausalLM(tiny_config(**SHAPE))
        loaded.load_rack(path)
        matches = [i for i, v in enumerate(versions) if torch.equal(_fingerprint(loaded), v)]
        assert len(matches) == 1, "the directory loads as neither version"
        seen.add(matches[0])
    assert seen, "no save ever completed; the kill window is too short for this machine"
    _versions()[0].save_rack(path)
    assert sorted(os.listdir(tmp_path)) == ["rack"]  # the next save removed every leftover


def test_an_overwrite_keeps_files_saved_beside_the_rack_and_drops_stale_format_files(tmp_path):
    rack = tiny_rack(stack_sizes=[1, 2])
    rack.save_rack(tmp_path, max_shard_size="4KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "adapters").mkdir(exist_ok=True)
    (tmp_path / "adapters" / "notes.txt").write_text("mine")
    shards = {f for f in os.listdir(tmp_path) if f.endswith(".safetensors")}
    smaller = tiny_rack(stack_sizes=[1])
    smaller.save_rack(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "adapters" / "notes.txt").read_text() == "mine"
    assert {f for f in os.listdir(tmp_path) if f.endswith(".safetensors")} == {
        "model-rack.safetensors", "model-stack000.safetensors"} != shards


def test_an_adapter_set_overwrite_is_one_swap(tmp_path):
    rack = tiny_rack(**SHAPE)
    add_stack_adapter(rack, 0, r=2, lora_alpha=4)
    save_adapters(rack, tmp_path)
    first = sorted(os.listdir(tmp_path / "adapters"))
    rack2 = tiny_rack(**SHAPE)
    add_stack_adapter(rack2, 1, r=2, lora_alpha=4)
    save_adapters(rack2, tmp_path)
    assert first == ["stack_0", "stackwise_adapters.json"]
    assert sorted(os.listdir(tmp_path / "adapters")) == ["stack_1", "stackwise_adapters.json"]


def test_a_failed_save_leaves_the_old_version_and_no_temporary_directory(tmp_path):
    target = tmp_path / "out"
    with replacing(target) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("old")
    with pytest.raises(RuntimeError, match="boom"):
        with replacing(target) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("new")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_leftovers_of_a_killed_two_rename_swap_are_restored_or_removed(tmp_path):
    target = tmp_path / "out"
    aside, new = tmp_path / ".out.stackwise-old-x", tmp_path / ".out.stackwise-new-y"
    aside.mkdir()
    (aside / "a.txt").write_text("old")
    new.mkdir()
    remove_leftovers(target)  # the path is empty: the version moved aside comes back
    assert (target / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]
