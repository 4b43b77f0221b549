"""Two real processes on the CPU (gloo): the trainer must run unchanged under `accelerate launch` and
`torchrun`, DDP must leave identical weights on both ranks, and FSDP2 (each stack its own unit) must
train the same rack as DDP across growth events."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from stackwise_hf.training import StageConfig, TrainingArguments
from stackwise_hf.training.fsdp import check_fsdp_support

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = {
    "model": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "stack_sizes": [1], "max_position_embeddings": 64},
    "training": {"per_device_train_batch_size": 4, "logging_steps": 2, "report_to": "none", "plot": False},
    "stages": [{"max_steps": 4}, {"grow": "append", "n_blocks": 1, "max_steps": 4}],
}


# Three stages, so the rack is sharded, gathered and sharded again twice; tied embeddings, an uneven eval
# split (3 batches on 2 processes) and a stack adapter in the last stage.
FSDP_CONFIG = {
    "model": {**CONFIG["model"], "tie_word_embeddings": True},
    "training": {**CONFIG["training"], "per_device_eval_batch_size": 8},
    "stages": [*CONFIG["stages"], {"grow": "append", "n_blocks": 1, "max_steps": 4, "stack_adapter": {"r": 4},
                                   "train": ["stack_adapter", "head"]}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_process_ddp_on_cpu_gives_identical_weights(tmp_path, launcher):
    config = {**CONFIG, "training": {**CONFIG["training"], "output_dir": str(tmp_path / "run")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    worker = [str(ROOT / "tests/scripts/ddp_worker.py"), str(tmp_path / "config.yaml"), str(tmp_path)]
    port = str(_free_port())
    if launcher == "accelerate":
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/ddp_cpu.yaml"),
               "--main_process_port", port, *worker]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *worker]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["eval_loss"] == ranks[1]["eval_loss"]
    assert (tmp_path / "run" / "final" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    "fsdp2, save_interval, message",
    [(False, None, "set `fsdp_version: 2`"), (True, 10, "`save_interval=10`: mid-stage checkpoints")],
)
def test_fsdp_settings_the_trainer_cannot_honour_are_refused(fsdp2, save_interval, message):
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=fsdp2)
    with pytest.raises(ValueError, match=message):
        check_fsdp_support(accelerator, TrainingArguments(save_interval=save_interval))
    check_fsdp_support(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), TrainingArguments(save_interval=10))


def test_a_quantized_trunk_under_fsdp_is_refused():
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    stages = [StageConfig(max_steps=1), StageConfig(name="q", grow="append", n_blocks=1, max_steps=1,
                                                    trunk_quantization="int8")]
    with pytest.raises(ValueError, match=r"\['q'\]: `trunk_quantization` under FSDP is not supported"):
        check_fsdp_support(accelerator, TrainingArguments(), stages)


def _torchrun(tmp_path, config: dict, mode: str) -> list[dict]:
    out = tmp_path / mode
    out.mkdir()
    config = {**config, "training": {**config["training"], "output_dir": str(out / "run")}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests/scripts/ddp_worker.py"), str(out / "config.yaml"), str(out), mode]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _final_weights(tmp_path, mode: str) -> dict:
    final = tmp_path / mode / "run" / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(final / shard))
    return weights


@pytest.mark.slow
def test_fsdp2_shards_each_stack_and_trains_the_rack_ddp_trains(tmp_path):
    fsdp = _torchrun(tmp_path, FSDP_CONFIG, "fsdp")
    ddp = _torchrun(tmp_path, FSDP_CONFIG, "ddp")
    assert [r["distributed_type"] for r in fsdp] == ["DistributedType.FSDP"] * 2
    assert [r["num_processes"] for r in fsdp] == [2, 2]
    # Every stack of the rack was its own FSDP unit in every stage (the rack had 1, 2, then 3 stacks).
    assert fsdp[0]["sharded_stacks"] == [[0], [0, 1], [0, 1, 2]]
    assert ddp[0]["sharded_stacks"] == [[], [], []]
    assert fsdp[0]["sha256"] == fsdp[1]["sha256"]  # between stages every rank holds the same plain rack
    # Same data, same seed, same steps: sharded and replicated training agree up to reduction order.
    assert fsdp[0]["stage_eval"] == pytest.approx(ddp[0]["stage_eval"], rel=1e-5)
    sharded, replicated = _final_weights(tmp_path, "fsdp"), _final_weights(tmp_path, "ddp")
    assert sharded.keys() == replicated.keys()
    for name in sharded:
        assert sharded[name].dtype == replicated[name].dtype, name
        torch.testing.assert_close(sharded[name], replicated[name], rtol=1e-4, atol=1e-5, msg=name)
    adapter = tmp_path / "fsdp" / "run" / "final" / "adapters" / "stack_2" / "adapter_model.safetensors"
    assert adapter.exists()
