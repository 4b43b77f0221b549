"""Every file of a saved rack (adapters, an int8 stack where torchao is installed), damaged every way
bench/fuzz.py knows (truncations, a flipped byte, random bytes, deletion, bad JSON, JSON of the wrong
shape), either raises a StackWiseError naming the file or loads exactly the saved rack: zero silent
differences, zero unclear errors. One position per file here; `python bench/fuzz.py` sweeps more."""

import logging

import pytest

from bench.fuzz import sweep


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
def test_no_damage_is_silent_or_unclear(caplog):
    problems = []
    with caplog.at_level(logging.ERROR):
        counts = sweep(positions=1, seed=0, log=problems)
    assert counts["tried"] > 100
    assert counts["silent"] == 0 and counts["ugly"] == 0, "\n".join(problems)
