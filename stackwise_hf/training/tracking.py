"""Run logging: a JSON-lines log (always), Accelerate trackers (TensorBoard when installed), the
throughput of training (tokens/s, FLOP/s, model FLOP utilisation on CUDA), and the loss-per-stage plot."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time

import torch

from .flops import peak_flops

from ..layout import LOSS_PLOT_NAME

logger = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
PLOT_NAME = LOSS_PLOT_NAME


def resolve_trackers(report_to) -> list[str]:
    """Accelerate `log_with` names for `TrainingArguments.report_to`; "auto" means TensorBoard if installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") else []
    return names


class RunLog:
    """Appends records to `<output_dir>/log.jsonl`, forwards scalars to Accelerate's trackers, and
    keeps the history the plot is drawn from. Only the main process writes."""

    def __init__(self, accelerator, output_dir: str, history: list[dict] | None = None):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, LOG_NAME)
        self.history: list[dict] = list(history or [])
        if accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)

    def record(self, kind: str, step: int, **values) -> None:
        entry = {"kind": kind, "step": step, **values}
        self.history.append(entry)
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.accelerator.log(scalars, step=step)

    def replace_history(self, history: list[dict]) -> None:
        """Makes `history` the log (after a restore): the file is rewritten to hold exactly it."""
        self.history = list(history)
        if self.accelerator.is_main_process:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            os.replace(tmp, self.path)

    def plot(self, path: str) -> str | None:
        """Draws train and eval loss over global steps with stage boundaries marked; returns the path."""
        if not self.accelerator.is_main_process:
            return None
        return plot_losses(self.history, path)


class ThroughputMeter:
    """Training wall time (evaluation excluded) and the rates over the current logging window.

    `begin` starts the clock (a stage starts), `step_end` adds the time since the last step to
    `state.train_seconds`, `pause` drops the time since the last step (an evaluation ran), and `rates`
    gives tokens/s, FLOPs/s and, on CUDA with a known device, model FLOP utilisation: FLOPs/s over the
    bf16 dense peak of all processes' devices (`flops.BF16_PEAK_FLOPS`).
    """

    def __init__(self, device, num_processes: int = 1):
        device = torch.device(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        peak = peak_flops(name)
        self.peak = peak * num_processes if peak else None
        self._clock = time.perf_counter()
        self._window = (0, 0.0, 0.0)

    def begin(self, state) -> None:
        self._clock = time.perf_counter()
        self.start_window(state)

    def start_window(self, state) -> None:
        self._window = (state.tokens_seen, state.flops, state.train_seconds)

    def step_end(self, state) -> None:
        now = time.perf_counter()
        state.train_seconds += now - self._clock
        self._clock = now

    def pause(self) -> None:
        self._clock = time.perf_counter()

    def rates(self, state) -> dict:
        tokens, flops, seconds = self._window
        elapsed = state.train_seconds - seconds
        if elapsed <= 0:
            return {}
        rates = {"tokens_per_s": (state.tokens_seen - tokens) / elapsed, "flops_per_s": (state.flops - flops) / elapsed}
        if self.peak:
            rates["mfu"] = rates["flops_per_s"] / self.peak
        return rates


def plot_losses(history: list[dict], path: str) -> str | None:
    train = [(r["step"], r["loss"]) for r in history if r["kind"] == "train" and _finite(r.get("loss"))]
    evals = [(r["step"], r["loss"]) for r in history if r["kind"] == "eval" and _finite(r.get("loss"))]
    stages = [(r["step"], r.get("stage_name", "")) for r in history if r["kind"] == "stage_start"]
    if not train and not evals:
        return None
    # Imported here, not at the top: pyplot must come after `use("Agg")` (no display on servers), and
    # setting the backend at import time of this module would override the caller's choice.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    for step, name in stages:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.text(step, 1.0, f" {name}", rotation=90, va="top", ha="left", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Progressive training: loss per stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
