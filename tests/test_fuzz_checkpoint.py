"""Every file of a mid-stage training checkpoint, damaged every way bench/fuzz.py knows (truncations, a
flipped byte, random bytes, deletion, bad JSON, JSON of the wrong shape), then resumed the way
`resume_from_checkpoint` does (verification, then rack, trainer state, optimizer, scheduler, step
counters and RNG restored): either a StackWiseError naming the file or exactly the undamaged resume;
zero silent differences, zero unclear errors. One position per file here; `python bench/fuzz.py
--target checkpoint` sweeps more. (`resume_from_checkpoint="latest"` skipping a damaged newest
checkpoint is tested in tests/test_checkpointing.py.)"""

import logging

from bench.fuzz import sweep

# What a mid-stage resume reads, beyond the rack's own files (fuzzed by tests/test_fuzz_rack.py too).
RESUME_FILES = {"manifest.json", "trainer_state.json", "run_state.json", "optimizer.json", "optimizer.safetensors",
                "scheduler.json", "rng/process_0.json", "rng/process_0.safetensors", "rack/config.json",
                "rack/model.safetensors.index.json", "rack/model-stack000.safetensors",
                "rack/model-stack001.safetensors", "rack/model-rack.safetensors"}


def test_no_checkpoint_damage_is_silent_or_unclear(caplog):
    problems, fuzzed = [], set()
    with caplog.at_level(logging.ERROR):
        counts = sweep(positions=1, seed=0, log=problems, target="checkpoint", fuzzed=fuzzed)
    assert RESUME_FILES <= fuzzed and len(fuzzed) == counts["files"]
    assert counts["tried"] >= 6 * counts["files"]
    assert counts["silent"] == 0 and counts["ugly"] == 0, "\n".join(problems)
    assert counts["clear"] > 0.9 * counts["tried"]
