"""The command line on the bundled default: train a small rack on Shakespeare, inspect it, generate."""

import json

import pytest

from stackwise_hf.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main([
        "train", "--config", "configs/default.yaml", "--output-dir", str(out),
        "--set", "stages.*.max_steps=25", "--set", "data.max_train_blocks=800", "--set", "data.block_size=64",
        "--set", "training.save_interval=null", "--set", "training.report_to=none",
    ])
    return out, code


def test_default_config_trains_to_a_clearly_lower_loss(trained):
    out, code = trained
    assert code == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert train[-1] < train[0] - 1.0
    assert len(evals) == 3 and evals[-1]["loss"] < evals[0]["loss"]
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "final" / "tokenizer.json").exists()


def test_info_prints_the_stacks(trained, capsys):
    out, _ = trained
    assert main(["info", str(out / "final"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stack_sizes"] == [2, 2, 2] and info["num_stacks"] == 3
    assert main(["info", str(out / "final")]) == 0
    assert "3 stacks, 6 blocks" in capsys.readouterr().out


def test_generate_continues_a_prompt(trained, capsys):
    out, _ = trained
    assert main(["generate", str(out / "final"), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:") + 5
