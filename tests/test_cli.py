"""The command line on the bundled default: train a small rack on Shakespeare, inspect it, generate."""

import json
import math

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
    # Held out, 25 steps a stage only leave the uniform guess (ln 4096 = 8.32) for the unigram plateau
    # (~6.7), so stage-to-stage changes are noise here; bench/quality.py measures the schedule itself.
    assert len(evals) == 3 and all(e["loss"] < math.log(4096) - 1.0 for e in evals)
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


@pytest.mark.parametrize("text, message", [
    ("model: {stack_sizes: 2}\n", "model.stack_sizes = 2:"),
    ("model: {hidden_size: 32}\nobjective: {mask_ratoi: 0.3}\n",
     "objective: unknown ObjectiveConfig field(s) ['mask_ratoi']; allowed fields are ['seed',"),
    ("training: {mixed_precision: fp8}\n", "training: `mixed_precision` must be one of ['no', 'bf16', 'fp16']; got 'fp8'"),
    ("stages: [{max_steps: 1, trunk_mode: cached}]\n", "stages[0]: `trunk_mode` must be one of ['recompute', 'cache']"),
    ("model: [1\n", "not valid YAML"),
])
def test_a_bad_config_is_one_line_naming_file_and_field(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stackwise train: error: {path}") and message in err
    assert "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="bad.yaml"):  # --debug shows the real exception
        main(["--debug", "train", "--config", str(path)])
