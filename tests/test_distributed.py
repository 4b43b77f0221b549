"""Two real processes on the CPU (gloo): the trainer must run unchanged under `accelerate launch` and
`torchrun`, and DDP must leave identical weights on both ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = {
    "model": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "stack_sizes": [1], "max_position_embeddings": 64},
    "training": {"per_device_train_batch_size": 4, "logging_steps": 2, "report_to": "none", "plot": False},
    "stages": [{"max_steps": 4}, {"grow": "append", "n_blocks": 1, "max_steps": 4}],
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
