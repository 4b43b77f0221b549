"""Training checkpoints: crash-safe, verified, listed, rotated, and exact to resume.

`CheckpointManager` saves, lists, rotates and restores checkpoints, with explicit inputs and outputs: it
writes the `CheckpointContents` it is given and returns what it `Restored`; it never sees the trainer.
What a checkpoint directory holds, and how it is verified, is `checkpoint_format`'s. The guide's
checkpoint methods on the trainer are in `compat.py`.

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from .. import serialization
from ..hub import resolve_checkpoint_location
from ..errors import CheckpointError, CorruptFileError, ShapeMismatchError
from .checkpoint_format import (
    ACTIVATION_CACHE_DIR,
    CUSTOM_DIR,
    DATA_DIR,
    MANIFEST_NAME,
    PREFIX,
    RACK_DIR,
    RNG_DIR,
    RUN_STATE_NAME,
    TMP_SUFFIX,
    TRAINER_STATE_NAME,
    CHECKPOINT_NAME,
    CorruptCheckpointError,
    fsync_path,
    repoint_optimizer,
    seal_checkpoint,
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
from .state import TrainerState
from .trunk_cache import TrunkCache

logger = logging.getLogger(__name__)


# The manager ---------------------------------------------------------------------------------------------

ROTATED_KINDS = ("interval", "stage_end")  # the trainer's automatic checkpoints; explicit saves are never rotated


@dataclasses.dataclass
class CheckpointContents:
    """Everything one checkpoint holds; the trainer fills it in, `CheckpointManager.save` writes it.

    Args:
        kind: "interval" or "stage_end" (automatic, rotated), or "progressive" / "rack" (saved explicitly
            through the guide's API; kept until the user removes them).
        rack: the rack (plain weights: under FSDP, a gathered copy).
        state: the trainer state, its `log_history` filled in.
        stack_idx: the stack being trained (recorded in the listing).
        optimizer / scheduler / scaler: saved when given (the optimizer keyed by parameter name).
        optimizer_state: the optimizer's state dict when it is not `optimizer.state_dict()` (gathered shards).
        objects: objects registered for checkpointing (`state_dict` / `load_state_dict`), in order.
        data_position: this process's data position when it is its own (a streamed corpus,
            `streaming.TrainStream`): every process writes its `state_dict()`, as with the RNG states.
        activation_cache: a mapping of names to tensors, or an object with `save(directory)` (a `TrunkCache`).
        epoch / loss / eval_loss: recorded in the listing.
        run_state: resume bookkeeping (`accelerator_step`, `seed`, `schedule_origin`, `stage_total_steps`).
    """

    kind: str
    rack: object
    state: TrainerState
    stack_idx: int
    optimizer: object = None
    scheduler: object = None
    scaler: object = None
    optimizer_state: dict | None = None
    objects: Sequence = ()
    data_position: object = None
    activation_cache: object = None
    epoch: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    run_state: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Restored:
    """What `CheckpointManager.restore` put back, for the trainer to adopt: the checkpoint's directory,
    trainer state and resume bookkeeping, and the stack layout its rack was saved with."""

    directory: str
    state: TrainerState
    run_state: dict
    stack_sizes: list[int]

    @property
    def mid_stage(self) -> bool:
        return self.state.stage_entered


class CheckpointManager:
    """Saves, lists, verifies, rotates and restores checkpoints under `args.resolved_checkpoint_dir`.

    Inputs are explicit: `save` writes a `CheckpointContents`; `restore` puts a checkpoint's rack, RNG,
    scaler and registered objects back and returns a `Restored`; `restore_run` puts a mid-stage
    checkpoint's optimizer, scheduler and RNG into a rebuilt stage. The `Accelerator` is used for what
    it is (process rank and count, barriers); the `TrainingArguments` for the directory, rotation limit
    and hash checking, read at each call.
    """

    def __init__(self, args, accelerator):
        self.args = args
        self.accelerator = accelerator
        self.save_seconds = 0.0
        self.saves = 0
        self.last_saved: str | None = None
        self._verified: tuple[str, bool] | None = None

    @property
    def root(self) -> Path:
        return Path(self.args.resolved_checkpoint_dir)

    # Saving -----------------------------------------------------------------------------------------

    def save(self, contents: CheckpointContents) -> str:
        """Writes one checkpoint (every process must call this); returns the path of its manifest."""
        started = time.perf_counter()
        accelerator, root = self.accelerator, self.root
        try:
            name = self._new_name(root, contents.state.global_step) if accelerator.is_main_process else None
        except OSError as err:
            raise CheckpointError(f"{root}: cannot create the checkpoint directory ({err}).") from err
        if accelerator.num_processes > 1:
            name = broadcast_object_list([name])[0]
        final, tmp = root / name, root / f"{name}{TMP_SUFFIX}"
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._write_main_parts(tmp, contents)
            write_state(tmp / RNG_DIR, f"process_{accelerator.process_index}", capture_rng())
            if contents.data_position is not None:
                write_state(tmp / DATA_DIR, f"process_{accelerator.process_index}", contents.data_position.state_dict())
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                seal_checkpoint(os.fspath(tmp), self._summary(contents, tmp))
                os.replace(tmp, final)
                fsync_path(os.fspath(root), directory=True)
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
        logger.info("Saved %s checkpoint %s (step %d, stage %d).", contents.kind, final, contents.state.global_step,
                    contents.state.stage)
        return self.last_saved

    def _new_name(self, root: Path, global_step: int) -> str:
        root.mkdir(parents=True, exist_ok=True)
        name, k = f"{PREFIX}{global_step:08d}", 0
        while (root / name).exists():  # a manual save at the step of an automatic one
            k += 1
            name = f"{PREFIX}{global_step:08d}-{k}"
        return name

    def _write_main_parts(self, tmp: Path, contents: CheckpointContents) -> None:
        rack = contents.rack
        rack.save_rack(tmp / RACK_DIR)
        (tmp / TRAINER_STATE_NAME).write_text(contents.state.to_json(), encoding="utf-8")
        if contents.optimizer is not None:
            save_optimizer(contents.optimizer, rack, tmp, state_dict=contents.optimizer_state)
        if contents.scheduler is not None:
            write_state(tmp, "scheduler", contents.scheduler.state_dict())
        if contents.scaler is not None:
            write_state(tmp, "scaler", contents.scaler.state_dict())
        for i, obj in enumerate(contents.objects):
            write_state(tmp / CUSTOM_DIR, f"object_{i}", obj.state_dict())
        _write_activation_cache(tmp, contents.activation_cache)
        run_state = {
            "accelerator_step": 0, "seed": None, "schedule_origin": None, "stage_total_steps": None,
            **contents.run_state,
            "num_processes": self.accelerator.num_processes,
            "has_scheduler": contents.scheduler is not None,
            "custom_objects": len(contents.objects),
        }
        (tmp / RUN_STATE_NAME).write_text(json.dumps(run_state, indent=1), encoding="utf-8")

    def _summary(self, contents: CheckpointContents, tmp: Path) -> dict:
        state = contents.state
        now = datetime.datetime.now(datetime.timezone.utc)
        return {
            "kind": contents.kind, "global_step": state.global_step, "step": state.global_step, "stage": state.stage,
            "stage_entered": state.stage_entered, "stage_step": state.stage_step,
            "stack_idx": contents.stack_idx, "epoch": state.epoch if contents.epoch is None else contents.epoch,
            "loss": None if contents.loss is None else float(contents.loss), "eval_loss": contents.eval_loss,
            "timestamp": now.isoformat(), "time": now.timestamp(),
            "stack_sizes": list(contents.rack.config.stack_sizes), "num_processes": self.accelerator.num_processes,
            "has_optimizer": (tmp / "optimizer.json").exists(),
            "has_activation_cache": (tmp / ACTIVATION_CACHE_DIR).exists(),
        }

    # Listing and rotation ------------------------------------------------------------------------------

    def scan(self, verify_hashes: bool = False) -> list[dict]:
        """Every `checkpoint-*` directory under the root: valid ones newest first, then invalid ones
        (with `valid: False` and `error`). Temporary directories of unfinished saves are not listed."""
        root = self.root
        valid, invalid = [], []
        if not root.is_dir():
            return []
        for entry in sorted(root.iterdir()):
            unfinished = entry.name.endswith(TMP_SUFFIX) and CHECKPOINT_NAME.match(entry.name.removesuffix(TMP_SUFFIX))
            if not entry.is_dir() or not (CHECKPOINT_NAME.match(entry.name) or unfinished):
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
        hashes = self.args.verify_checkpoint_hashes
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
        """Deletes retired checkpoints and leftovers of interrupted saves, then rotates the automatic
        checkpoints (`ROTATED_KINDS`) to `save_total_limit`. Never deleted: the newest valid checkpoint, the
        best one by eval loss, the one just written, checkpoints saved explicitly, damaged ones."""
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
        limit = self.args.save_total_limit
        valid = [e for e in entries if e["valid"]]
        rotated = [e for e in valid if e["kind"] in ROTATED_KINDS]
        if limit is None or len(rotated) <= limit:
            return
        # `keep` was sealed a moment ago, so it is verified; any newer valid one is kept too (valid[0]): the
        # newest verified checkpoint is never among those deleted.
        kept = {e["directory"] for e in rotated[:limit]} | {valid[0]["directory"], os.fspath(keep)}
        scored = [e for e in valid if e["eval_loss"] is not None]
        if scored:
            kept.add(min(scored, key=lambda e: e["eval_loss"])["directory"])
        for entry in rotated:
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
            try:  # "namespace/name[@revision][/folder]": downloaded and verified against the Hub's hashes
                return resolve_checkpoint_location(path)
            except FileNotFoundError as err:
                raise CheckpointError(f"{path}: no such checkpoint ({err}).") from err
        raise CheckpointError(f"{path}: no such checkpoint (expected a checkpoint directory, its {MANIFEST_NAME}, "
                              f"'latest', or a Hub repo id).")

    def read(self, path, verify_hashes: bool | None = None) -> dict:
        """A verified checkpoint's listing entry plus `config` (the rack's), `trainer_state`, `run_state`,
        `files` and, when one was saved, `activation_cache` (tensors by name, read lazily)."""
        hashes = self.args.verify_checkpoint_hashes if verify_hashes is None else verify_hashes
        directory = self.resolve(path)
        if directory is None:
            raise CheckpointError(f"no valid checkpoint in {self.root}.")
        manifest = verify_checkpoint(directory, hashes=hashes)
        state = _read_trainer_state(directory)
        with open(os.path.join(directory, RACK_DIR, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        data = {**_entry(Path(directory), manifest), "config": config, "trainer_state": dataclasses.asdict(state),
                "run_state": _read_json(directory, RUN_STATE_NAME), "files": sorted(manifest["files"])}
        activations = activation_tensors(directory)
        if activations is not None:
            data["activation_cache"] = activations
        return data

    def restore(self, path, rack, *, optimizer=None, map_location=None, verify_hashes: bool | None = None,
                objects: Sequence = (), scaler=None, accept=None) -> Restored:
        """Verifies a checkpoint and puts back, now: the rack in place (stack layout, weights, dtypes,
        adapters), this process's RNG states, the scaler and the `objects` registered for checkpointing,
        and with `optimizer` its state (matched by name). Returns what the trainer adopts (`Restored`).
        `accept(restored)`, when given, may refuse the checkpoint (by raising) before anything changes."""
        hashes = self.args.verify_checkpoint_hashes if verify_hashes is None else verify_hashes
        directory = self.resolve(path)
        if directory is None:
            raise CheckpointError(f"no valid checkpoint in {self.root}.")
        if self._verified != (directory, hashes):  # `latest()` has just verified it
            verify_checkpoint(directory, hashes=hashes)
        self._verified = None
        state = _read_trainer_state(directory)
        run_state = _read_json(directory, RUN_STATE_NAME)
        saved_sizes = _read_json(os.path.join(directory, RACK_DIR), "config.json").get("stack_sizes")
        restored = Restored(directory, state, run_state, list(saved_sizes or []))
        if accept is not None:
            accept(restored)
        if state.stage_entered and run_state["num_processes"] != self.accelerator.num_processes:
            raise CheckpointError(
                f"{directory}: written mid-stage by {run_state['num_processes']} process(es); this run has "
                f"{self.accelerator.num_processes}, so the data position and random streams would not line up. "
                "Resume with the same number of processes, or from a stage-end checkpoint."
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
            repoint_optimizer(optimizer, rack, optimized, directory)
            load_optimizer(optimizer, rack, directory)
        self._restore_rng(directory)
        self._restore_objects(directory, run_state, objects, scaler)
        logger.info("Restored %s: stage %d (%s), global step %d.", directory, state.stage,
                    "mid-stage" if state.stage_entered else "at a stage boundary", state.global_step)
        return restored

    def restore_run(self, restored: Restored, optimizer, scheduler, rack) -> None:
        """Puts a mid-stage checkpoint's optimizer, LR scheduler and RNG states into the stage's rebuilt
        objects (the RNG again: building the stage drew from it)."""
        directory = restored.directory
        if not os.path.isfile(os.path.join(directory, "optimizer.json")):
            raise CheckpointError(f"{directory}: a mid-stage checkpoint without optimizer state cannot be resumed.")
        load_optimizer(optimizer, rack, directory)
        if restored.run_state.get("has_scheduler") and scheduler is not None:
            scheduler.load_state_dict(read_state(directory, "scheduler"))
        self._restore_rng(directory)

    def restore_data_position(self, directory: str, data_position) -> None:
        """Puts this process's saved data position into `data_position` (a `streaming.TrainStream`; None for
        in-memory data, whose position is the trainer state's epoch and batch count).

        Raises:
            CheckpointError: if the checkpoint and the run disagree on streaming, or the position does not
                fit the stream (another process layout or block size).
        """
        stem = f"process_{self.accelerator.process_index}"
        saved = os.path.isfile(os.path.join(directory, DATA_DIR, f"{stem}.json"))
        if data_position is None:
            if saved:
                raise CheckpointError(f"{directory}: written by a run that streamed its corpus (data.streaming: true); "
                                      "this run holds its data in memory. Resume with the same data settings.")
            return
        if not saved:
            raise CheckpointError(f"{directory}: holds no streamed-data position for process "
                                  f"{self.accelerator.process_index} (written by a run with in-memory data, or with "
                                  "fewer processes); a streamed run cannot resume exactly from it.")
        try:
            data_position.load_state_dict(read_state(os.path.join(directory, DATA_DIR), stem))
        except (ValueError, KeyError) as err:  # streaming.StreamStateError is a ValueError
            raise CheckpointError(f"{directory}: its streamed-data position does not fit this run: {err}") from err

    def _restore_rng(self, directory: str) -> None:
        rank = self.accelerator.process_index
        stem = f"process_{rank}"
        rng_dir = os.path.join(directory, RNG_DIR)
        if not os.path.isfile(os.path.join(rng_dir, f"{stem}.json")):
            logger.warning("%s: no random-generator state for process %d; generators left as they are.",
                           directory, rank)
            return
        restore_rng(read_state(rng_dir, stem), os.path.join(rng_dir, f"{stem}.json"))

    def _restore_objects(self, directory: str, run_state: dict, objects: Sequence, scaler) -> None:
        """The GradScaler (its scale carries across stages) and the objects registered for checkpointing,
        in registration order."""
        if scaler is not None and os.path.isfile(os.path.join(directory, "scaler.json")):
            scaler.load_state_dict(read_state(directory, "scaler"))
        saved, registered = run_state.get("custom_objects", 0), len(objects)
        if saved != registered:
            raise CheckpointError(f"{directory}: {saved} object(s) registered for checkpointing were saved; this run "
                                  f"registered {registered}.")
        for i, obj in enumerate(objects):
            obj.load_state_dict(read_state(os.path.join(directory, CUSTOM_DIR), f"object_{i}"))


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


def _write_activation_cache(tmp: Path, activation_cache) -> None:
    if activation_cache is None:
        return
    target = tmp / ACTIVATION_CACHE_DIR
    if isinstance(activation_cache, Mapping):
        tensors = {str(k): v.detach().to("cpu").contiguous() for k, v in activation_cache.items()}
        target.mkdir()
        save_file(tensors, os.fspath(target / "activations.safetensors"), metadata={"format": "pt"})
        index = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}
        (target / "index.json").write_text(json.dumps({"activations": index}, indent=1), encoding="utf-8")
    elif hasattr(activation_cache, "save"):
        activation_cache.save(target)
    else:
        raise TypeError(
            f"activation_cache must be a mapping of names to tensors or an object with `save(directory)` "
            f"(a TrunkCache); got {type(activation_cache).__name__}."
        )


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


class ActivationTensors(Mapping):
    """The activation tensors of a checkpoint by name, each read from disk when first asked for: the
    tensors saved with `activation_cache={...}`, or the splits ("train", "eval") of a saved trunk cache."""

    def __init__(self, directory: str, map_location: str | torch.device = "cpu"):
        self.directory, self.map_location = directory, map_location
        self._loaded: dict[str, torch.Tensor] = {}
        tensors_file = os.path.join(directory, "activations.safetensors")
        if os.path.isfile(tensors_file):
            self._trunk_cache = None
            self._names = list(_read_json(directory, "index.json")["activations"])
        else:
            self._trunk_cache = TrunkCache.load(directory)
            self._names = self._trunk_cache.splits

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            if self._trunk_cache is not None:
                tensor = self._trunk_cache.split_tensor(name).to(self.map_location)
            else:
                file = os.path.join(self.directory, "activations.safetensors")
                tensor = serialization.load_tensors(file, [name], device=self.map_location)[name]
            self._loaded[name] = tensor
        return self._loaded[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def activation_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ActivationTensors | None:
    """The checkpoint's activation tensors as a lazy mapping, or None when it saved none."""
    directory = os.path.join(checkpoint_directory(path), ACTIVATION_CACHE_DIR)
    return ActivationTensors(directory, map_location) if os.path.isdir(directory) else None


def load_activation_cache(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The activation tensors saved with `save_progressive_checkpoint(..., activation_cache={...})`,
    loaded onto `map_location`."""
    file = os.path.join(checkpoint_directory(path), ACTIVATION_CACHE_DIR, "activations.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"{checkpoint_directory(path)}: no activation tensors saved in this checkpoint.")
    return serialization.load_tensors(file, device=map_location)
