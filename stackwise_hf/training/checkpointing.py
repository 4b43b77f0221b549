"""Training checkpoints: crash-safe, verified, listed, rotated, and exact to resume.

`CheckpointManager` saves, lists, rotates and restores the checkpoints of one trainer;
`CheckpointingMixin` is the trainer's public checkpoint API. What a checkpoint directory holds, and how
it is verified, is `checkpoint_format`'s.

A checkpoint is known by its manifest: `path` in `list_checkpoints()` entries is `<dir>/manifest.json`,
and removing that file (as the guide's cleanup does with `os.remove(checkpoint['path'])`) retires the
checkpoint; a retired directory is deleted at the next save. Progress is never read from folder names.

Why not `accelerator.save_state` / `load_state` (accelerate 1.15), which the layout mirrors:
- the optimizer state it writes is keyed by parameter position, so a resume after the rack has grown
  (or after adapters were injected in another order) can hand a parameter another one's moments;
- every part but the model is a pickle (`optimizer.bin`, `scheduler.bin`, `random_states_<k>.pkl`).
  Those load with `weights_only=True` plus an allowlist of numpy globals, but the objects registered
  with `register_for_checkpointing` load with `weights_only=False` (`load_custom_state`), which runs
  arbitrary code from the file; and a random-state file that fails to load is skipped with an INFO
  log line, which silently breaks an exact resume;
- it re-saves every prepared model in full, beside the rack we save anyway.
So the same state is written here as safetensors (tensors) and JSON (everything else), through
`write_state` / `read_state`; nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import serialization
from ..errors import CheckpointError, CorruptFileError, ShapeMismatchError
from .checkpoint_format import (
    ACTIVATION_CACHE_DIR,
    CUSTOM_DIR,
    MANIFEST_NAME,
    PREFIX,
    RACK_DIR,
    RNG_DIR,
    RUN_STATE_NAME,
    TMP_SUFFIX,
    TRAINER_STATE_NAME,
    _NAME,
    CorruptCheckpointError,
    _fsync,
    _repoint,
    _seal,
    capture_rng,
    checkpoint_directory,
    load_optimizer,
    optimizer_param_names,
    read_state,
    restore_rng,
    save_optimizer,
    verify_checkpoint,
    write_state,
)
from .fsdp import gathered_optimizer_state, plain_copy, uses_fsdp
from .state import TrainerState

logger = logging.getLogger(__name__)


# The manager ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    """What a mid-stage checkpoint restores into the stage's run once the trainer rebuilds it."""

    directory: str
    stage: int
    run_state: dict


