"""Checkpointing and resume (stackwise_hf/training/checkpointing.py): the Checkpointing Guide's calls and
flows, the on-disk layout, rotation, exact resume (also after SIGKILL), damaged checkpoints, no pickle."""

import copy
import importlib.util
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from stackwise_hf import CheckpointError, ShapeMismatchError, StackWiseConfig, StackWiseForCausalLM
from stackwise_hf.adapters import add_stack_adapter
from stackwise_hf.training import ProgressiveTrainer, TrainerState
from stackwise_hf.training.checkpointing import (
    CorruptCheckpointError,
    activation_cache_index,
    load_activation_cache,
    load_optimizer,
    save_optimizer,
    verify_checkpoint,
)
from tiny import state_dicts_equal, synthetic_blocks

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("checkpoint_worker", ROOT / "tests/scripts/checkpoint_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

GUIDE_CONFIG = {
    "model": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "stack_sizes": [2]},
    "training": {"checkpoint_dir": "./checkpoints", "save_interval": 100, "steps_per_stage": 4,
                 "learning_rate": 3e-3, "report_to": "none", "plot": False, "logging_steps": 2},
}


def _weights(rack) -> dict:
    return {k: v.detach().clone() for k, v in rack.state_dict().items()}


def _worker_trainer(out, resume=False, **training):
    """The run `tests/scripts/checkpoint_worker.py` makes: 3 stages (append, then prepend with a LoRA
    adapter), gradient accumulation 2 over 3 micro-batches per epoch, eval every 4 steps, a checkpoint
    every 3 steps and at each stage end."""
    experiment = worker.experiment(str(out), "tiny", resume)
    for key, value in training.items():
        setattr(experiment.training, key, value)
    spec = worker.SIZES["tiny"]
    return ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(spec["blocks"], spec["length"]),
                              eval_dataset=synthetic_blocks(16, spec["length"], seed=1))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The SIGKILL test's run, started with the reference run so that its interpreter start-up overlaps the
    other tests: a thread kills it with SIGKILL inside its third save (step 8, the end of stage 0), after two
    complete checkpoints. `--save-delay` holds every save open for 0.4 s before its manifest."""
    out = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(out / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/checkpoint_worker.py"), str(out),
                                 "--save-delay", "0.4"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    state = {}

    def kill_inside_the_save():
        tmp, deadline = out / "checkpoints" / "checkpoint-00000008.tmp", time.monotonic() + 300
        while not tmp.is_dir():
            if proc.poll() is not None or time.monotonic() > deadline:
                state["error"] = f"no save to kill (exit {proc.poll()}): {(out / 'stderr.txt').read_text()[-3000:]}"
                break
            time.sleep(0.005)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    thread = threading.Thread(target=kill_inside_the_save, daemon=True)
    thread.start()
    yield SimpleNamespace(out=out, proc=proc, thread=thread, state=state)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, killed_run):
    """One uninterrupted run and its checkpoints; tests copy the checkpoints before touching them."""
    out = tmp_path_factory.mktemp("reference")
    trainer = _worker_trainer(out)
    result = trainer.train()
    return {"out": out, "trainer": trainer, "weights": _weights(trainer.rack), "result": result,
            "sha256": worker.weights_sha256(trainer.rack), "checkpoints": trainer.list_checkpoints()}


def _by_step(reference, step):
    return next(c for c in reference["checkpoints"] if c["step"] == step)


# The guide's flows, verbatim but for the import lines and the creation of the rack -------------------


@pytest.fixture
def guide_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(GUIDE_CONFIG))
    return tmp_path


def _dataloader():
    return DataLoader(synthetic_blocks(48), batch_size=8)


def test_guide_quick_start_and_loading(guide_dir):
    dataloader = _dataloader()

    from stackwise_hf import StackWiseForCausalLM as ProgressiveRackBuilder
    from stackwise_hf.training import ProgressiveTrainer
    from stackwise_hf import StackWiseConfig

    # Load configuration
    config = StackWiseConfig.from_yaml("config.yaml")

    # Create trainer and rack builder
    trainer = ProgressiveTrainer(config=config)
    rack_builder = ProgressiveRackBuilder(copy.deepcopy(config))

    # Add and train first stack
    stack1 = rack_builder.append_stack(n_blocks=2, precision="full")
    results1 = trainer.train_rack(rack_builder, dataloader, target_stacks=1)

    # Save progressive checkpoint
    checkpoint_path = trainer.save_progressive_checkpoint(
        stack_idx=0,
        rack_builder=rack_builder,
        epoch=1,
        loss=results1.get('final_loss', 0.5)
    )

    saved = _weights(rack_builder)
    # Continue training...
    stack2 = rack_builder.append_stack(n_blocks=2, precision="half")
    results2 = trainer.train_rack(rack_builder, dataloader, target_stacks=2)

    # Create new trainer and rack builder
    new_trainer = ProgressiveTrainer(config=config)
    new_rack_builder = ProgressiveRackBuilder(copy.deepcopy(config))

    # Add empty stack
    new_rack_builder.append_stack(n_blocks=2, precision="full")

    # Restore from checkpoint
    success = new_trainer.restore_from_checkpoint(checkpoint_path, new_rack_builder)

    if success:
        print("Successfully restored from checkpoint!")
        # Continue training...

    assert success is True and (stack1, stack2) == (1, 2)
    assert results1["final_loss"] < 4.6 and results2["steps"] == 4 and results2["stack"] == 1
    assert state_dicts_equal(_weights(new_rack_builder), saved)
    assert new_trainer.get_training_info()["global_step"] == 4
    assert [s["precision"] for s in rack_builder.get_rack_info()["stack_info"]] == ["full", "full", "half"]
    # The trained stack 1 changed; stack 0 (frozen in the second call) did not.
    after = _weights(rack_builder)
    assert all(torch.equal(after[k], saved[k]) for k in saved if ".stacks.0." in k)
    assert not all(torch.equal(after[k], saved[k]) for k in saved if ".stacks.1." in k)


def test_guide_method_sections(guide_dir, capsys):
    from stackwise_hf import StackWiseForCausalLM as ProgressiveRackBuilder
    from stackwise_hf.training import ProgressiveTrainer
    from stackwise_hf import StackWiseConfig

    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    rack_builder = ProgressiveRackBuilder(copy.deepcopy(config))
    rack_builder.append_stack(n_blocks=1, precision="bfloat16")
    optimizer = torch.optim.AdamW(rack_builder.parameters(), lr=1e-3)
    rack_builder(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()

    # Progressive Training Checkpoints
    checkpoint_path = trainer.save_progressive_checkpoint(
        stack_idx=0,                    # Current stack index
        rack_builder=rack_builder,      # Progressive rack builder
        optimizer=optimizer,            # Optional: optimizer state
        epoch=1,                       # Optional: epoch number
        loss=0.5                      # Optional: loss value
    )
    checkpoint_data = trainer.load_progressive_checkpoint(checkpoint_path)

    if checkpoint_data:
        print(f"Checkpoint from: {checkpoint_data['timestamp']}")
        print(f"Stack index: {checkpoint_data['stack_idx']}")
        print(f"Loss: {checkpoint_data['loss']}")
    assert (checkpoint_data["stack_idx"], checkpoint_data["epoch"], checkpoint_data["loss"]) == (0, 1, 0.5)
    assert {"timestamp", "step", "config", "trainer_state"} <= set(checkpoint_data)

    success = trainer.restore_from_checkpoint(
        checkpoint_path=checkpoint_path,
        rack_builder=rack_builder
    )
    assert success is True

    # Rack-level Checkpointing
    rack_path = rack_builder.save_rack("./checkpoints/complete_rack.pt")
    rack_checkpoint_path = trainer.save_rack_checkpoint(
        rack_builder=rack_builder,
        optimizer=optimizer  # Optional
    )
    success = rack_builder.load_rack("./checkpoints/complete_rack.pt")

    if success:
        print(f"Loaded rack with {rack_builder.current_stacks} stacks")

        # Get rack information
        rack_info = rack_builder.get_rack_info()
        print(f"Rack info: {rack_info}")
    assert "Loaded rack with 2 stacks" in capsys.readouterr().out

    # Stack-level Checkpointing
    stack_path = rack_builder.save_stack(
        stack_idx=0,
        path="./checkpoints/stack_0.pt"
    )
    success = rack_builder.load_stack(
        stack_idx=0,
        path="./checkpoints/stack_0.pt"
    )

    if success:
        stack_info = rack_builder.get_stack_info(0)
        print(f"Stack info: {stack_info}")
    assert success is True and os.path.isdir(stack_path) and os.path.isdir(rack_path)

    # Checkpoint Management (the rack and stack directories beside them are not checkpoints)
    checkpoints = trainer.list_checkpoints()

    for checkpoint in checkpoints:
        print(f"Path: {checkpoint['path']}")
        print(f"Stack: {checkpoint['stack_idx']}")
        print(f"Epoch: {checkpoint['epoch']}")
        print(f"Loss: {checkpoint['loss']}")
        print(f"Timestamp: {checkpoint['timestamp']}")
        print("---")
    assert [c["path"] for c in checkpoints] == [rack_checkpoint_path, checkpoint_path]

    # Checkpoint Information
    training_info = trainer.get_training_info()
    print(f"Training info: {training_info}")
    rack_info = rack_builder.get_rack_info()
    print(f"Rack info: {rack_info}")
    stack_info = rack_builder.get_stack_info(0)
    print(f"Stack 0 info: {stack_info}")
    assert training_info["num_checkpoints"] == 2 and training_info["latest_checkpoint"] == rack_checkpoint_path

    # Precision-aware Checkpointing
    rack_info = rack_builder.get_rack_info()
    for stack_info in rack_info['stack_info']:
        print(f"Stack {stack_info['stack_idx']}: {stack_info['precision']}")
    assert "Stack 1: bfloat16" in capsys.readouterr().out

    # Programmatic Configuration
    trainer.checkpoint_dir = Path("./my_checkpoints")
    trainer.save_interval = 50  # Save every 50 steps
    assert trainer.args.checkpoint_dir == "my_checkpoints" and trainer.args.save_interval == 50
    assert trainer.list_checkpoints() == []

    # Debug Information
    logging.basicConfig(level=logging.DEBUG)
    checkpoint_data = trainer.load_progressive_checkpoint(checkpoint_path)
    print(f"Checkpoint keys: {list(checkpoint_data.keys())}")


def test_guide_lora_activation_cache_and_restored_optimizer(guide_dir):
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    rack_builder = StackWiseForCausalLM(copy.deepcopy(config))
    rack_builder.append_stack(n_blocks=1)
    add_stack_adapter(rack_builder, 1, r=4, init_lora_weights=False)
    lora = {k: v.clone() for k, v in rack_builder.state_dict().items() if "lora_" in k}
    optimizer = torch.optim.AdamW([p for p in rack_builder.parameters() if p.requires_grad], lr=1e-2)
    rack_builder(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    activations = {"train": torch.randn(4, 8, 32), "eval": torch.randn(2, 8, 32)}

    # LoRA adapters are automatically included in checkpoints
    checkpoint_path = trainer.save_progressive_checkpoint(
        stack_idx=0,
        rack_builder=rack_builder,  # Includes LoRA adapter states
        optimizer=optimizer,
        activation_cache=activations,
    )
    checkpoint_data = trainer.load_progressive_checkpoint(checkpoint_path)

    if 'activation_cache' in checkpoint_data:
        # Activation cache is available
        activation_cache = checkpoint_data['activation_cache']
        print(f"Cached activations: {list(activation_cache.keys())}")
    assert activation_cache_index(checkpoint_path) == {"train": {"shape": [4, 8, 32], "dtype": "float32"},
                                                      "eval": {"shape": [2, 8, 32], "dtype": "float32"}}
    assert sorted(checkpoint_data["activation_cache"]) == ["eval", "train"]
    assert all(torch.equal(checkpoint_data["activation_cache"][k], activations[k]) for k in activations)
    loaded = load_activation_cache(checkpoint_path, map_location="cpu")
    assert all(torch.equal(loaded[k], activations[k]) for k in activations)

    # When loading, LoRA adapters are automatically restored (into a rack without them)
    fresh = StackWiseForCausalLM(copy.deepcopy(config))
    fresh_optimizer = None
    success = trainer.restore_from_checkpoint(checkpoint_path, fresh, map_location=torch.device("cpu"))
    assert success is True and fresh.get_stack_info(1)["adapters"] == ["stack_1"]
    assert state_dicts_equal(_weights(fresh), _weights(rack_builder))
    assert not all(torch.equal(lora[k], v) for k, v in fresh.state_dict().items() if "lora_" in k)  # trained values
    # The optimizer state comes back by parameter name, into an optimizer that lists them in another order.
    fresh_optimizer = torch.optim.AdamW(list(reversed([p for p in fresh.parameters() if p.requires_grad])), lr=1e-2)
    trainer.restore_from_checkpoint(checkpoint_path, fresh, optimizer=fresh_optimizer)
    names = {id(p): n for n, p in fresh.named_parameters()}
    old_names = {id(p): n for n, p in rack_builder.named_parameters()}
    restored = {names[id(p)]: s["exp_avg"] for p, s in fresh_optimizer.state.items()}
    original = {old_names[id(p)]: s["exp_avg"] for p, s in optimizer.state.items()}
    assert restored.keys() == original.keys() and all(torch.equal(restored[n], original[n]) for n in original)


def test_train_rack_resumes_inside_a_stack_bit_identically(guide_dir):
    config = StackWiseConfig.from_yaml("config.yaml")
    dataloader = DataLoader(synthetic_blocks(40), batch_size=8)  # 5 batches: the 6 steps wrap an epoch
    trainer = ProgressiveTrainer(config=config)
    trainer.save_interval = 2
    rack = StackWiseForCausalLM(copy.deepcopy(config))
    trainer.train_rack(rack, dataloader, target_stacks=1, max_steps=6)
    rack.append_stack(n_blocks=1)
    trainer.train_rack(rack, dataloader, target_stacks=2, max_steps=6)
    mid = next(c for c in trainer.list_checkpoints() if c["step"] == 10)  # 4 steps into stack 1
    assert (mid["stage"], mid["kind"]) == (1, "interval")

    resumed = ProgressiveTrainer(config=config)
    resumed.checkpoint_dir = "other"
    fresh = StackWiseForCausalLM(copy.deepcopy(config))
    assert resumed.restore_from_checkpoint(mid["path"], fresh) and fresh.current_stacks == 2
    result = resumed.train_rack(fresh, dataloader, target_stacks=2, max_steps=6)
    assert result["global_step"] == 12 and len(result["losses"]) == 2
    assert state_dicts_equal(_weights(fresh), _weights(rack))


def test_guide_best_practices(guide_dir, capsys):
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    trainer.args.save_total_limit = None  # the guide's own cleanup below does the rotation
    rack_builder = StackWiseForCausalLM(copy.deepcopy(config))
    dataloader = _dataloader()
    num_epochs, save_interval, current_stack, max_checkpoints = 4, 1, 0, 2

    # 1. Regular Checkpointing
    for epoch in range(num_epochs):
        # ... training code ...
        current_loss = trainer.train_rack(rack_builder, dataloader, target_stacks=1, max_steps=2)["final_loss"]

        if epoch % save_interval == 0:
            checkpoint_path = trainer.save_progressive_checkpoint(
                stack_idx=current_stack,
                rack_builder=rack_builder,
                epoch=epoch,
                loss=current_loss
            )

    # 2. Checkpoint Validation
    success = trainer.restore_from_checkpoint(checkpoint_path, rack_builder)

    if not success:
        print("Failed to restore from checkpoint!")
        # Handle error appropriately

    # 3. Checkpoint Cleanup
    checkpoints = trainer.list_checkpoints()
    assert [c["epoch"] for c in checkpoints if c["kind"] == "progressive"] == [3, 2, 1, 0]

    # Keep only recent checkpoints
    if len(checkpoints) > max_checkpoints:
        # Remove old checkpoints
        for old_checkpoint in checkpoints[max_checkpoints:]:
            os.remove(old_checkpoint['path'])

    assert [c["path"] for c in trainer.list_checkpoints()] == [c["path"] for c in checkpoints[:max_checkpoints]]
    # The retired directories are deleted by the next save.
    trainer.save_progressive_checkpoint(stack_idx=0, rack_builder=rack_builder)
    assert len(list(Path("checkpoints").iterdir())) == max_checkpoints + 1

    # 4. Error Handling
    trainer.checkpoint_dir = Path("config.yaml") / "not-a-directory"
    try:
        checkpoint_path = trainer.save_progressive_checkpoint(
            stack_idx=0,
            rack_builder=rack_builder
        )
        print(f"Checkpoint saved: {checkpoint_path}")
    except Exception as e:
        print(f"Failed to save checkpoint: {e}")
        # Handle error appropriately
    assert "Failed to save checkpoint" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="not-a-directory"):
        trainer.save_progressive_checkpoint(stack_idx=0, rack_builder=rack_builder)


class _Counter:
    """A stateful object of the user's, registered with `accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.state = {"calls": 0}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_objects_registered_with_accelerate_are_checkpointed_without_pickle(guide_dir):
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    counter = _Counter()
    trainer.register_for_checkpointing(counter)
    counter.state.update(calls=7, scale=torch.arange(3.0), window=(1, 2.5))
    rack = StackWiseForCausalLM(copy.deepcopy(config))
    path = trainer.save_progressive_checkpoint(0, rack)
    assert json.loads((Path(path).parent / "custom" / "object_0.json").read_text())["state"]["calls"] == 7
    counter.state = {"calls": 0}
    trainer.restore_from_checkpoint(path, rack)
    assert counter.state["calls"] == 7 and counter.state["window"] == (1, 2.5)
    assert torch.equal(counter.state["scale"], torch.arange(3.0))
    trainer.register_for_checkpointing(_Counter())
    with pytest.raises(CheckpointError, match="1 object.s. registered for checkpointing were saved; this run "
                                              "registered 2"):
        trainer.restore_from_checkpoint(path, rack)


