"""Pushing while training (`push_to_hub`, `hub_model_id`, `hub_strategy`) against the loopback Hub, and
resuming from what was pushed (`resume_from_checkpoint="namespace/name[@revision]"`)."""

import json
import logging
import threading

import pytest

from stackwise_hf.training import ProgressiveTrainer, hub_sync
from tiny import synthetic_blocks, tiny_experiment

REPO = "me/run"
STAGES = [{"max_steps": 4}, {"grow": "append", "n_blocks": 1, "max_steps": 4}]


def _trainer(tmp_path, name, stages=STAGES, **training):
    fields = dict(push_to_hub=True, hub_model_id=REPO, save_interval=2, save_total_limit=1)
    experiment = tiny_experiment(tmp_path / name, stages, **{**fields, **training})
    return ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(32), eval_dataset=synthetic_blocks(8, seed=1))


def _state(hub, revision="main") -> dict:
    return json.loads(hub.file_bytes(REPO, f"{hub_sync.CHECKPOINT_FOLDER}/trainer_state.json", revision=revision))


def test_every_save_pushes_each_checkpoint_then_the_final_rack(hub_server, tmp_path):
    trainer = _trainer(tmp_path, "a")
    result = trainer.train()
    messages = [c.message for c in hub_server.commits(REPO)]
    # Checkpoints at steps 2, 4 (stage end), 6, 8 (stage end), oldest last; a newer one may supersede a
    # queued one before it starts, but the last checkpoint and the final rack always go.
    assert messages[0] == "Final rack"
    assert messages[1] == "Training checkpoint: step 8 (stage_end)"
    assert set(messages[1:-1]) <= {f"Training checkpoint: step {s} ({k})" for s, k in
                                   [(2, "interval"), (4, "stage_end"), (6, "interval"), (8, "stage_end")]}
    assert _state(hub_server)["global_step"] == result.global_step == 8
    files = hub_server.commits(REPO)[0].files
    assert "config.json" in files and "README.md" in files and "model.safetensors.index.json" in files
    assert not list((tmp_path / "a" / "run").glob(".hub-push-*"))  # staging folders are removed


def test_stage_end_and_end_strategies_push_less(hub_server, tmp_path):
    _trainer(tmp_path, "b", hub_strategy="stage_end").train()
    messages = [c.message for c in hub_server.commits(REPO)]
    assert [m for m in messages if m.startswith("Training checkpoint")][0] == "Training checkpoint: step 8 (stage_end)"
    assert not any("interval" in m for m in messages)
    hub_server.reset()
    _trainer(tmp_path, "c", hub_strategy="end").train()
    assert [c.message for c in hub_server.commits(REPO)][0] == "Final rack"
    assert not any(m.startswith("Training checkpoint") for m in (c.message for c in hub_server.commits(REPO)))


def test_a_failed_push_warns_and_training_goes_on(hub_server, tmp_path, caplog):
    hub_server.fail_next("commit", status=500)  # the first push's commit is refused (commits are not retried)
    with caplog.at_level(logging.WARNING, logger="stackwise_hf.training.hub_sync"):
        result = _trainer(tmp_path, "d").train()
    assert result.global_step == 8
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "training goes on, the next save pushes again" in warnings[0]
    assert _state(hub_server)["global_step"] == 8  # a later save pushed again


def test_pushing_does_not_stall_training(hub_server, tmp_path, monkeypatch):
    """The first checkpoint's push is held until training has run its last step: were pushes made on the
    training thread, training could never get there (the held push gives up after 60 s and the test fails)."""
    trainer = _trainer(tmp_path, "e", stages=STAGES[:1])
    real_push = hub_sync.push_checkpoint_to_hub
    reached_the_end = threading.Event()
    held = []

    def held_push(*args, **kwargs):
        if not held:
            held.append(True)
            assert reached_the_end.wait(timeout=60), "training did not go on while a push was in flight"
        return real_push(*args, **kwargs)

    monkeypatch.setattr(trainer, "finish", _signalling(trainer.finish, reached_the_end))
    monkeypatch.setattr(hub_sync, "push_checkpoint_to_hub", held_push)
    # (setup() builds the trainer's HubSync, which takes the patched function)
    result = trainer.train()
    assert held and result.global_step == 4
    assert _state(hub_server)["global_step"] == 4


def _signalling(finish, event):
    def wrapped():
        event.set()
        return finish()
    return wrapped


def test_resume_from_the_pushed_repo_and_from_a_revision(hub_server, tmp_path):
    first = _trainer(tmp_path, "f", stages=STAGES[:1])
    first.train()
    step_2 = next(c.oid for c in hub_server.commits(REPO) if c.message.startswith("Training checkpoint: step 2 "))
    # The whole schedule, resumed from the repo: stage 0 is done there, so only stage 1 trains.
    resumed = _trainer(tmp_path, "g", resume_from_checkpoint=REPO, push_to_hub=False)
    result = resumed.train()
    assert resumed.state.stage_results[0]["steps"] == 4 and result.global_step == 8
    assert [s.stage for s in result.stages] == [0, 1]
    # From the commit of the step-2 push: mid-stage 0, with the same weights as the first run had there.
    mid = _trainer(tmp_path, "h", resume_from_checkpoint=f"{REPO}@{step_2}", push_to_hub=False)
    mid.setup()
    assert (mid.state.global_step, mid.state.stage, mid.state.stage_step) == (2, 0, 2)


def test_hub_strategy_is_checked():
    from stackwise_hf.training import TrainingArguments

    with pytest.raises(ValueError, match="hub_strategy"):
        TrainingArguments(hub_strategy="checkpoint")
    assert TrainingArguments(output_dir="runs/demo/").resolved_hub_model_id == "demo"
