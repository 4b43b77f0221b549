"""Pushing a run to the Hub while it trains: checkpoints as they are written, the final rack at the end.

`TrainingArguments(push_to_hub=True, hub_model_id=..., hub_strategy=...)` makes the trainer hand each
checkpoint it writes, and the final rack, to a `HubSync`:

- "every_save": every checkpoint (interval, stage end, explicit saves) goes to `last-checkpoint/` in the repo;
- "stage_end": only stage-end checkpoints do;
- "end": no checkpoints;

and with every strategy the final rack (weights, adapters, tokenizer, card, loss plot) goes to the repo
root at the end. Pushes run on one background thread, so training does not wait for the network: a
checkpoint is first hard-linked into a staging folder (so that rotation may delete the original while it
uploads), and when a newer checkpoint arrives before an older one has started uploading, only the newer
one is pushed. A push that fails logs a warning and training goes on; the next save pushes again (the
folder then holds that newer checkpoint). `finish` waits for the pushes still queued.

Resuming: `resume_from_checkpoint="namespace/name"` or `"namespace/name@revision"` reads the
`last-checkpoint/` folder of that repo (revision: a branch or the commit of a push, for an older
checkpoint); `hub_checkpoint_location` does that mapping.

Like transformers' `Trainer` (whose `hub_strategy` this follows), pushing is done by the main process only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

from huggingface_hub import file_exists

from ..hub import push_checkpoint_to_hub, push_rack_folder_to_hub
from .arguments import HUB_STRATEGIES
from .checkpoint_format import MANIFEST_NAME

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = "last-checkpoint"  # transformers' Trainer uses the same folder name
_HUB_REPO = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+?)(?:@(?P<rev>[^/]+))?")


def hub_checkpoint_location(spec: str) -> str:
    """Maps "namespace/name[@revision]" to the checkpoint folder this module pushes to, when the repo
    has one there; any other spec (a directory, "latest", a location with a folder) is returned as is."""
    match = _HUB_REPO.fullmatch(spec)
    if match is None or os.path.exists(spec):
        return spec
    if file_exists(match["repo"], f"{CHECKPOINT_FOLDER}/{MANIFEST_NAME}", revision=match["rev"]):
        return f"{spec}/{CHECKPOINT_FOLDER}"
    return spec


@dataclass
class _Push:
    what: str  # for messages: "checkpoint step 40", "final rack"
    run: Callable[[], object]
    staging: str | None = None  # a staging folder, removed after the push whatever its outcome


class HubSync:
    """A background pusher for one run. Call from the main process only.

    Args:
        repo_id: the repo (created on the first push when missing).
        strategy: one of `HUB_STRATEGIES`.
        run_dir: the run's output directory (its `log.jsonl` and `loss.png` fill the model card).
        push_checkpoint / push_rack: the functions that push a folder; default `hub.push_checkpoint_to_hub`
            and `hub.push_rack_folder_to_hub`.
    """

    def __init__(self, repo_id: str, strategy: str, run_dir: str, *,
                 push_checkpoint=None, push_rack=None):
        if strategy not in HUB_STRATEGIES:
            raise ValueError(f"hub_strategy {strategy!r} is not supported; allowed are {list(HUB_STRATEGIES)}.")
        self.repo_id, self.strategy, self.run_dir = repo_id, strategy, run_dir
        self._push_checkpoint = push_checkpoint or push_checkpoint_to_hub
        self._push_rack = push_rack or push_rack_folder_to_hub
        self._pending: _Push | None = None  # the next checkpoint push; a newer one replaces it
        self._final: _Push | None = None
        self._condition = threading.Condition()
        self._closing = False
        self.pushed: list[str] = []  # what was pushed, in order
        self.failed: list[str] = []  # what failed to push (each also logged as a warning)
        self._thread = threading.Thread(target=self._work, name="stackwise-hub-sync", daemon=True)
        self._thread.start()

    def checkpoint_saved(self, directory: str, kind: str, step: int) -> None:
        """Queues a written checkpoint when the strategy pushes that kind; returns at once."""
        if self.strategy == "end" or (self.strategy == "stage_end" and kind != "stage_end"):
            return
        staging, copy = _stage(directory)
        push = _Push(f"checkpoint step {step}", lambda: self._push_checkpoint(
            copy, self.repo_id, path_in_repo=CHECKPOINT_FOLDER,
            commit_message=f"Training checkpoint: step {step} ({kind})"), staging)
        with self._condition:
            replaced, self._pending = self._pending, push
            self._condition.notify()
        if replaced is not None:
            logger.info("Hub push of %s superseded by %s before it started.", replaced.what, push.what)
            shutil.rmtree(replaced.staging, ignore_errors=True)

    def rack_saved(self, directory: str) -> None:
        """Queues the final rack folder (pushed after any queued checkpoint)."""
        push = _Push("final rack", lambda: self._push_rack(
            directory, self.repo_id, training_run=self.run_dir, commit_message="Final rack"))
        with self._condition:
            self._final = push
            self._condition.notify()

    def close(self) -> None:
        """Waits for the queued pushes to finish; logs where the run is on the Hub."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._thread.join()
        if self.pushed:
            logger.info("Pushed to the Hub repo %s: %s.", self.repo_id, ", ".join(self.pushed))

    def _next(self) -> _Push | None:
        with self._condition:
            while self._pending is None and self._final is None and not self._closing:
                self._condition.wait()
            if self._pending is not None:
                push, self._pending = self._pending, None
            else:
                push, self._final = self._final, None
            return push

    def _work(self) -> None:
        while (push := self._next()) is not None:
            try:
                push.run()
                self.pushed.append(push.what)
            except Exception as err:  # noqa: BLE001  any failure of a push must leave training running
                self.failed.append(push.what)
                retry = "the next save pushes again" if push.staging else \
                    f"push it with `stackwise push {self.run_dir}/final {self.repo_id}`"
                logger.warning("Pushing the %s to %s failed (%s: %s); training goes on, %s.", push.what,
                               self.repo_id, type(err).__name__, err, retry)
            finally:
                if push.staging:
                    shutil.rmtree(push.staging, ignore_errors=True)


def _stage(directory: str) -> tuple[str, str]:
    """A staging folder beside the checkpoint root, and in it a copy of the checkpoint made of hard links
    (plain copies across file systems), so the upload reads fixed files even if rotation deletes the
    checkpoint meanwhile. Returns (staging folder, copy)."""
    directory = os.path.normpath(directory)
    staging = tempfile.mkdtemp(prefix=".hub-push-", dir=os.path.dirname(os.path.dirname(directory)))
    copy = os.path.join(staging, os.path.basename(directory))
    shutil.copytree(directory, copy, copy_function=_link_or_copy)
    return staging, copy


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not supported there
        shutil.copy2(source, destination)