def test_yaml_configures_checkpoint_dir_and_interval(guide_dir):
    trainer = ProgressiveTrainer(config=StackWiseConfig.from_yaml("config.yaml"))
    assert trainer.checkpoint_dir == Path("checkpoints") and trainer.save_interval == 100
    with pytest.raises(ValueError, match="save_interval"):
        trainer.save_interval = 0
    with pytest.raises(IndexError, match="stack_idx 5"):
        trainer.save_progressive_checkpoint(5, StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml")))


# Layout, automatic checkpoints, rotation -----------------------------------------------------------------


def test_automatic_checkpoints_layout_and_no_pickle(reference):
    # A checkpoint every 3 steps and at each stage end (8, 17, 24), never twice at one step.
    assert [c["step"] for c in reference["checkpoints"]] == [24, 21, 18, 17, 15, 12, 9, 8, 6, 3]
    assert [c["kind"] for c in reference["checkpoints"] if c["step"] in (8, 17, 24)] == ["stage_end"] * 3
    mid = Path(_by_step(reference, 21)["directory"])  # inside stage 2, after a prepend, with a LoRA adapter
    files = set(verify_checkpoint(mid)["files"])
    assert {"trainer_state.json", "run_state.json", "optimizer.json", "optimizer.safetensors", "scheduler.json",
            "rng/process_0.json", "rng/process_0.safetensors", "rack/config.json", "rack/model.safetensors.index.json",
            "rack/adapters/stackwise_adapters.json", "rack/adapters/stack_0/adapter_model.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pt", ".pth"))]
    state = TrainerState.from_json((mid / "trainer_state.json").read_text())
    assert (state.stage, state.stage_entered, state.stage_step, state.global_step) == (2, True, 4, 21)
    optimizer = json.loads((mid / "optimizer.json").read_text())["state"]["param_groups"]
    names = [n for group in optimizer for n in group["names"]]
    assert names and all(n.startswith("model.stacks.0.") and "lora_" in n for n in names)
    tensors = load_file(mid / "optimizer.safetensors")
    assert {f"/state/{names[0]}/exp_avg", f"/state/{names[0]}/exp_avg_sq", f"/state/{names[0]}/step"} <= set(tensors)
    end = Path(_by_step(reference, 17)["directory"])
    assert not (end / "optimizer.json").exists()  # the next stage starts with a fresh optimizer


