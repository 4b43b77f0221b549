"""Masked objectives: masked LM (BERT 80/10/10), masked diffusion, and "depth as time".

Every mask is a pure function of `(ObjectiveConfig.seed, split, sample_id, stage key, epoch)`: a CPU
`torch.Generator` is seeded from those numbers for each sample, so a block is masked the same way
after a resume, in any batch and on any number of processes. Training masks are drawn anew every epoch
(`resample_per_epoch`, on by default, as transformers' `DataCollatorForLanguageModeling` masks every
batch afresh), so a block seen twice teaches something new; evaluation masks never change. A stage in
`trunk_mode: cache` keeps epoch 0's masks throughout: the cache holds the frozen trunk's output over one
draw of masked inputs (`trunk_cache.py`), which is what lets it be reused and extended.

The stage key, and so what the cache can reuse across stages:

- "mlm" and "masked_diffusion" mask a block the same way in every stage (stage key 0), so the trunk's
  input is fixed for the whole run and a cache built at stage k is *extended* at stage k+1 by running
  only the newly frozen stack. `resample_per_stage: true` draws new masks at each stage instead
  (more variety; the cache is then rebuilt at each stage).
- "depth_as_time" changes the mask ratio from stage to stage, so the trunk sees different inputs at
  each stage and a cache is rebuilt, never extended, across such stages (the trunk cache detects this
  through `trunk_input_key` and logs it). Its masks are nested: position t of a block is masked at
  ratio r when the block's fixed uniform draw u_t < r, so a lighter stage masks a subset of what a
  heavier stage masks.

Depth as time: stack p of a rack of N stacks (0 = input side) trains at mask ratio r(p), highest on the
leftmost stack: the input end of the rack sees the noisiest text and each further stack denoises.
For the left-to-right (append) curriculum the first stage trains the leftmost stack at the heaviest
ratio; for right-to-left (prepend) each new stack becomes the leftmost, so each stage masks more than
the last. A stage's position p is its stack's index in the *final* rack of the resolved schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ..config_io import check_choice, dataclass_from_dict
from .clm import ObjectiveBatch, token_cross_entropy

LOSS_WEIGHTINGS = ("none", "inverse_ratio")
DEPTH_SCHEDULES = ("linear", "cosine", "list")

_TRAIN, _EVAL = 0, 1
_MASK64 = (1 << 64) - 1


@dataclass
class ObjectiveConfig:
    """Masking settings of the masked objectives (YAML section `objective:`; keys equal field names).

    Args:
        seed (`int`): seed of every mask; masks are a pure function of (seed, split, sample, stage key).
        mlm_probability (`float`): "mlm": fraction of positions selected for prediction.
        mask_replace_prob (`float`): "mlm": of the selected positions, the fraction replaced by the mask
            token (BERT: 0.8).
        random_replace_prob (`float`): "mlm": of the selected positions, the fraction replaced by a random
            token (BERT: 0.1); the rest keep their token. As `DataCollatorForLanguageModeling`.
        mask_ratio_range (`list[float]`): "masked_diffusion": each block's mask ratio is drawn uniformly
            from `[low, high]`, 0 < low <= high <= 1.
        loss_weighting (`str`): "none", or "inverse_ratio": each masked position's loss is weighted by
            1 / (its block's mask ratio), the masked-diffusion ELBO weighting. Training only: evaluation
            always reports the plain mean cross-entropy over masked positions.
        depth_schedule (`str`): "depth_as_time": how the ratio falls with depth, "linear" or "cosine"
            from `max_ratio` (leftmost stack) to `min_ratio` (rightmost), or "list" (`depth_ratios`).
        depth_ratios (`list[float]`, *optional*): "depth_as_time" with "list": one ratio per stack of the
            final rack, leftmost first.
        min_ratio (`float`): lightest ratio (rightmost stack) of the linear and cosine schedules.
        max_ratio (`float`): heaviest ratio (leftmost stack) of the linear and cosine schedules.
        resample_per_stage (`bool`): "mlm"/"masked_diffusion": draw fresh masks at each stage (the trunk
            cache is then rebuilt, not extended, at each stage).
        resample_per_epoch (`bool`): draw fresh training masks at every epoch (not in `trunk_mode: cache`
            stages, which keep the first epoch's); false masks a block the same way in every epoch.

    Every masked objective masks at least one position per block, so each block carries a loss.

    Example:

    ```python
    >>> from stackwise_hf.training.masking import ObjectiveConfig
    >>> config = ObjectiveConfig(depth_schedule="linear", min_ratio=0.2, max_ratio=0.8)
    >>> [round(r, 2) for r in config.depth_ratios_for(4)]
    [0.8, 0.6, 0.4, 0.2]
    ```
    """

    seed: int = 0
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    mask_ratio_range: list[float] = field(default_factory=lambda: [0.05, 1.0])
    loss_weighting: str = "none"
    depth_schedule: str = "linear"
    depth_ratios: list[float] | None = None
    min_ratio: float = 0.15
    max_ratio: float = 0.9
    resample_per_stage: bool = False
    resample_per_epoch: bool = True

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer; got {self.seed!r}.")
        _check_fraction("mlm_probability", self.mlm_probability, allow_zero=False)
        _check_fraction("mask_replace_prob", self.mask_replace_prob)
        _check_fraction("random_replace_prob", self.random_replace_prob)
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError(
                f"`mask_replace_prob` + `random_replace_prob` must be at most 1; got {self.mask_replace_prob!r} + "
                f"{self.random_replace_prob!r}."
            )
        rng = self.mask_ratio_range
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            raise ValueError(f"`mask_ratio_range` must be a pair [low, high]; got {rng!r}.")
        for bound in rng:
            _check_fraction("mask_ratio_range", bound, allow_zero=False)
        if rng[0] > rng[1]:
            raise ValueError(f"`mask_ratio_range` must have low <= high; got {list(rng)!r}.")
        self.mask_ratio_range = [float(rng[0]), float(rng[1])]
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_choice("depth_schedule", self.depth_schedule, DEPTH_SCHEDULES)
        _check_fraction("min_ratio", self.min_ratio, allow_zero=False)
        _check_fraction("max_ratio", self.max_ratio, allow_zero=False)
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"`min_ratio` ({self.min_ratio!r}) must not exceed `max_ratio` ({self.max_ratio!r}).")
        if self.depth_schedule == "list":
            if not isinstance(self.depth_ratios, (list, tuple)) or not self.depth_ratios:
                raise ValueError(
                    f"`depth_schedule: list` needs `depth_ratios`, one ratio per stack; got {self.depth_ratios!r}."
                )
            for ratio in self.depth_ratios:
                _check_fraction("depth_ratios", ratio, allow_zero=False)
            self.depth_ratios = [float(r) for r in self.depth_ratios]
        elif self.depth_ratios is not None:
            raise ValueError(
                f"`depth_ratios` is only used with `depth_schedule: list`; got depth_schedule={self.depth_schedule!r}."
            )
        for name in ("resample_per_stage", "resample_per_epoch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false; got {getattr(self, name)!r}.")

    @classmethod
    def from_dict(cls, values, where: str = "objective") -> "ObjectiveConfig":
        if isinstance(values, cls):
            return values
        return dataclass_from_dict(cls, values, where)

    def depth_ratios_for(self, num_stacks: int) -> list[float]:
        """The mask ratio of each stack of an `num_stacks`-stack rack, leftmost (heaviest) first."""
        if self.depth_schedule == "list":
            if len(self.depth_ratios) != num_stacks:
                raise ValueError(
                    f"`depth_ratios` has {len(self.depth_ratios)} ratio(s); the final rack has {num_stacks} stacks "
                    f"(one ratio per stack, leftmost first)."
                )
            return list(self.depth_ratios)
        ratios = []
        for p in range(num_stacks):
            s = p / (num_stacks - 1) if num_stacks > 1 else 0.0  # 0 at the input end, 1 at the output end
            fall = s if self.depth_schedule == "linear" else (1 - math.cos(math.pi * s)) / 2
            ratios.append(self.max_ratio - (self.max_ratio - self.min_ratio) * fall)
        return ratios

    def key(self) -> str:
        """Everything here that changes a mask, as text (part of the trunk cache's fingerprint)."""
        # Epoch 0's masks, which a cache holds, do not depend on `resample_per_epoch`.
        ignored = ("loss_weighting", "resample_per_epoch")
        return ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name not in ignored)


def _check_fraction(name: str, value, allow_zero: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 <= value <= 1)
    if not ok or (not allow_zero and value == 0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"`{name}` must be a number in {interval}; got {value!r}.")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_generator(seed: int, split: int, sample_id: int, stage_key: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of its arguments (epoch 0 draws what it always drew)."""
    x = 0
    for part in (seed, split, sample_id, stage_key) + ((epoch,) if epoch else ()):
        x = _splitmix64(x ^ (int(part) & _MASK64))
    return torch.Generator().manual_seed(x & ((1 << 63) - 1))


class _MaskedObjective:
    """Shared machinery: per-sample generators, labels at masked positions, loss without shift."""

    name = ""
    attention_mode = "bidirectional"
    loss_chunk_size: int | None = None  # set by the trainer: the head and loss run chunk by chunk

    def __init__(self, config=None, stage=None, num_stages: int | None = None, mask_token_id: int | None = None,
                 vocab_size: int | None = None, schedule=None):
        self.config = ObjectiveConfig.from_dict(config or {})
        self.stage = stage
        where = f"stage {stage.name}: " if stage is not None else ""
        if mask_token_id is None:
            raise ValueError(
                f"{where}objective {self.name!r} needs a mask token: the rack config's `mask_token_id` is None. "
                "Set `model.mask_token_id`, or use a tokenizer with a mask token (the bundled BPE has `<mask>`)."
            )
        if vocab_size is None or not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"{where}`mask_token_id` {mask_token_id!r} is outside the vocabulary of {vocab_size!r}.")
        if stage is not None and stage.config.mask_ratio is not None and self.name != "depth_as_time":
            raise ValueError(
                f"{where}`mask_ratio` ({stage.config.mask_ratio}) applies to objective 'depth_as_time' only; this "
                f"stage's objective is {self.name!r} (set `objective.mlm_probability` / `mask_ratio_range`)."
            )
        self.mask_token_id, self.vocab_size = int(mask_token_id), int(vocab_size)

    # What a subclass defines -----------------------------------------------------------------------

    def stage_key(self, stage_index: int) -> int:
        return stage_index if self.config.resample_per_stage else 0

    def mask_one(self, input_ids: torch.Tensor, generator: torch.Generator, stage_index: int):
        """(masked input ids, selected positions, per-position loss weight or None) for one block (T,)."""
        raise NotImplementedError

    def trunk_input_key(self, stage_index: int) -> str:
        """Everything besides the data that the trunk's input depends on at this stage."""
        return f"{self.name}:{self.config.key()}:stage_key={self.stage_key(stage_index)}"

    # The objective interface -------------------------------------------------------------------------

    def prepare(self, input_ids: torch.Tensor, stage_index: int, sample_ids=None, evaluation: bool = False,
                epoch: int = 0) -> ObjectiveBatch:
        """Masked inputs, labels at the masked positions and loss weights for a batch of blocks; training
        masks depend on `epoch` when `resample_per_epoch` is on, evaluation masks never do."""
        if sample_ids is None:
            raise ValueError(f"objective {self.name!r} needs `sample_ids` so that masks are deterministic per sample.")
        ids = input_ids.detach().cpu()
        sample_ids = torch.as_tensor(sample_ids).reshape(-1).tolist()
        split = _EVAL if evaluation else _TRAIN
        key = self.stage_key(stage_index)
        epoch = epoch if self.config.resample_per_epoch and not evaluation else 0
        masked, labels, weights = [], [], []
        for row, sample_id in zip(ids, sample_ids):
            generator = sample_generator(self.config.seed, split, sample_id, key, epoch)
            new, selected, weight = self.mask_one(row, generator, stage_index)
            masked.append(new)
            labels.append(torch.where(selected, row, torch.full_like(row, -100)))
            weights.append(weight)
        device = input_ids.device
        batch_weights = None
        if not evaluation and self.config.loss_weighting == "inverse_ratio":
            batch_weights = torch.stack(weights).to(device)
        return ObjectiveBatch(torch.stack(masked).to(device), torch.stack(labels).to(device), batch_weights)

    def loss(self, hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, weights=None):
        # hidden: (B, T, H); a masked position predicts its own token (no shift).
        return token_cross_entropy(hidden, head, labels, weights, self.loss_chunk_size)

    def _select(self, u: torch.Tensor, ratio: float) -> torch.Tensor:
        selected = u < ratio
        if not selected.any():  # every block carries a loss: mask its lowest draw
            selected[u.argmin()] = True
        return selected


class MaskedLMObjective(_MaskedObjective):
    """BERT-style masked LM: `mlm_probability` of the positions are selected; of those, 80% become the
    mask token, 10% a random token, 10% stay (`mask_replace_prob`, `random_replace_prob`). The loss is
    the cross-entropy at the selected positions only.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf.training.masking import MaskedLMObjective
    >>> objective = MaskedLMObjective({"mlm_probability": 0.5}, mask_token_id=2, vocab_size=50)
    >>> batch = objective.prepare(torch.arange(10, 30).reshape(2, 10), stage_index=0, sample_ids=[7, 8])
    >>> bool(((batch.labels != -100) | (batch.input_ids == torch.arange(10, 30).reshape(2, 10))).all())
    True
    ```
    """

    name = "mlm"

    def mask_one(self, input_ids, generator, stage_index):
        (length,) = input_ids.shape
        u = torch.rand(length, generator=generator)
        action = torch.rand(length, generator=generator)
        random_tokens = torch.randint(0, self.vocab_size, (length,), generator=generator, dtype=input_ids.dtype)
        selected = self._select(u, self.config.mlm_probability)
        to_mask = selected & (action < self.config.mask_replace_prob)
        to_random = selected & ~to_mask & (action < self.config.mask_replace_prob + self.config.random_replace_prob)
        out = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        out = torch.where(to_random, random_tokens, out)
        return out, selected, torch.full((length,), 1.0 / self.config.mlm_probability)


class MaskedDiffusionObjective(_MaskedObjective):
    """Absorbing-state masked diffusion (MDLM / LLaDA): each block draws a ratio t uniformly from
    `mask_ratio_range`, every position is replaced by the mask token with probability t, and the loss is
    the cross-entropy at masked positions, optionally weighted by 1/t (`loss_weighting: inverse_ratio`).
    """

    name = "masked_diffusion"

    def mask_one(self, input_ids, generator, stage_index):
        (length,) = input_ids.shape
        low, high = self.config.mask_ratio_range
        ratio = low + (high - low) * torch.rand((), generator=generator).item()
        selected = self._select(torch.rand(length, generator=generator), ratio)
        out = torch.where(selected, torch.full_like(input_ids, self.mask_token_id), input_ids)
        return out, selected, torch.full((length,), 1.0 / ratio)


class DepthAsTimeObjective(_MaskedObjective):
    """Masked diffusion whose noise level is the depth: the stage's stack trains at its own ratio r_k
    (`StageConfig.mask_ratio`, or the objective's depth schedule at the stack's position in the final
    rack, highest on the leftmost stack). Masks are nested across stages (see the module docstring)."""

    name = "depth_as_time"

    def __init__(self, config=None, stage=None, num_stages: int | None = None, mask_token_id: int | None = None,
                 vocab_size: int | None = None, schedule=None):
        super().__init__(config, stage, num_stages, mask_token_id, vocab_size, schedule)
        if stage is None:
            raise ValueError("objective 'depth_as_time' needs the `stage` it trains (a ResolvedStage).")
        self.position, self.final_stacks = final_position(stage, schedule)
        if stage.config.mask_ratio is not None:
            self.ratio = float(stage.config.mask_ratio)
        else:
            self.ratio = self.config.depth_ratios_for(self.final_stacks)[self.position]

    def stage_key(self, stage_index: int) -> int:
        return 0  # one draw per block; the ratio alone changes with the stage, so masks are nested

    def trunk_input_key(self, stage_index: int) -> str:
        return f"{self.name}:seed={self.config.seed}:ratio={self.ratio!r}"

    def mask_one(self, input_ids, generator, stage_index):
        (length,) = input_ids.shape
        selected = self._select(torch.rand(length, generator=generator), self.ratio)
        out = torch.where(selected, torch.full_like(input_ids, self.mask_token_id), input_ids)
        return out, selected, torch.full((length,), 1.0 / self.ratio)


def final_position(stage, schedule=None) -> tuple[int, int]:
    """(index of `stage`'s stack in the final rack, number of stacks of the final rack).

    A later "prepend" shifts every existing stack one place right; "append" shifts none. Without the
    full `schedule`, the stage's own layout is taken as final.
    """
    if not schedule:
        return stage.stack, len(stage.stack_sizes)
    later_prepends = sum(1 for s in schedule[stage.index + 1:] if s.config.grow == "prepend")
    return stage.stack + later_prepends, len(schedule[-1].stack_sizes)


def stage_mask_ratios(schedule, config=None) -> list[float | None]:
    """The mask ratio of every stage of a resolved schedule (None for stages not on "depth_as_time")."""
    objective_config = ObjectiveConfig.from_dict(config or {})
    ratios = []
    for stage in schedule:
        if stage.config.objective != "depth_as_time":
            ratios.append(None)
        elif stage.config.mask_ratio is not None:
            ratios.append(float(stage.config.mask_ratio))
        else:
            position, n = final_position(stage, schedule)
            ratios.append(objective_config.depth_ratios_for(n)[position])
    return ratios

