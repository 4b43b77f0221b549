"""The objective registry: every training objective by the name a stage gives it (`StageConfig.objective`).

An objective has two jobs: `prepare(input_ids, stage_index, sample_ids, evaluation)` returns the model
inputs and labels for one batch (`clm.ObjectiveBatch`), and `loss(hidden, head, labels, weights)` turns
the final hidden states into a mean loss and the number of positions it was taken over. Its class
attribute `attention_mode` says which racks it trains ("causal" or "bidirectional").

A new objective: write the class (beside `clm.py` / `masking.py`), add it to `OBJECTIVES` below, and
give it the constructor keywords `ProgressiveTrainer` passes (`config`, `stage`, `num_stages`,
`schedule`, `mask_token_id`, `vocab_size`) if it is not causal. `StageConfig` accepts every name here.
"""

from __future__ import annotations

from .clm import CausalLMObjective, ObjectiveBatch, token_cross_entropy
from .masking import DepthAsTimeObjective, MaskedDiffusionObjective, MaskedLMObjective, ObjectiveConfig

OBJECTIVES = {
    "clm": CausalLMObjective,
    "mlm": MaskedLMObjective,
    "masked_diffusion": MaskedDiffusionObjective,
    "depth_as_time": DepthAsTimeObjective,
}

__all__ = ["OBJECTIVES", "CausalLMObjective", "ObjectiveBatch", "ObjectiveConfig", "build_objective",
           "token_cross_entropy", "attention_mode_of"]


def attention_mode_of(name: str) -> str:
    """"causal" or "bidirectional": the rack an objective trains."""
    return OBJECTIVES[name].attention_mode


def build_objective(name: str, **kwargs):
    """The objective called `name`, built with `kwargs` (none for "clm")."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is not available; known objectives are {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name](**kwargs)