def test_rotation_keeps_newest_and_best(tmp_path, caplog):
    trainer = ProgressiveTrainer(config=worker.experiment(str(tmp_path), "tiny", False))
    trainer.args.save_total_limit = 2
    rack = StackWiseForCausalLM(copy.deepcopy(trainer.experiment.model))
    paths = {}
    for step, eval_loss in [(1, 3.0), (2, 1.0), (3, 2.5), (4, 2.0), (5, 2.2), (6, None)]:
        trainer.state.global_step = step
        if eval_loss is not None:
            trainer.run_log.history.append({"kind": "eval", "step": step, "loss": eval_loss})
        paths[step] = trainer.save_checkpoint("interval", rack, stack_idx=0)  # an automatic checkpoint
        if step == 3:
            Path(paths[3]).with_name("trainer_state.json").write_text("{}")  # damaged: kept, never counted
    listed = trainer.list_checkpoints()
    assert [c["step"] for c in listed] == [6, 5, 2]  # the newest two and the best by eval loss
    assert "checkpoint-00000003: trainer_state.json is 2 bytes on disk" in caplog.text
    assert os.path.isdir(Path(paths[3]).parent) and not os.path.exists(Path(paths[4]).parent)


def test_rotation_never_deletes_explicit_saves(tmp_path):
    trainer = ProgressiveTrainer(config=worker.experiment(str(tmp_path), "tiny", False))
    trainer.args.save_total_limit = 1
    rack = StackWiseForCausalLM(copy.deepcopy(trainer.experiment.model))
    explicit = []
    for step in range(1, 7):
        trainer.state.global_step = step
        if step in (1, 2):
            explicit.append(trainer.save_progressive_checkpoint(0, rack))
        elif step == 3:
            explicit.append(trainer.save_rack_checkpoint(rack))
        else:
            trainer.save_checkpoint("interval" if step % 2 else "stage_end", rack, stack_idx=0)
    listed = trainer.list_checkpoints()
    assert [c["step"] for c in listed] == [6, 3, 2, 1]  # the guide's saves stay until the user removes them
    assert all(os.path.isfile(path) for path in explicit)


