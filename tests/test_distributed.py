"""Two real processes on the CPU (gloo): the trainer must run unchanged under `accelerate launch` and
`torchrun`, DDP must leave identical weights on both ranks, and FSDP2 under `accelerate launch` with the
shipped `configs/accelerate/fsdp.yaml` (each stack its own unit) must train the same rack as DDP across
growth events and resume exactly from a mid-stage checkpoint."""

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

from stackwise_hf.training import StageConfig
from stackwise_hf.training.fsdp import check_fsdp_support, keep_loss_in_float32

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = {
    "model": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "stack_sizes": [1], "max_position_embeddings": 64},
    "training": {"per_device_train_batch_size": 4, "logging_steps": 2, "report_to": "none", "plot": False},
    "stages": [{"max_steps": 4}, {"grow": "append", "n_blocks": 1, "max_steps": 4}],
}


# Three stages, so the rack is sharded, gathered and sharded again twice; tied embeddings, an uneven eval
# split (3 batches on 2 processes), a stack adapter in the last stage, and mid-stage checkpoints.
FSDP_CONFIG = {
    "model": {**CONFIG["model"], "tie_word_embeddings": True},
    "training": {**CONFIG["training"], "per_device_eval_batch_size": 8, "save_interval": 2, "save_total_limit": None},
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


def test_fsdp1_is_refused():
    with pytest.raises(ValueError, match="set `fsdp_version: 2`"):
        check_fsdp_support(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False))
    check_fsdp_support(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_under_fsdp_mixed_precision_the_loss_is_not_cast_down():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, output_dtype=torch.bfloat16))  # Accelerate's "bf16"
    keep_loss_in_float32(SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin)))
    assert plugin.mixed_precision_policy == MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.bfloat16, output_dtype=None)


def test_a_quantized_trunk_under_fsdp_is_refused():
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    stages = [StageConfig(max_steps=1), StageConfig(name="q", grow="append", n_blocks=1, max_steps=1,
                                                    trunk_quantization="int8")]
    with pytest.raises(ValueError, match=r"\['q'\]: `trunk_quantization` under FSDP is not supported"):
        check_fsdp_support(accelerator, stages)


def _torchrun(tmp_path, config: dict, mode: str, label: str | None = None) -> list[dict]:
    out = tmp_path / (label or mode)
    out.mkdir()
    config = {**config, "training": {**config["training"], "output_dir": str(out / "run")}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    worker = [str(ROOT / "tests/scripts/ddp_worker.py"), str(out / "config.yaml"), str(out), mode]
    if mode == "fsdp":  # the shipped FSDP config, in float32 to compare with DDP
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
               "--mixed_precision", "no", "--main_process_port", str(_free_port()), *worker]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), *worker]
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
def test_fsdp2_shards_each_stack_trains_the_rack_ddp_trains_and_resumes_exactly(tmp_path):
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

    # A mid-stage checkpoint under FSDP (plain rack, optimizer state gathered by parameter name) resumes,
    # sharded again, to the same weights bit for bit.
    checkpoint = tmp_path / "fsdp" / "run" / "checkpoints" / "checkpoint-00000010"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["stage"], state["stage_step"]) == (2, 2)
    resume = {**FSDP_CONFIG, "training": {**FSDP_CONFIG["training"], "resume_from_checkpoint": str(checkpoint)}}
    resumed = _torchrun(tmp_path, resume, "fsdp", label="resumed")
    log = [json.loads(line) for line in (tmp_path / "resumed" / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log if r["kind"] == "resume"] == [(2, 10)]
    assert resumed[0]["sharded_stacks"] == [[0, 1, 2]]  # only the rest of stage 2 ran, sharded
    assert resumed[0]["sha256"] == resumed[1]["sha256"] == fsdp[0]["sha256"]
