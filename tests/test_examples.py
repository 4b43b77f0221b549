"""Every script in examples/ runs, from a working directory of its own, as `python examples/<script> ...`
would (in this process through runpy, to spare a fresh interpreter's imports)."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, args: list[str], tmp_path, monkeypatch, capsys) -> str:
    monkeypatch.chdir(tmp_path)  # not the repository: examples must not depend on the working directory
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def test_every_example_is_run_here():
    tested = {"checkpointing_guide.py", "checkpointing_example.py", "progressive_adapter_push.py", "llama_growth.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_checkpointing_guide(tmp_path, monkeypatch, capsys):
    out = _run("checkpointing_guide.py", ["--output-dir", str(tmp_path / "guide")], tmp_path, monkeypatch, capsys)
    assert "loaded a rack of 2 stacks" in out and "stack 1 (bfloat16)" in out
    assert (tmp_path / "guide" / "complete_rack" / "config.json").is_file()


def test_checkpointing_example(tmp_path, monkeypatch, capsys):
    out = _run("checkpointing_example.py", ["--output-dir", "run", "--max-steps", "6"], tmp_path, monkeypatch, capsys)
    assert "Restored a rack with stacks [2, 2]" in out
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_progressive_adapter_push(hub_server, tmp_path, monkeypatch, capsys):
    out = _run("progressive_adapter_push.py", ["--output-dir", "run", "--max-steps", "4", "--repo-id", "me/tiny-rack"],
               tmp_path, monkeypatch, capsys)
    assert "trained [1, 1, 1]" in out
    assert "pulled me/tiny-rack back with adapters ['stack_2']" in out
    commits = hub_server.commits("me/tiny-rack")
    assert "adapters/stack_2/adapter_model.safetensors" in commits[0].files
    assert "Training checkpoint: step 12 (stage_end)" in [c.message for c in commits]  # pushed while training


def test_llama_growth(tmp_path, monkeypatch, capsys):
    out = _run("llama_growth.py", ["--output-dir", "run", "--max-steps", "3"], tmp_path, monkeypatch, capsys)
    assert "grew 2 layers to [2, 2, 2]" in out and "the original layers unchanged: True" in out
    assert "exported a 6-layer Llama" in out
    assert (tmp_path / "run" / "llama" / "tokenizer.json").is_file()