# Exact resume ----------------------------------------------------------------------------------------------


def _refuse_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("step", [12, 17, 21], ids=["mid-stage-after-append", "stage-end-before-prepend",
                                                  "mid-stage-after-prepend-with-adapter"])
def test_resume_is_bit_identical_and_never_unpickles(reference, tmp_path, monkeypatch, step):
    _refuse_unpickling(monkeypatch)
    checkpoint = _by_step(reference, step)
    trainer = _worker_trainer(tmp_path, resume_from_checkpoint=checkpoint["path"])
    result = trainer.train()
    assert trainer.get_training_info()["resumed_from"] == checkpoint["directory"]
    assert state_dicts_equal(_weights(trainer.rack), reference["weights"])
    assert result.global_step == 24
    assert [s.eval_loss for s in result.stages] == [s.eval_loss for s in reference["result"].stages]
    # The run log continues the interrupted one: the same records (train losses logged across the resume
    # average fewer steps), evaluations equal, and one record saying where it resumed.
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    history = reference["trainer"].run_log.history
    assert [(r["kind"], r["step"]) for r in log if r["kind"] != "resume"] == [(r["kind"], r["step"]) for r in history]
    assert [r for r in log if r["kind"] == "eval"] == [r for r in history if r["kind"] == "eval"]
    assert [r["step"] for r in log if r["kind"] == "resume"] == ([] if checkpoint["kind"] == "stage_end" else [step])