class CheckpointManager:
    """Saves, lists, verifies, rotates and restores the checkpoints of one `ProgressiveTrainer`.

    The trainer calls `after_setup` (resume), `restore_run` (end of `enter_stage`), `step_end` (after each
    optimizer step) and `stage_end` (in `exit_stage`); the public methods of `CheckpointingMixin` wrap the rest.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.pending: _Pending | None = None
        self.resumed_from: str | None = None
        self.schedule_origin: list[int] | None = None
        self.restored_origin: list[int] | None = None
        self.save_seconds = 0.0
        self.saves = 0
        self.last_saved: str | None = None
        self._verified: tuple[str, bool] | None = None

    @property
    def root(self) -> Path:
        return Path(self.trainer.args.resolved_checkpoint_dir)

    # Saving -----------------------------------------------------------------------------------------

    def save(self, kind: str, rack, run=None, optimizer=None, stack_idx: int | None = None, epoch=None, loss=None,
             activation_cache=None) -> str:
        """Writes one checkpoint (every process must call this); returns the path of its manifest."""
        started = time.perf_counter()
        trainer, accelerator = self.trainer, self.trainer.accelerator
        state = trainer.state
        state.log_history = list(trainer.run_log.history)
        root = self.root
        try:
            name = self._new_name(root, state.global_step) if accelerator.is_main_process else None
        except OSError as err:
            raise CheckpointError(f"{root}: cannot create the checkpoint directory ({err}).") from err
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            name = broadcast_object_list([name])[0]
        final, tmp = root / name, root / f"{name}{TMP_SUFFIX}"
        optimizer_state = None
        if run is not None and uses_fsdp(accelerator):  # mid-stage under FSDP: gather the shards (fsdp.py)
            rack = plain_copy(rack, run.module)
            optimizer_state = gathered_optimizer_state(optimizer if optimizer is not None else run.optimizer)
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._write_main_parts(tmp, rack, run, optimizer, activation_cache, optimizer_state)
            write_state(tmp / RNG_DIR, f"process_{accelerator.process_index}", capture_rng())
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                summary = self._summary(kind, rack, run, optimizer, stack_idx, epoch, loss, tmp)
                _seal(os.fspath(tmp), summary)
                os.replace(tmp, final)
                _fsync(os.fspath(root), directory=True)
                self._rotate(keep=final)
        except BaseException as err:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError) and not isinstance(err, CheckpointError):
                raise CheckpointError(
                    f"{final}: saving the checkpoint failed ({err}); earlier checkpoints are untouched."
                ) from err
            raise
        accelerator.wait_for_everyone()
        self.save_seconds += time.perf_counter() - started
        self.saves += 1
        self.last_saved = os.fspath(final / MANIFEST_NAME)
        logger.info("Saved %s checkpoint %s (step %d, stage %d).", kind, final, state.global_step, state.stage)
        return self.last_saved

    def _new_name(self, root: Path, global_step: int) -> str:
        root.mkdir(parents=True, exist_ok=True)
        name, k = f"{PREFIX}{global_step:08d}", 0
        while (root / name).exists():  # a manual save at the step of an automatic one
            k += 1
            name = f"{PREFIX}{global_step:08d}-{k}"
        return name

    def _write_main_parts(self, tmp: Path, rack, run, optimizer, activation_cache, optimizer_state=None) -> None:
        trainer, accelerator = self.trainer, self.trainer.accelerator
        rack.save_rack(tmp / RACK_DIR)
        (tmp / TRAINER_STATE_NAME).write_text(trainer.state.to_json(), encoding="utf-8")
        optimizer = optimizer if optimizer is not None else (run.optimizer if run is not None else None)
        if optimizer is not None:
            save_optimizer(optimizer, rack, tmp, state_dict=optimizer_state)
        if run is not None and run.scheduler is not None:
            write_state(tmp, "scheduler", run.scheduler.state_dict())
        if accelerator.scaler is not None:
            write_state(tmp, "scaler", accelerator.scaler.state_dict())
        for i, obj in enumerate(accelerator._custom_objects):
            write_state(tmp / CUSTOM_DIR, f"object_{i}", obj.state_dict())
        self._write_activation_cache(tmp, activation_cache)
        run_state = {
            "accelerator_step": accelerator.step,
            "num_processes": accelerator.num_processes,
            "seed": trainer.args.seed,
            "schedule_origin": self.schedule_origin,
            "stage_total_steps": run.total_steps if run is not None else None,
            "has_scheduler": run is not None and run.scheduler is not None,
            "custom_objects": len(accelerator._custom_objects),
        }
        (tmp / RUN_STATE_NAME).write_text(json.dumps(run_state, indent=1), encoding="utf-8")

    def _write_activation_cache(self, tmp: Path, activation_cache) -> None:
        trainer = self.trainer
        if activation_cache is None and trainer.args.save_activation_cache:
            cache = getattr(trainer, "trunk_cache", None)
            if cache is not None and getattr(cache, "fingerprint", None) is not None:
                activation_cache = cache
        if activation_cache is None:
            return
        target = tmp / ACTIVATION_CACHE_DIR
        if isinstance(activation_cache, Mapping):
            tensors = {str(k): v.detach().to("cpu").contiguous() for k, v in activation_cache.items()}
            target.mkdir()
            save_file(tensors, os.fspath(target / "activations.safetensors"), metadata={"format": "pt"})
            index = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                     for k, v in tensors.items()}
            (target / "index.json").write_text(json.dumps({"activations": index}, indent=1), encoding="utf-8")
        elif hasattr(activation_cache, "save"):
            activation_cache.save(target)
        else:
            raise TypeError(
                f"activation_cache must be a mapping of names to tensors or an object with `save(directory)` "
                f"(a TrunkCache); got {type(activation_cache).__name__}."
            )

    def _summary(self, kind, rack, run, optimizer, stack_idx, epoch, loss, tmp: Path) -> dict:
        state = self.trainer.state
        history = self.trainer.run_log.history
        if stack_idx is None:
            stack_idx = self._current_stack(rack, run)
        if loss is None:
            loss = next((r["loss"] for r in reversed(history) if r["kind"] == "train"), None)
        last_eval = next((r for r in reversed(history) if r["kind"] == "eval"), None)
        eval_loss = last_eval["loss"] if last_eval is not None and last_eval["step"] == state.global_step else None
        now = datetime.datetime.now(datetime.timezone.utc)
        return {
            "kind": kind, "global_step": state.global_step, "step": state.global_step, "stage": state.stage,
            "stage_entered": state.stage_entered, "stage_step": state.stage_step,
            "stack_idx": stack_idx, "epoch": state.epoch if epoch is None else epoch,
            "loss": None if loss is None else float(loss), "eval_loss": eval_loss,
            "timestamp": now.isoformat(), "time": now.timestamp(),
            "stack_sizes": list(rack.config.stack_sizes), "num_processes": self.trainer.accelerator.num_processes,
            "has_optimizer": (tmp / "optimizer.json").exists(),
            "has_activation_cache": (tmp / ACTIVATION_CACHE_DIR).exists(),
        }

    def _current_stack(self, rack, run) -> int:
        if run is not None:
            return run.stage.stack
        trainer, state = self.trainer, self.trainer.state
        schedule = trainer.schedule
        if schedule and state.stage_entered and state.stage < len(schedule):
            return schedule[state.stage].stack
        if schedule and not state.stage_entered and 0 < state.stage <= len(schedule):
            return schedule[state.stage - 1].stack
        return rack.num_stacks - 1

    # Automatic checkpoints (called by the trainer) ------------------------------------------------------

    def step_end(self, run) -> str | None:
        """Saves every `save_interval` optimizer steps; not on a stage's last step (`stage_end` saves then)."""
        interval = self.trainer.args.save_interval
        state = self.trainer.state
        if interval and state.global_step % interval == 0 and state.stage_step < run.total_steps:
            return self.save("interval", self.trainer.rack, run=run)
        return None

    def stage_end(self, run) -> str:
        """Saves at the end of every stage (the state's cursor already points at the next stage)."""
        return self.save("stage_end", self.trainer.rack, stack_idx=run.stage.stack)

    # Listing and rotation ------------------------------------------------------------------------------

    def scan(self, verify_hashes: bool = False) -> list[dict]:
        """Every `checkpoint-*` directory under the root: valid ones newest first, then invalid ones
        (with `valid: False` and `error`). Temporary directories of unfinished saves are not listed."""
        root = self.root
        valid, invalid = [], []
        if not root.is_dir():
            return []
        for entry in sorted(root.iterdir()):
            unfinished = entry.name.endswith(TMP_SUFFIX) and _NAME.match(entry.name.removesuffix(TMP_SUFFIX))
            if not entry.is_dir() or not (_NAME.match(entry.name) or unfinished):
                continue
            if unfinished:
                invalid.append({"path": os.fspath(entry / MANIFEST_NAME), "directory": os.fspath(entry), "valid": False,
                                "retired": False, "unfinished": True,
                                "error": f"{entry}: an unfinished save (interrupted, or still being written)."})
                continue
            try:
                manifest = verify_checkpoint(entry, hashes=verify_hashes)
            except CheckpointError as err:
                invalid.append({"path": os.fspath(entry / MANIFEST_NAME), "directory": os.fspath(entry), "valid": False,
                                "retired": not (entry / MANIFEST_NAME).exists(), "unfinished": False,
                                "error": str(err)})
                continue
            valid.append(_entry(entry, manifest))
        valid.sort(key=lambda e: (e["global_step"], e["time"] or 0.0), reverse=True)
        return valid + invalid

    def list(self, include_invalid: bool = False, verify_hashes: bool = False) -> list[dict]:
        entries = self.scan(verify_hashes)
        for entry in entries:
            if entry["valid"] or entry["retired"]:
                continue
            if entry["unfinished"]:
                logger.info("Skipping %s", entry["error"])
            else:
                logger.warning("Skipping checkpoint: %s", entry["error"])
        return entries if include_invalid else [e for e in entries if e["valid"]]

    def latest(self) -> str | None:
        """The newest checkpoint that passes full verification (hashes per `verify_checkpoint_hashes`);
        damaged ones are skipped with a warning that says why."""
        hashes = self.trainer.args.verify_checkpoint_hashes
        for entry in self.list():
            try:
                verify_checkpoint(entry["directory"], hashes=hashes)
            except CheckpointError as err:
                logger.warning("Skipping checkpoint: %s", err)
                continue
            self._verified = (entry["directory"], hashes)
            return entry["directory"]
        return None

    def _rotate(self, keep: Path) -> None:
        """Deletes retired checkpoints and leftovers of interrupted saves, then rotates to `save_total_limit`,
        never deleting the newest valid checkpoint or the best one by eval loss. Damaged ones are kept."""
        root = self.root
        for entry in root.iterdir():
            if entry.name.startswith(PREFIX) and entry.name.endswith(TMP_SUFFIX) and entry.is_dir():
                logger.info("Removing %s, left by an interrupted save.", entry)
                shutil.rmtree(entry, ignore_errors=True)
        entries = self.scan()
        for entry in entries:
            if not entry["valid"] and entry["retired"] and not entry["unfinished"]:
                logger.info("Removing retired checkpoint %s (its manifest was removed).", entry["directory"])
                shutil.rmtree(entry["directory"], ignore_errors=True)
        limit = self.trainer.args.save_total_limit
        valid = [e for e in entries if e["valid"]]
        if limit is None or len(valid) <= limit:
            return
        kept = {e["directory"] for e in valid[:limit]} | {valid[0]["directory"], os.fspath(keep)}
        scored = [e for e in valid if e["eval_loss"] is not None]
        if scored:
            kept.add(min(scored, key=lambda e: e["eval_loss"])["directory"])
        for entry in valid:
            if entry["directory"] not in kept:
                remove_checkpoint(entry["directory"])

    # Loading ---------------------------------------------------------------------------------------------

    def resolve(self, spec: str | os.PathLike) -> str | None:
        """A checkpoint directory for "latest" (None when there is none), a directory, a manifest path,
        or a Hub location "namespace/name[@revision][/folder]" (downloaded, then verified like a local one)."""
        if os.fspath(spec) == "latest":
            return self.latest()
        path = os.fspath(spec)
        directory = checkpoint_directory(path)
        if os.path.isdir(directory):
            return directory
        if not os.path.exists(path) and not os.path.isabs(path) and not path.startswith("."):
            from ..hub import resolve_checkpoint_location

            try:  # "namespace/name[@revision][/folder]": downloaded and verified against the Hub's hashes
                return resolve_checkpoint_location(path)
            except FileNotFoundError as err:
                raise CheckpointError(f"{path}: no such checkpoint ({err}).") from err
        raise CheckpointError(f"{path}: no such checkpoint (expected a checkpoint directory, its {MANIFEST_NAME}, "
                              f"'latest', or a Hub repo id).")

    def read(self, path, verify_hashes: bool | None = None) -> dict:
        """The checkpoint's data (`load_progressive_checkpoint`)."""
        hashes = self.trainer.args.verify_checkpoint_hashes if verify_hashes is None else verify_hashes
        directory = self.resolve(path)
        if directory is None:
            raise CheckpointError(f"no valid checkpoint in {self.root}.")
        manifest = verify_checkpoint(directory, hashes=hashes)
        state = _read_trainer_state(directory)
        with open(os.path.join(directory, RACK_DIR, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        data = {**_entry(Path(directory), manifest), "config": config, "trainer_state": dataclasses.asdict(state),
                "run_state": _read_json(directory, RUN_STATE_NAME), "files": sorted(manifest["files"])}
        index = activation_cache_index(directory)
        if index is not None:
            data["activation_cache"] = index
        return data

    def restore(self, path, rack, optimizer=None, map_location=None, verify_hashes: bool | None = None,
                for_schedule: bool = False) -> str:
        """Restores rack, adapters, trainer state, RNG, scaler and registered objects now; optimizer, scheduler,
        RNG again and Accelerate's step counter when the stage's run is rebuilt (mid-stage checkpoints).
        Returns the directory."""
        trainer, accelerator = self.trainer, self.trainer.accelerator
        hashes = trainer.args.verify_checkpoint_hashes if verify_hashes is None else verify_hashes
        directory = self.resolve(path)
        if directory is None:
            raise CheckpointError(f"no valid checkpoint in {self.root}.")
        if self._verified != (directory, hashes):  # `latest()` has just verified it
            verify_checkpoint(directory, hashes=hashes)
        self._verified = None
        state = _read_trainer_state(directory)
        run_state = _read_json(directory, RUN_STATE_NAME)
        with open(os.path.join(directory, RACK_DIR, "config.json"), encoding="utf-8") as f:
            saved_sizes = json.load(f).get("stack_sizes")
        if for_schedule:
            self._check_fits_schedule(directory, state, saved_sizes)
        if state.stage_entered and run_state["num_processes"] != accelerator.num_processes:
            raise CheckpointError(
                f"{directory}: written mid-stage by {run_state['num_processes']} process(es); this run has "
                f"{accelerator.num_processes}, so the data position and random streams would not line up. Resume "
                "with the same number of processes, or from a stage-end checkpoint."
            )
        if optimizer is not None:
            if not os.path.isfile(os.path.join(directory, "optimizer.json")):
                raise CheckpointError(f"{directory}: no optimizer state was saved in this checkpoint.")
            # Restoring adapters replaces their parameters: remember the optimizer's by name.
            optimized = optimizer_param_names(optimizer, rack)
        try:
            rack.load_rack(os.path.join(directory, RACK_DIR))
        except (ShapeMismatchError, CorruptFileError, FileNotFoundError, IndexError, ValueError) as err:
            raise CheckpointError(
                f"{directory}: the checkpoint's rack cannot be restored into this rack: {err}"
            ) from err
        if map_location is not None:
            rack.to(map_location)
        if optimizer is not None:
            _repoint(optimizer, rack, optimized, directory)
            load_optimizer(optimizer, rack, directory)
        trainer.rack = rack
        trainer.state = state
        trainer.run_log.history = list(state.log_history)
        self._rewrite_log()
        self._restore_rng(directory)
        self._restore_accelerator_objects(directory, run_state)
        self.pending = _Pending(directory, state.stage, run_state) if state.stage_entered else None
        self.restored_origin = run_state.get("schedule_origin")
        self.resumed_from = directory
        logger.info("Restored %s: stage %d (%s), global step %d.", directory, state.stage,
                    "mid-stage" if state.stage_entered else "at a stage boundary", state.global_step)
        return directory

    def _check_fits_schedule(self, directory: str, state: TrainerState, saved_sizes) -> None:
        schedule = self.trainer.schedule
        if state.stage > len(schedule) or (state.stage_entered and state.stage >= len(schedule)):
            raise CheckpointError(f"{directory}: its stage cursor ({state.stage}) is beyond this schedule's "
                                  f"{len(schedule)} stages.")
        if state.stage_entered:
            expected = list(schedule[state.stage].stack_sizes)
        elif state.stage > 0:
            expected = list(schedule[state.stage - 1].stack_sizes)
        else:
            expected = list(self.schedule_origin or [])
        if list(saved_sizes or []) != expected:
            raise CheckpointError(
                f"{directory}: its rack has stacks {saved_sizes}; at stage {state.stage} "
                f"({'inside' if state.stage_entered else 'before'} it) this schedule expects {expected}. "
                "The checkpoint belongs to another run or schedule."
            )

    def _restore_rng(self, directory: str) -> None:
        rank = self.trainer.accelerator.process_index
        stem = f"process_{rank}"
        rng_dir = os.path.join(directory, RNG_DIR)
        if not os.path.isfile(os.path.join(rng_dir, f"{stem}.json")):
            logger.warning("%s: no random-generator state for process %d; generators left as they are.",
                           directory, rank)
            return
        restore_rng(read_state(rng_dir, stem), os.path.join(rng_dir, f"{stem}.json"))

    def _restore_accelerator_objects(self, directory: str, run_state: dict) -> None:
        """The GradScaler (its scale carries across stages) and the objects registered with
        `accelerator.register_for_checkpointing`, in registration order."""
        accelerator = self.trainer.accelerator
        if accelerator.scaler is not None and os.path.isfile(os.path.join(directory, "scaler.json")):
            accelerator.scaler.load_state_dict(read_state(directory, "scaler"))
        saved, registered = run_state.get("custom_objects", 0), len(accelerator._custom_objects)
        if saved != registered:
            raise CheckpointError(f"{directory}: {saved} object(s) registered for checkpointing were saved; this run "
                                  f"registered {registered}.")
        for i, obj in enumerate(accelerator._custom_objects):
            obj.load_state_dict(read_state(os.path.join(directory, CUSTOM_DIR), f"object_{i}"))

    def _rewrite_log(self) -> None:
        run_log = self.trainer.run_log
        if self.trainer.accelerator.is_main_process:
            os.makedirs(os.path.dirname(run_log.path) or ".", exist_ok=True)
            with open(run_log.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in run_log.history)

    def after_setup(self) -> None:
        """End of `setup`: records the layout the schedule starts from, then resumes when asked to."""
        trainer = self.trainer
        if self.resumed_from is not None:
            # Restored before `train()` (restore_from_checkpoint): the schedule starts from the saved run's layout.
            if self.restored_origin is not None:
                from .schedule import resolve_schedule

                trainer.schedule = resolve_schedule(trainer.experiment.stages, self.restored_origin,
                                                    trainer.args.max_stacks)
                self.schedule_origin = list(self.restored_origin)
                state = trainer.state
                with open(os.path.join(self.resumed_from, RACK_DIR, "config.json"), encoding="utf-8") as f:
                    self._check_fits_schedule(self.resumed_from, state, json.load(f).get("stack_sizes"))
            return
        self.schedule_origin = list(trainer.rack.config.stack_sizes)
        spec = trainer.args.resume_from_checkpoint
        if not spec:
            return
        directory = self.resolve(spec)
        if directory is None:
            logger.warning("resume_from_checkpoint=%r: no valid checkpoint in %s; starting from scratch.",
                           spec, self.root)
            return
        self.restore(directory, trainer.rack, for_schedule=True)

    def restore_run(self, run) -> None:
        """End of `enter_stage` (or `train_rack`): puts a mid-stage checkpoint's optimizer, scheduler, RNG and
        Accelerate step counter into the rebuilt run."""
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        trainer, accelerator = self.trainer, self.trainer.accelerator
        if run.stage.index != pending.stage:
            logger.warning("%s: saved inside stage %d, but stage %d is starting; its optimizer state is not used.",
                           pending.directory, pending.stage, run.stage.index)
            return
        directory = pending.directory
        if not os.path.isfile(os.path.join(directory, "optimizer.json")):
            raise CheckpointError(f"{directory}: a mid-stage checkpoint without optimizer state cannot be resumed.")
        load_optimizer(run.optimizer, trainer.rack, directory)
        if pending.run_state.get("has_scheduler") and run.scheduler is not None:
            run.scheduler.load_state_dict(read_state(directory, "scheduler"))
        self._restore_rng(directory)
        accelerator.step = pending.run_state["accelerator_step"]
        if pending.run_state.get("stage_total_steps") not in (None, run.total_steps):
            logger.warning("%s: the stage was %d steps long when saved; it is now %d (the LR schedule follows the new "
                           "length).", directory, pending.run_state["stage_total_steps"], run.total_steps)
        history = trainer.run_log.history
        if history and history[-1]["kind"] == "stage_start" and history[-1].get("stage") == run.stage.index:
            history.pop()  # the stage started before the checkpoint; this is a resume, not a new start
        history.append({"kind": "resume", "step": trainer.state.global_step, "stage": run.stage.index,
                        "checkpoint": directory})
        self._rewrite_log()


def _entry(directory: Path, manifest: dict) -> dict:
    summary = manifest.get("summary") or {}
    return {
        "path": os.fspath(directory / MANIFEST_NAME),
        "directory": os.fspath(directory),
        "stack_idx": summary.get("stack_idx"),
        "epoch": summary.get("epoch"),
        "step": summary.get("global_step"),
        "global_step": summary.get("global_step"),
        "stage": summary.get("stage"),
        "stage_entered": summary.get("stage_entered"),
        "loss": summary.get("loss"),
        "eval_loss": summary.get("eval_loss"),
        "timestamp": summary.get("timestamp"),
        "time": summary.get("time"),
        "kind": summary.get("kind"),
        "stack_sizes": summary.get("stack_sizes"),
        "valid": True,
        "retired": False,
        "unfinished": False,
    }


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({err}).") from err


def _read_trainer_state(directory: str) -> TrainerState:
    path = os.path.join(directory, TRAINER_STATE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return TrainerState.from_json(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: not a valid trainer state ({err}).") from err


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Deletes a checkpoint: its manifest first (the checkpoint is then retired at once), then the files."""
    directory = checkpoint_directory(path)
    manifest = os.path.join(directory, MANIFEST_NAME)
    if os.path.exists(manifest):
        os.remove(manifest)
    shutil.rmtree(directory, ignore_errors=True)
    logger.info("Removed checkpoint %s.", directory)


def activation_cache_index(path: str | os.PathLike) -> dict | None:
    """The index of a checkpoint's activation cache (tensor names, shapes, dtypes, or the trunk cache's
    manifest), or None when the checkpoint has none."""
    directory = os.path.join(checkpoint_directory(path), ACTIVATION_CACHE_DIR)
    for name, key in (("index.json", "activations"), ("trunk_cache.json", None)):
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            data = _read_json(directory, name)
            return data[key] if key else data
    return None


def load_activation_cache(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The activation tensors saved with `save_progressive_checkpoint(..., activation_cache={...})`,
    loaded onto `map_location`."""
    file = os.path.join(checkpoint_directory(path), ACTIVATION_CACHE_DIR, "activations.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"{checkpoint_directory(path)}: no activation tensors saved in this checkpoint.")
    return serialization.load_tensors(file, device=map_location)


# The trainer's checkpoint API ------------------------------------------------------------------------------


class CheckpointingMixin:
    """Checkpoint methods of `ProgressiveTrainer`, under the original system's names.

    `rack_builder` arguments take the rack (a `StackWiseForCausalLM` or `StackWiseForMaskedLM`), which
    plays the role of the original `ProgressiveRackBuilder`. Methods that return `success` return True;
    every failure raises (`CheckpointError` and its subclass `CorruptCheckpointError` for bad checkpoints).
    In a multi-process run every process must call the saving and restoring methods.

    Example:

    ```python
    >>> trainer = ProgressiveTrainer(config=StackWiseConfig.from_yaml("config.yaml"))  # doctest: +SKIP
    >>> path = trainer.save_progressive_checkpoint(stack_idx=0, rack_builder=rack, epoch=1, loss=2.5)  # doctest: +SKIP
    >>> [c["step"] for c in trainer.list_checkpoints()]  # newest first  # doctest: +SKIP
    >>> trainer.restore_from_checkpoint(path, rack)  # doctest: +SKIP
    True
    ```
    """

    @property
    def checkpoints(self) -> CheckpointManager:
        manager = self.__dict__.get("_checkpoint_manager")
        if manager is None:
            manager = self.__dict__["_checkpoint_manager"] = CheckpointManager(self)
        return manager

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go (`training.checkpoint_dir`; default `<output_dir>/checkpoints`); settable."""
        return Path(self.args.resolved_checkpoint_dir)

    @checkpoint_dir.setter
    def checkpoint_dir(self, value: str | os.PathLike) -> None:
        self.args.checkpoint_dir = os.fspath(value)

    @property
    def save_interval(self) -> int | None:
        """Optimizer steps between automatic checkpoints (`training.save_interval`); None: stage ends only."""
        return self.args.save_interval

    @save_interval.setter
    def save_interval(self, value: int | None) -> None:
        from ..config_io import check_positive

        check_positive("save_interval", value, optional=True)
        self.args.save_interval = value

    def save_progressive_checkpoint(self, stack_idx: int, rack_builder, optimizer=None, epoch=None, loss=None, *,
                                    activation_cache=None) -> str:
        """Saves a checkpoint of the training run: the rack with its adapters, the trainer state, RNG states
        and, when given, `optimizer` (keyed by parameter name).

        Args:
            stack_idx (`int`): the stack being trained (recorded in the listing).
            rack_builder: the rack.
            optimizer (*optional*): an optimizer over the rack's parameters.
            epoch / loss (*optional*): recorded in the listing; default the trainer's epoch and last loss.
            activation_cache (*optional*): a mapping of names to tensors, or a `TrunkCache`.

        Returns:
            The path of the checkpoint's `manifest.json` (what `list_checkpoints` reports as `path`).
        """
        n = rack_builder.num_stacks
        if isinstance(stack_idx, bool) or not isinstance(stack_idx, int) or not 0 <= stack_idx < n:
            raise IndexError(f"stack_idx {stack_idx!r} is not a stack of this rack (valid: 0..{n - 1}).")
        return self.checkpoints.save("progressive", rack_builder, optimizer=optimizer, stack_idx=stack_idx,
                                     epoch=epoch, loss=loss, activation_cache=activation_cache)

    def save_rack_checkpoint(self, rack_builder, optimizer=None) -> str:
        """Saves a checkpoint of the whole rack (and `optimizer`, when given); returns its manifest path."""
        return self.checkpoints.save("rack", rack_builder, optimizer=optimizer, stack_idx=rack_builder.num_stacks - 1)

    def load_progressive_checkpoint(self, path: str | os.PathLike, *, verify_hashes: bool | None = None) -> dict:
        """Verifies a checkpoint and returns its data: `timestamp`, `stack_idx`, `epoch`, `step`, `loss`,
        `eval_loss`, `stage`, `config` (the rack's), `trainer_state`, `files`, and `activation_cache`
        (its index) when one was saved. `path` is a directory, its manifest, or "latest"."""
        return self.checkpoints.read(path, verify_hashes)

    def restore_from_checkpoint(self, checkpoint_path: str | os.PathLike, rack_builder, *, optimizer=None,
                                map_location: str | torch.device | None = None,
                                verify_hashes: bool | None = None) -> bool:
        """Restores a run: the rack in place (stack layout, weights, dtypes, adapters), the trainer state
        (stage cursor, steps, data position) and RNG states; the optimizer, LR scheduler, scaler and
        registered objects of a mid-stage checkpoint go into the stage's run when training continues
        (`train()` or `train_rack`). With `optimizer`, its state is restored at once, matched by name.

        Args:
            checkpoint_path: a checkpoint directory, its `manifest.json`, or "latest".
            rack_builder: the rack to restore into (its stack layout may differ; the architecture may not).
            map_location (*optional*): device to put the restored rack on (default: where it is).
            verify_hashes (*optional*): check sha256 of every file (default `training.verify_checkpoint_hashes`).

        Returns:
            True. Failures raise `CheckpointError` naming the checkpoint, file and problem.
        """
        self.checkpoints.restore(checkpoint_path, rack_builder, optimizer=optimizer, map_location=map_location,
                                 verify_hashes=verify_hashes, for_schedule=bool(self.schedule))
        return True

    def list_checkpoints(self, *, include_invalid: bool = False, verify_hashes: bool = False) -> list[dict]:
        """Checkpoints in `checkpoint_dir`, newest first: `path` (the manifest), `directory`, `stack_idx`,
        `epoch`, `step`, `loss`, `eval_loss`, `timestamp`, `stage`, `kind`. Incomplete or damaged ones are
        skipped with a warning that says why (or listed with `valid: False` and `error`)."""
        return self.checkpoints.list(include_invalid=include_invalid, verify_hashes=verify_hashes)

    def get_training_info(self) -> dict:
        """Where the run stands, its checkpointing settings, and its checkpoints."""
        state, manager = self.state, self.checkpoints
        entries = manager.list()
        rack = self.rack
        return {
            "global_step": state.global_step, "stage": state.stage, "stage_entered": state.stage_entered,
            "stage_step": state.stage_step, "epoch": state.epoch, "epoch_batches": state.epoch_batches,
            "tokens_seen": state.tokens_seen, "best_eval_loss": state.best_eval_loss,
            "num_stages": len(self.schedule), "stage_results": list(state.stage_results),
            "current_stacks": rack.num_stacks if rack is not None else None,
            "stack_sizes": list(rack.config.stack_sizes) if rack is not None else None,
            "checkpoint_dir": os.fspath(self.checkpoint_dir), "save_interval": self.save_interval,
            "save_total_limit": self.args.save_total_limit, "num_checkpoints": len(entries),
            "latest_checkpoint": entries[0]["path"] if entries else None, "resumed_from": manager.resumed_from,
            "checkpoints_saved": manager.saves, "checkpoint_seconds": manager.save_seconds,
            "num_processes": self.accelerator.num_processes,
        }
