"""Every rack saved for sharing carries its modeling code: `save_pretrained`, `save_rack`, the trainer's final
rack, `push_to_hub` and `stackwise push` all load with `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)` in an interpreter where stackwise_hf cannot be imported, with equal logits.
`remote_code=False` turns it off."""

import json
import os
import site
import subprocess
import sys

import pytest
import torch

from stackwise_hf import adapters
from stackwise_hf.cli import main as cli
from stackwise_hf.training import ProgressiveTrainer
from tiny import synthetic_blocks, tiny_experiment, tiny_mlm_rack, tiny_rack, tokens

X = tokens()

# Run with `python -I -S`: no site processing, so the editable install's path hook (a .pth file) is never
# loaded, and a meta-path finder refuses the package in case it is installed into site-packages itself.
# Only site-packages is put back on the path, for torch and transformers.
_LOAD = """
import sys
sys.path[:0] = {site_packages!r}


class _NoStackwise:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "stackwise_hf":
            raise ModuleNotFoundError(f"{{name}} is hidden in this interpreter")


sys.meta_path.insert(0, _NoStackwise())
try:
    import stackwise_hf  # noqa: F401
    sys.exit("stackwise_hf is importable: the check would prove nothing")
except ModuleNotFoundError:
    pass

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

auto = {{"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}}
expected = torch.load(sys.argv[1])
for source, kind in expected["sources"]:
    model = auto[kind].from_pretrained(source, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"][source], rtol=0, atol=0)
    print("REMOTE_CODE_OK", source)
"""


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _load_without_the_package(tmp_path, sources: list[tuple[str, str]], logits: dict):
    torch.save({"sources": sources, "logits": logits, "input_ids": X}, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOAD.format(site_packages=site.getsitepackages()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # transformers copies remote code under HF_HOME/modules
    result = subprocess.run([sys.executable, "-I", "-S", str(script), str(tmp_path / "expected.pt")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("REMOTE_CODE_OK") == len(sources)


def test_saved_trained_and_pushed_racks_load_without_the_package(hub_server, tmp_path):
    rack = tiny_rack(stack_sizes=[2, 1], stack_dtypes=["float32", "bfloat16"])
    adapters.add_stack_adapter(rack, 1, r=2)
    adapters.merge_stack_adapter(rack, "stack_1")
    logits, sources = {}, []

    def expect(source, model, kind="causal"):
        sources.append((str(source), kind))
        logits[str(source)] = _logits(model)

    rack.save_pretrained(tmp_path / "saved")
    expect(tmp_path / "saved", rack)
    rack.save_rack(tmp_path / "saved_rack", remote_code=False)  # `stackwise push` adds the code
    cli(["push", str(tmp_path / "saved_rack"), "me/cli-pushed"])
    expect("me/cli-pushed", rack)
    rack.push_to_hub("me/pushed")
    expect("me/pushed", rack)
    masked = tiny_mlm_rack()
    masked.save_pretrained(tmp_path / "masked")
    expect(tmp_path / "masked", masked, "masked")

    trainer = ProgressiveTrainer(tiny_experiment(tmp_path / "train", [{"max_steps": 2}]),
                                 train_dataset=synthetic_blocks(16), eval_dataset=synthetic_blocks(8, seed=1))
    final = trainer.train().output_dir
    expect(final, trainer.rack.eval())

    _load_without_the_package(tmp_path, sources, logits)


def test_remote_code_false_saves_and_pushes_no_code(hub_server, tmp_path):
    rack = tiny_rack()
    rack.push_to_hub("me/with-code")
    assert "modeling_stackwise.py" in hub_server.commits("me/with-code")[0].files
    rack.save_rack(tmp_path / "rack")
    cli(["push", str(tmp_path / "rack"), "me/with-code", "--no-remote-code"])  # the repo's copy is deleted
    assert not [f for f in hub_server.commits("me/with-code")[0].files if f.endswith(".py")]
    assert "auto_map" not in json.loads(hub_server.file_bytes("me/with-code", "config.json"))

    rack.save_pretrained(tmp_path / "plain", remote_code=False)
    assert not [f for f in os.listdir(tmp_path / "plain") if f.endswith(".py")]
    rack.save_pretrained(tmp_path / "plain")
    assert "modeling_stackwise.py" in os.listdir(tmp_path / "plain")
    rack.save_pretrained(tmp_path / "plain", remote_code=False)  # a second save removes the first one's code
    assert not [f for f in os.listdir(tmp_path / "plain") if f.endswith(".py")]
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    rack.save_pretrained(tmp_path / "shared")
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_stackwise.StackWiseForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_stackwise.StackWiseConfig"