def test_restore_from_checkpoint_then_train_continues_the_schedule(reference, tmp_path):
    trainer = _worker_trainer(tmp_path)
    rack = StackWiseForCausalLM(copy.deepcopy(trainer.experiment.model))
    assert trainer.restore_from_checkpoint(_by_step(reference, 21)["path"], rack, map_location="cpu")
    assert trainer.state.global_step == 21 and rack.config.stack_sizes == [1, 1, 1]
    trainer.train()
    assert trainer.rack is rack and state_dicts_equal(_weights(rack), reference["weights"])


def test_sigkill_during_a_save_then_resume_is_bit_identical(reference, killed_run):
    """A run killed with SIGKILL while it writes a checkpoint, then resumed from the latest one, ends with
    the uninterrupted run's weights; the interrupted save leaves no damage and every checkpoint verifies."""
    killed_run.thread.join(timeout=300)
    assert "error" not in killed_run.state, killed_run.state.get("error")
    assert killed_run.proc.returncode == -signal.SIGKILL
    checkpoints = killed_run.out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "checkpoint-00000003", "checkpoint-00000006", "checkpoint-00000008.tmp"]
    trainer = _worker_trainer(killed_run.out, resume=True)
    unfinished = [c for c in trainer.list_checkpoints(include_invalid=True) if not c["valid"]]
    assert [(Path(c["directory"]).name, c["unfinished"]) for c in unfinished] == [("checkpoint-00000008.tmp", True)]
    trainer.train()
    assert trainer.get_training_info()["resumed_from"] == os.fspath(checkpoints / "checkpoint-00000006")
    assert worker.weights_sha256(trainer.rack) == reference["sha256"]
    assert not list(checkpoints.glob("*.tmp"))
    for directory in checkpoints.iterdir():
        verify_checkpoint(directory)


