"""A checkpoint saved by an earlier version (tests/fixtures/checkpoint_v1, made by
tests/scripts/make_checkpoint_fixture.py before the training package was restructured) still resumes, and
restores exactly the saved weights, optimizer state and step: the on-disk format did not change."""

import importlib.util
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from stackwise_hf.training import ProgressiveTrainer
from stackwise_hf.training.checkpoint_format import read_state

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT / "fixtures" / "checkpoint_v1"
_spec = importlib.util.spec_from_file_location("make_fixture", ROOT / "scripts/make_checkpoint_fixture.py")
make_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixture)


def _saved_rack_tensors() -> dict:
    tensors = {}
    for shard in sorted((FIXTURE / "rack").glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_a_saved_mid_stage_checkpoint_resumes_exactly(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "checkpoint-00000005"
    shutil.copytree(FIXTURE, checkpoint)
    trainer = ProgressiveTrainer(make_fixture.experiment(str(tmp_path), resume=str(checkpoint)),
                                 **make_fixture.datasets())
    trainer.setup()
    assert (trainer.state.global_step, trainer.state.stage, trainer.state.stage_step) == (5, 1, 2)
    assert trainer.state.stage_entered
    run = trainer.enter_stage(trainer.schedule[trainer.state.stage])

    live = dict(trainer.rack.state_dict())
    saved = _saved_rack_tensors()
    for key, tensor in saved.items():
        assert torch.equal(live[key], tensor), key
    assert trainer.rack.config.stack_sizes == [1, 1]

    optimizer = read_state(FIXTURE, "optimizer")
    names = [n for group in run.optimizer.param_groups for n in group["names"]]
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    state = run.optimizer.state
    assert sorted(names) == sorted(optimizer["state"])
    for name, param in zip(names, params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[param][key], optimizer["state"][name][key]), (name, key)
    scheduler = read_state(FIXTURE, "scheduler")
    assert run.scheduler.state_dict()["last_epoch"] == scheduler["last_epoch"]

    trainer.run_stage(run)
    trainer.exit_stage(run)
    assert trainer.state.global_step == 7 and trainer.state.stage == 2
    assert all(torch.isfinite(p).all() for p in trainer.rack.parameters())