def test_cli_resume_latest_skips_a_damaged_checkpoint(tmp_path):
    from stackwise_hf.cli import main

    text = "\n\n".join(f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 5}." for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    config = {
        "model": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "stack_sizes": [1], "max_position_embeddings": 64},
        "data": {"dataset": str(tmp_path / "corpus.txt"), "tokenizer_vocab_size": 300, "block_size": 16,
                 "max_train_blocks": 48, "max_eval_blocks": 8, "cache_dir": str(tmp_path / "cache")},
        "training": {"per_device_train_batch_size": 8, "save_interval": 2, "save_total_limit": None,
                     "checkpoint_dir": str(tmp_path / "checkpoints"), "report_to": "none", "plot": False,
                     "logging_steps": 2},
        "stages": [{"max_steps": 3}, {"grow": "append", "n_blocks": 1, "max_steps": 3}],
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "exp.yaml"), "--output-dir", str(tmp_path / "a")]) == 0
    expected = load_file(tmp_path / "a" / "final" / "model-stack001.safetensors")
    newest = sorted((tmp_path / "checkpoints").iterdir())[-1]
    shard = newest / "rack" / "model-stack001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["train", "--config", str(tmp_path / "exp.yaml"), "--output-dir", str(tmp_path / "b"),
                 "--resume-from-checkpoint", "latest"]) == 0
    resumed = load_file(tmp_path / "b" / "final" / "model-stack001.safetensors")
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "resume"] == [4]  # the newest valid one: mid-stage 1


def test_resume_from_a_hub_repo(reference, hub_server, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo("run-checkpoint").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=_by_step(reference, 21)["directory"])
    trainer = _worker_trainer(tmp_path, resume_from_checkpoint=repo_id)
    trainer.train()
    assert state_dicts_equal(_weights(trainer.rack), reference["weights"])


# Damaged checkpoints --------------------------------------------------------------------------------------


def _truncate(directory: Path):
    shard = directory / "rack" / "model-stack000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _flip_byte(directory: Path):
    shard = directory / "rack" / "model-rack.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _drop_manifest(directory: Path):
    (directory / "manifest.json").unlink()


def _escape_path(directory: Path):
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["../../escape.txt"] = {"size": 1, "sha256": "0" * 64}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _link_out(directory: Path):
    config = directory / "rack" / "config.json"
    outside = directory.parent.parent / f"{directory.name}-config.json"
    outside.write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to(outside)


DAMAGE = {
    "truncated-shard": (_truncate, CorruptCheckpointError,
                        r"model-stack000.safetensors is \d+ bytes on disk; the manifest says"),
    "flipped-byte": (_flip_byte, CorruptCheckpointError, "model-rack.safetensors fails its sha256 check"),
    "missing-manifest": (_drop_manifest, CheckpointError, "no manifest.json, so the checkpoint is incomplete"),
    "path-escape": (_escape_path, CorruptCheckpointError, r"'../../escape.txt', a path outside the checkpoint"),
    "link-out": (_link_out, CorruptCheckpointError, r"rack/config.json' resolves to .*, outside the checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_fails_clearly_and_others_stay_usable(reference, tmp_path, kind, caplog):
    damage, error, message = DAMAGE[kind]
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference["out"] / "checkpoints", checkpoints)
    newest = checkpoints / "checkpoint-00000024"
    mid = checkpoints / "checkpoint-00000021"
    damage(mid)
    trainer = _worker_trainer(tmp_path, resume=True)
    with pytest.raises(error, match=message):
        trainer.load_progressive_checkpoint(mid)
    with pytest.raises(error, match=message):
        trainer.restore_from_checkpoint(mid, StackWiseForCausalLM(copy.deepcopy(trainer.experiment.model)))
    if kind == "flipped-byte":  # only the hash check sees it; it can be skipped for speed
        trainer.load_progressive_checkpoint(mid, verify_hashes=False)
    listed = [c["step"] for c in trainer.list_checkpoints(verify_hashes=True)]
    assert 21 not in listed and listed[:2] == [24, 18]
    if kind != "missing-manifest":
        assert f"Skipping checkpoint: {mid}" in caplog.text
    # "latest" skips the damaged one too: damage the newest as well, and step 18 is picked and restores.
    damage(newest)
    if kind == "flipped-byte":  # resuming from it ends where the uninterrupted run ended
        trainer.train()
        assert trainer.get_training_info()["resumed_from"] == os.fspath(checkpoints / "checkpoint-00000018")
        assert state_dicts_equal(_weights(trainer.rack), reference["weights"])
    else:
        assert trainer.checkpoints.latest() == os.fspath(checkpoints / "checkpoint-00000018")
        rack = StackWiseForCausalLM(copy.deepcopy(trainer.experiment.model))
        assert trainer.restore_from_checkpoint("latest", rack) and rack.config.stack_sizes == [1, 1, 1]
    assert not (tmp_path.parent / "escape.txt").exists()


def test_checkpoint_from_a_rack_of_another_shape(reference, tmp_path):
    checkpoint = _by_step(reference, 12)
    wider = StackWiseForCausalLM(StackWiseConfig(vocab_size=96, hidden_size=64, intermediate_size=64,
                                                 num_attention_heads=4, num_key_value_heads=2, stack_sizes=[1]))
    trainer = _worker_trainer(tmp_path)
    message = r"cannot be restored into this rack: .*`hidden_size` is 32; this rack has 64"
    with pytest.raises(CheckpointError, match=message) as err:
        trainer.restore_from_checkpoint(checkpoint["path"], wider)
    assert isinstance(err.value.__cause__, ShapeMismatchError)
    # A checkpoint of another schedule's layout is refused before the rack changes.
    other = _worker_trainer(tmp_path / "other", resume_from_checkpoint=checkpoint["path"])
    other.experiment.stages[1].n_blocks = 2
    with pytest.raises(CheckpointError, match=r"its rack has stacks \[1, 1\]; .* this schedule expects \[1, 2\]"):
        other.setup()
    assert other.rack.config.stack_sizes == [1]
    # The other checkpoints are untouched and still load.
    trainer.restore_from_checkpoint(checkpoint["path"], StackWiseForCausalLM(copy.deepcopy(trainer.experiment.model)))


def test_optimizer_state_is_matched_by_name(tmp_path):
    rack = StackWiseForCausalLM(StackWiseConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                num_attention_heads=2, stack_sizes=[1, 1]))
    params = dict(rack.named_parameters())
    first = ["model.stacks.1.blocks.0.mlp.up_proj.weight", "lm_head.weight"]
    optimizer = torch.optim.AdamW([params[n] for n in first], lr=0.1)
    rack(torch.arange(6)[None], labels=torch.arange(6)[None]).loss.backward()
    optimizer.step()
    save_optimizer(optimizer, rack, tmp_path)
    swapped = torch.optim.AdamW([params[n] for n in reversed(first)], lr=0.1)
    load_optimizer(swapped, rack, tmp_path)
    for name in first:
        assert torch.equal(swapped.state[params[name]]["exp_avg"], optimizer.state[params[name]]["exp_avg"])
    other = torch.optim.AdamW([params["model.stacks.0.blocks.0.mlp.up_proj.weight"], params["lm_head.weight"]])
    message = (r"not saved \['model.stacks.0.blocks.0.mlp.up_proj.weight'\], "
               r"saved but not optimized \['model.stacks.1.blocks.0.mlp.up_proj.weight'\]")
    with pytest.raises(CheckpointError, match=message):
        load_optimizer(other, rack, tmp_path)


def test_failed_save_leaves_earlier_checkpoints(tmp_path, monkeypatch):
    from stackwise_hf.training import checkpointing

    trainer = _worker_trainer(tmp_path)
    rack = StackWiseForCausalLM(copy.deepcopy(trainer.experiment.model))
    first = trainer.save_progressive_checkpoint(0, rack)
    trainer.state.global_step = 5

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "seal_checkpoint", disk_full)
    message = "saving the checkpoint failed .*No space left on device.*earlier checkpoints"
    with pytest.raises(CheckpointError, match=message):
        trainer.save_progressive_checkpoint(0, rack)
    assert [c["path"] for c in trainer.list_checkpoints()] == [first] and not list(trainer.checkpoint_dir.glob("*.tmp"))
    verify_checkpoint(first)


def test_train_rack_is_one_stage_of_the_trainer_loop_with_eval_and_trunk_cache(guide_dir):
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config, eval_dataset=synthetic_blocks(8, seed=1))
    rack = StackWiseForCausalLM(copy.deepcopy(config))
    dataloader = DataLoader(synthetic_blocks(24), batch_size=8)
    first = trainer.train_rack(rack, dataloader, target_stacks=1)
    assert first["eval_loss"] is not None and len(first["losses"]) == 4  # evaluated like a stage of train()
    rack.append_stack(n_blocks=1)
    trunk_before = {k: v.clone() for k, v in rack.state_dict().items() if k.startswith("model.stacks.0.")}
    second = trainer.train_rack(rack, dataloader, target_stacks=2, trunk_mode="cache")
    assert second["eval_loss"] is not None and trainer.trunk_cache is not None and trainer.trunk_cache.depth == 1
    assert all(torch.equal(rack.state_dict()[k], v) for k, v in trunk_before.items())  # the trunk stayed frozen
    path = trainer.save_progressive_checkpoint(stack_idx=1, rack_builder=rack)
    cache = trainer.load_progressive_checkpoint(path)["activation_cache"]
    assert sorted(cache) == ["eval", "train"]
    assert cache["train"].shape == (24, 16, 32)
    # The saved tensors are the frozen trunk's output over the dataloader's blocks; the cache ran them in other
    # batches, so float32 sums may differ in the last bits (hence the tolerance).
    with torch.no_grad():
        body = rack.base_model
        ids = torch.stack([row["input_ids"] for row in synthetic_blocks(24)])
        hidden = body.forward_stacks(body.embed_tokens(ids), 0, 1, **body.attention_inputs(body.embed_tokens(ids)))
    torch.testing.assert_close(cache["train"], hidden, rtol=1e-5, atol=1e-5)


def _manifest_damages():
    def edit(change):
        def apply(directory):
            manifest = json.loads((directory / "manifest.json").read_text())
            change(manifest)
            (directory / "manifest.json").write_text(json.dumps(manifest))
        return apply

    def raw(data):
        return lambda directory: (directory / "manifest.json").write_bytes(data)

    return {
        "not_utf8": raw(b"\xff\xfe\x00{"), "a_list": raw(b"[]"), "a_string": raw(b'"manifest"'),
        "summary_is_text": edit(lambda m: m.update(summary="x")),
        "step_is_text": edit(lambda m: m["summary"].update(global_step="12")),
        "files_is_a_list": edit(lambda m: m.update(files=[])),
        "entry_is_a_number": edit(lambda m: m["files"].update({next(iter(m["files"])): 1})),
        "version_is_text": edit(lambda m: m.update(format_version="1")),
        "version_is_true": edit(lambda m: m.update(format_version=True)),
        "unknown_version": edit(lambda m: m.update(format_version=99)),
        "path_outside": edit(lambda m: m["files"].update({"../x": {"size": 1, "sha256": "0"}})),
    }


@pytest.mark.parametrize("damage", sorted(_manifest_damages()))
def test_latest_skips_a_damaged_manifest_and_says_why(guide_dir, damage, caplog):
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    rack = StackWiseForCausalLM(copy.deepcopy(config))
    trainer.state.global_step = 1
    good = trainer.save_progressive_checkpoint(0, rack)
    trainer.state.global_step = 2
    bad = Path(trainer.save_progressive_checkpoint(0, rack)).parent
    _manifest_damages()[damage](bad)
    with caplog.at_level(logging.WARNING):
        assert [c["path"] for c in trainer.list_checkpoints()] == [good]
        assert trainer.checkpoints.resolve("latest") == str(Path(good).parent)
    assert f"Skipping checkpoint: {bad.resolve()}" in caplog.text
    if damage == "unknown_version":
        assert "format_version 99 found; this library supports [1]" in caplog.text


def test_a_damaged_rack_index_in_the_newest_checkpoint_is_skipped(guide_dir, caplog):
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    rack = StackWiseForCausalLM(copy.deepcopy(config))
    trainer.state.global_step = 1
    good = trainer.save_progressive_checkpoint(0, rack)
    trainer.state.global_step = 2
    bad = Path(trainer.save_progressive_checkpoint(0, rack)).parent
    index = bad / "rack" / "model.safetensors.index.json"
    index.write_bytes(b"\xff" * index.stat().st_size)  # same size: only the hash check can catch it
    assert trainer.checkpoints.resolve("latest") == str(Path(good).parent)
    assert f"{bad.resolve()}/rack/model.safetensors.index.json: not valid JSON" in caplog.text
