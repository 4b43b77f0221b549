"""Memory planner: the peak device memory each stage of a schedule needs, before anything is built.

For every stage of an experiment (`resolve_schedule` replays its growth), the planner predicts the
peak bytes the training step holds on the device, broken into

- `frozen_weights`: stacks, embeddings and head that do not train but sit on the device (in their
  dtype, or their quantized size);
- `trained_weights`, `gradients`, `optimizer_state`: the trained parameters, their gradients (same
  dtype) and AdamW's two moments (same dtype: `torch.optim.AdamW` keeps them like the parameter);
- `activations`: tensors saved for backward by the stacks gradients flow through, the bf16 copies
  autocast makes of fp32 weights, and the inputs;
- `logits_loss`: the head and cross-entropy's working set (full logits, or one chunk of them with
  `loss_chunk_size`);
- `cache_buffers`: in cache mode, the batch of cached hidden states on the device; on CUDA also the
  cuBLAS workspaces the caching allocator counts (`PlanSettings.workspace`).

The activation terms count, op by op, what the autograd graph of `modeling_stackwise.py` saves (see
`_block_saved_bytes`), and were checked against the bytes seen by `saved_tensors_hooks`; the whole
step is checked against measured peaks by `bench/planner_check.py` (on CPU through `MemoryMeter`, on
CUDA through `torch.cuda.max_memory_allocated`). A step goes through phases, and the peak is the
largest of them:

    trunk     the frozen prefix under no_grad (recompute mode): one block's working set
    extend    cache mode, when the cache grows: one trunk stack brought to the device
    loss      end of the forward pass: every saved activation plus the loss working set
    backward  walking back through the trained blocks: gradients grow as activations are freed
    optimizer all gradients and both AdamW moments

`plan_experiment` runs this for each stage as configured and for every trunk mode and precision,
says which fit a device of `gpu_memory` bytes, and for a stage that does not fit, lists the changes
that make it fit (smaller micro-batch, gradient checkpointing, chunked loss, cache mode, bf16 or
quantized trunk, LoRA instead of the full stack) with the peak each would give.

Not modelled: `torch.compile` (`compile_blocks`), DDP/FSDP buffers, the CUDA context (~0.5 GiB,
outside `max_memory_allocated`) and allocator fragmentation; `reserve` keeps a margin for those.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .adapters import AdapterSettings
from .configuration_stackwise import StackWiseConfig, canonical_dtype
from .training.arguments import parse_size
from .training.experiment import ExperimentConfig
from .training.schedule import ResolvedStage, resolve_schedule
from .training.stage import first_trained_index, stack_roles, trunk_on_host

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per weight of a quantized linear, scales included: int8 with one scale per output row, and
# NF4 (bitsandbytes: 64-weight blocks, absmax stored in 8 bits per 256 blocks with double quantization).
QUANTIZED_BYTES = {"int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
TRUNK_PRECISIONS = ("stack", "float32", "bfloat16", "float16", "int8", "nf4")
TRUNK_PLACEMENTS = ("device", "host")
PHASES = ("trunk", "extend", "loss", "backward", "optimizer")
COMPONENTS = ("frozen_weights", "trained_weights", "gradients", "optimizer_state", "activations", "logits_loss",
              "cache_buffers")


# Results ---------------------------------------------------------------------------------------------


@dataclass
class MemoryBreakdown:
    """Bytes on the device at a stage's peak, by what holds them; `total` is their sum."""

    frozen_weights: int = 0
    trained_weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    logits_loss: int = 0
    cache_buffers: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COMPONENTS)

    def as_dict(self) -> dict:
        return {**{name: getattr(self, name) for name in COMPONENTS}, "total": self.total}


@dataclass
class PlanSettings:
    """How a stage runs, as far as memory goes. `from_experiment` reads it from the YAML.

    Args:
        micro_batch (`int`): sequences per micro-batch (`per_device_train_batch_size`).
        seq_len (`int`): tokens per sequence (`data.block_size`).
        mixed_precision (`str`): "no", "bf16" or "fp16" (autocast as the trainer runs it).
        loss_chunk_size (`int`, *optional*): positions per chunk of the fused head + loss; None for full logits.
        trunk_mode (`str`): "recompute" or "cache".
        trunk_precision (`str`): "stack" (the stacks' own dtypes), a dtype, "int8" or "nf4".
        trunk_placement (`str`): "device", or "host" (cache mode only: the trunk lives in host memory
            and comes to the device one stack at a time to extend the cache).
        gradient_checkpointing (`bool`): recompute the trained stack's activations in backward.
        device_type (`str`): "cuda" (fused AdamW) or "cpu" (per-parameter AdamW temporaries).
        workspace (`int`, *optional*): bytes the device holds besides tensors and counts as allocated;
            defaults to 64 MiB on CUDA (cuBLAS and cuBLASLt workspaces come from the caching allocator), 0 on CPU.
    """

    micro_batch: int = 8
    seq_len: int = 256
    mixed_precision: str = "no"
    loss_chunk_size: int | None = None
    trunk_mode: str = "recompute"
    trunk_precision: str = "stack"
    trunk_placement: str = "device"
    gradient_checkpointing: bool = False
    device_type: str = "cuda"
    workspace: int | None = None

    def __post_init__(self):
        if self.trunk_precision not in TRUNK_PRECISIONS:
            self.trunk_precision = canonical_dtype(self.trunk_precision, "trunk_precision") \
                if self.trunk_precision not in QUANTIZED_BYTES else self.trunk_precision
        if self.trunk_placement not in TRUNK_PLACEMENTS:
            raise ValueError(f"`trunk_placement` must be one of {list(TRUNK_PLACEMENTS)}; got {self.trunk_placement!r}.")
        if self.trunk_placement == "host" and self.trunk_mode != "cache":
            raise ValueError("`trunk_placement='host'` needs `trunk_mode='cache'`: a recomputed trunk runs every step.")

    def replace(self, **changes) -> "PlanSettings":
        return dataclasses.replace(self, **changes)

    @property
    def label(self) -> str:
        mode = "cache/host" if self.trunk_mode == "cache" and self.trunk_placement == "host" else self.trunk_mode
        return f"{mode}:{self.trunk_precision}"


@dataclass
class StagePlan:
    """The prediction for one stage under one `PlanSettings`.

    `device` is the breakdown at the peak phase (`peak_phase`); `phases` holds each phase's total.
    `host_bytes` is what the stage keeps in host memory (an offloaded trunk); `cache_bytes_per_token`
    the activation cache's size per token (x 1e9 for a billion tokens, on disk or in host memory).
    """

    index: int
    name: str
    stack: int
    stack_sizes: tuple
    settings: PlanSettings
    device: MemoryBreakdown
    peak_phase: str
    phases: dict
    host_bytes: int
    cache_bytes_per_token: int
    trained_parameters: int
    frozen_parameters: int
    fits: bool | None = None
    suggestions: list = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.device.total

    def as_dict(self) -> dict:
        return {
            "index": self.index, "name": self.name, "stack": self.stack, "stack_sizes": list(self.stack_sizes),
            "settings": dataclasses.asdict(self.settings), "peak_bytes": self.peak, "peak_phase": self.peak_phase,
            "device": self.device.as_dict(), "phases": dict(self.phases), "host_bytes": self.host_bytes,
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "cache_bytes_per_billion_tokens": self.cache_bytes_per_token * 10**9,
            "trained_parameters": self.trained_parameters, "frozen_parameters": self.frozen_parameters,
            "fits": self.fits, "suggestions": list(self.suggestions),
        }


@dataclass
class ExperimentPlan:
    """`plan_experiment`'s answer: one configured `StagePlan` per stage, and the peak of every stage
    under every trunk mode and precision (`variants[label][stage index]`)."""

    stages: list
    variants: dict
    gpu_memory: int | None
    host_memory: int | None
    usable_memory: int | None

    @property
    def fits(self) -> bool | None:
        if self.usable_memory is None:
            return None
        return all(s.fits for s in self.stages)

    def as_dict(self) -> dict:
        return {"gpu_memory": self.gpu_memory, "host_memory": self.host_memory, "usable_memory": self.usable_memory,
                "fits": self.fits, "stages": [s.as_dict() for s in self.stages],
                "variants": {k: list(v) for k, v in self.variants.items()}}


# Shapes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    hidden: int
    q_width: int  # heads x head_dim
    kv_width: int
    ffn: int
    vocab: int
    heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config: StackWiseConfig) -> "_Shape":
        return cls(config.hidden_size, config.num_attention_heads * config.head_dim,
                   config.num_key_value_heads * config.head_dim, config.intermediate_size, config.vocab_size,
                   config.num_attention_heads, config.head_dim, bool(config.tie_word_embeddings))

    @property
    def linear_params(self) -> int:
        """Weights of one block's seven projections (q, k, v, o, gate, up, down)."""
        h = self.hidden
        return h * self.q_width + 2 * h * self.kv_width + self.q_width * h + 3 * h * self.ffn

    @property
    def block_params(self) -> int:
        return self.linear_params + 2 * self.hidden

    @property
    def largest_linear(self) -> int:
        return max(self.hidden * self.ffn, self.hidden * self.q_width)


def block_parameters(config: StackWiseConfig) -> int:
    """Parameters of one block: q/k/v/o (GQA), gate/up/down and two RMSNorm weights."""
    return _Shape.of(config).block_params


def rack_parameters(config: StackWiseConfig, stack_sizes=None) -> int:
    """Parameters of a rack of `stack_sizes` (default: the config's): blocks, embeddings, final norm, head."""
    shape = _Shape.of(config)
    blocks = sum(stack_sizes if stack_sizes is not None else config.stack_sizes)
    head = 0 if shape.tied else shape.vocab * shape.hidden
    return blocks * shape.block_params + shape.vocab * shape.hidden + shape.hidden + head


def _block_saved_bytes(shape: _Shape, stack_bytes: int, compute_bytes: int, cast: bool, weights_train: bool,
                       input_requires_grad: bool) -> int:
    """Bytes per token that one block's autograd graph saves for backward (weight copies excluded).

    Derived from the ops of `StackWiseBlock.forward`: `stack_bytes` is the stack dtype's size,
    `compute_bytes` the matmul dtype's (autocast's, or the stack's), `cast` whether autocast copies
    the matmul inputs (an fp32 stack under bf16/fp16 autocast). An op saves only what the gradients
    that are actually needed use: a frozen linear keeps its weight but not its input; the first
    trained block's input (a no_grad trunk output) keeps no norm input.
    """
    h, hq, hkv, f = shape.hidden, shape.q_width, shape.kv_width, shape.ffn
    saved = 0
    for norm_input_grad in (input_requires_grad, True):  # input norm, then post-attention norm
        if norm_input_grad:
            # pow and mul keep the fp32 input (the stack's own tensor when fp32, else an fp32 copy) and rsqrt.
            saved += 4 * h + 4
        if weights_train:
            saved += (4 if stack_bytes == 4 else stack_bytes) * h  # normalised x, kept for the norm weight's grad
    if weights_train:
        # Inputs of q/k/v and gate/up: autocast makes one copy per linear; without a cast they share the norm output.
        saved += (3 * compute_bytes * h + 2 * compute_bytes * h) if cast else 2 * stack_bytes * h
        saved += 4 * compute_bytes * f  # gate out (silu), silu out and up out (mul), product (down_proj)
    else:
        saved += 3 * compute_bytes * f  # silu input, both mul operands; frozen linears keep only weights
    # SDPA keeps q, k, v, its output (which o_proj reads as a view) and a fp32 logsumexp per head.
    saved += compute_bytes * (2 * hq + 2 * hkv) + 4 * shape.heads
    return saved


def _trunk_block_transient(shape: _Shape, stack_bytes: int, compute_bytes: int, cast: bool, tokens: int) -> int:
    """Working set of one block's forward under no_grad: the MLP's three (N, F) tensors, the residual
    stream, and (fp32 weights under autocast) one weight's cast copy."""
    weights = 2 * shape.largest_linear if cast else 0
    return tokens * (3 * compute_bytes * shape.ffn + 3 * stack_bytes * shape.hidden + 4 * shape.hidden) + weights


# Stage replay ----------------------------------------------------------------------------------------


@dataclass
class _StackState:
    blocks: int
    dtype: str
    quantized: str | None = None  # "int8" / "nf4"


def _replay(config: StackWiseConfig, schedule: list[ResolvedStage]) -> list[list[_StackState]]:
    """Each stage's stacks with their dtype and quantization, as `grow_for_stage` leaves them."""
    stacks = [_StackState(n, d) for n, d in zip(config.stack_sizes, config.stack_dtypes)]
    layouts = []
    for stage in schedule:
        c = stage.config
        if c.grow == "append":
            stacks.append(_StackState(c.n_blocks, c.dtype or stacks[-1].dtype))
        elif c.grow == "prepend":
            stacks.insert(0, _StackState(c.n_blocks, c.dtype or stacks[0].dtype))
        trunk = [s for i, s in enumerate(stacks) if i != stage.stack]
        if c.trunk_dtype is not None:
            for s in trunk:
                s.dtype = c.trunk_dtype
        quantization = c.trunk_quantization
        if quantization is not None:
            for s in trunk:
                s.quantized = quantization
        layouts.append([dataclasses.replace(s) for s in stacks])
    return layouts


def _lora_parameters(shape: _Shape, stack_idx: int, blocks: int, adapter: dict | None) -> int:
    settings = AdapterSettings.from_dict(dict(adapter or {}))
    r, _ = settings.rank_for(stack_idx)
    h = shape.hidden
    dims = {"q_proj": (h, shape.q_width), "k_proj": (h, shape.kv_width), "v_proj": (h, shape.kv_width),
            "o_proj": (shape.q_width, h), "gate_proj": (h, shape.ffn), "up_proj": (h, shape.ffn),
            "down_proj": (shape.ffn, h)}
    return blocks * sum(r * (dims[p][0] + dims[p][1]) for p in settings.projections)


# The step ---------------------------------------------------------------------------------------------


@dataclass
class _StageView:
    """What one stage does, as the planner needs it: the stage module's answers (`training/stage.py`:
    each stack's role, the first trained stack, where the trunk lives) under one `PlanSettings`."""

    shape: _Shape
    stage: ResolvedStage
    settings: PlanSettings
    stacks: list[_StackState]
    roles: list[str]  # per stack: "trained", "adapter" (frozen base + trained LoRA) or "frozen"
    first: int  # stacks [0, first) are the frozen trunk under no_grad; [first, n) the grad path
    cache_mode: bool
    on_host: bool
    head_trains: bool
    embed_trains: bool

    @property
    def tokens(self) -> int:
        return self.settings.micro_batch * self.settings.seq_len

    @property
    def loss_tokens(self) -> int:
        return self.settings.micro_batch * (self.settings.seq_len - 1)

    @property
    def autocast(self) -> bool:
        return self.settings.mixed_precision in ("bf16", "fp16")

    @property
    def trunk_ids(self) -> list[int]:
        return list(range(self.first))

    @property
    def path_ids(self) -> list[int]:
        return list(range(self.first, len(self.stacks)))

    def compute_bytes(self, dtype: str) -> int:
        return 2 if self.autocast else DTYPE_BYTES[dtype]

    def trunk_dtype(self, st: _StackState) -> str:
        return st.dtype if self.settings.trunk_precision in ("stack", "int8", "nf4") else self.settings.trunk_precision

    def frozen_weight_bytes(self, st: _StackState) -> float:
        s, shape = self.settings, self.shape
        quant = st.quantized or (s.trunk_precision if s.trunk_precision in QUANTIZED_BYTES else None)
        if quant:
            return st.blocks * (shape.linear_params * QUANTIZED_BYTES[quant] + 2 * shape.hidden * DTYPE_BYTES[st.dtype])
        return st.blocks * shape.block_params * DTYPE_BYTES[self.trunk_dtype(st)]


def _stage_view(config: StackWiseConfig, stage: ResolvedStage, settings: PlanSettings,
                stacks: list[_StackState] | None) -> _StageView:
    if stacks is None:
        dtypes = list(config.stack_dtypes) + [config.stack_dtypes[-1]] * len(stage.stack_sizes)
        stacks = [_StackState(n, dtypes[min(i, len(dtypes) - 1)]) for i, n in enumerate(stage.stack_sizes)]
    shape = _Shape.of(config)
    c = stage.config
    first = first_trained_index(stage)
    cache_mode = settings.trunk_mode == "cache" and first > 0
    embed_trains = c.trains("embeddings")
    return _StageView(
        shape=shape, stage=stage, settings=settings, stacks=stacks, roles=stack_roles(stage), first=first,
        cache_mode=cache_mode, on_host=cache_mode and settings.trunk_placement == "host",
        head_trains=c.trains("head") or (shape.tied and embed_trains), embed_trains=embed_trains,
    )


@dataclass
class _Weights:
    trained: float = 0.0  # bytes of trained parameters on the device (LoRA included)
    frozen: float = 0.0  # bytes of frozen weights on the device
    host: float = 0.0  # bytes of the trunk kept on the host
    trained_params: int = 0
    frozen_params: int = 0
    lora_params: int = 0


def _weights(view: _StageView) -> _Weights:
    """Where every weight is and whether it trains: stacks by role, then embeddings and head."""
    shape, c, w = view.shape, view.stage.config, _Weights()
    for i, st in enumerate(view.stacks):
        params = st.blocks * shape.block_params
        if view.roles[i] == "trained":
            w.trained += params * DTYPE_BYTES[st.dtype]
            w.trained_params += params
            continue
        w.frozen_params += params
        if view.on_host and i in view.trunk_ids:
            w.host += view.frozen_weight_bytes(st)
        else:
            w.frozen += view.frozen_weight_bytes(st)
        if view.roles[i] == "adapter":
            adapter = c.stack_adapter if i == view.stage.stack else c.trunk_adapter
            w.lora_params += _lora_parameters(shape, i, st.blocks, adapter)
    # LoRA weights are fp32 (peft's default): parameters, gradients and moments alike.
    w.trained += 4 * w.lora_params
    w.trained_params += w.lora_params
    emb_params = shape.vocab * shape.hidden
    head_params = (0 if shape.tied else shape.vocab * shape.hidden) + shape.hidden  # LM head and final norm, fp32
    for trains, params in ((view.embed_trains, emb_params), (view.head_trains, head_params)):
        if trains:
            w.trained += 4 * params
            w.trained_params += params
        else:
            w.frozen += 4 * params
            w.frozen_params += params
    return w


@dataclass
class _Activations:
    # per block, in forward order: (saved, weight copies, weight grad, backward transient, recomputed, its copies)
    blocks: list[tuple]
    saved: int  # every activation the forward keeps, inputs included
    copies: int  # autocast's compute-dtype copies of fp32 weights
    norm_saved: int
    rotary: int
    inputs: int


def _activations(view: _StageView, lora_params: int) -> _Activations:
    """What the grad path's autograd graph saves, block by block (`_block_saved_bytes`)."""
    shape, s, tokens = view.shape, view.settings, view.tokens
    lora_blocks = max(1, sum(view.stacks[k].blocks for k in view.path_ids if view.roles[k] == "adapter"))
    blocks = []
    for i in view.path_ids:
        st, role = view.stacks[i], view.roles[i]
        sb, cb = DTYPE_BYTES[st.dtype], view.compute_bytes(st.dtype)
        cast = view.autocast and sb == 4
        for j in range(st.blocks):
            input_grad = not (i == view.path_ids[0] and j == 0) or view.embed_trains
            per_token = _block_saved_bytes(shape, sb, cb, cast, role != "frozen", input_grad)
            if role == "adapter":
                # peft's LoRA keeps each adapted projection's input in fp32 for lora_A and the (N, r) output for lora_B.
                per_token += 4 * shape.hidden * 5
            copies = 2 * shape.linear_params if cast and not st.quantized else 0
            if st.quantized or (role != "trained" and s.trunk_precision in QUANTIZED_BYTES):
                copies = 0  # a quantized layer dequantizes per call and keeps nothing
            block_grad = {"trained": shape.block_params * sb, "adapter": 4 * lora_params // lora_blocks}.get(role, 0)
            full = tokens * per_token
            # Working set of the block's own backward: gradients of the MLP's (N, F) tensors and of the
            # residual stream, and one weight gradient (compute-dtype product, then its cast).
            transient = tokens * (3 * cb * shape.ffn + 2 * sb * shape.hidden) + (
                (cb + sb) * shape.largest_linear if role == "trained" else 0)
            if s.gradient_checkpointing and role == "trained":
                # Only the block input is kept; backward re-runs the block (with its weight copies).
                blocks.append((tokens * sb * shape.hidden, 0, block_grad, transient, full, copies))
            else:
                blocks.append((full, copies, block_grad, transient, 0, 0))
        # Each stack casts the fp32 rotary cos/sin to its dtype and keeps them (shared by its blocks).
        if sb != 4:
            blocks[-1] = (blocks[-1][0] + 2 * tokens * shape.head_dim * sb,) + blocks[-1][1:]
    rotary = 2 * tokens * shape.head_dim * 4  # position_embeddings in fp32
    # Final norm (fp32 weight): keeps its fp32 input and the normalised x when it trains.
    norm_saved = tokens * (4 * shape.hidden + 4 + (4 * shape.hidden if view.head_trains else 0))
    inputs = tokens * 8  # input_ids (int64); CLM labels are the same tensor
    return _Activations(blocks, sum(b[0] for b in blocks) + norm_saved + rotary + inputs,
                        sum(b[1] for b in blocks), norm_saved, rotary, inputs)


def _loss_working_set(view: _StageView) -> tuple[int, int, int]:
    """(forward bytes, backward bytes, head weight copy kept with the activations) of head + loss."""
    v, hdim, loss_tokens = view.shape.vocab, view.shape.hidden, view.loss_tokens
    head_cast, head_trains = view.autocast, view.head_trains  # the head weight is fp32
    if view.settings.loss_chunk_size:
        chunk = min(view.settings.loss_chunk_size, loss_tokens)
        grad_hidden = 4 * loss_tokens * hdim if view.path_ids or view.embed_trains else 0
        grad_weight = 4 * v * hdim if head_trains else 0
        w_copy = 2 * v * hdim if head_cast else 0
        # Per chunk: fp32 logits, their compute-dtype copy and, when the head trains, the (V, H)
        # product of the chunk in the compute dtype and its fp32 copy.
        chunk_work = chunk * v * (4 + (2 if head_cast else 4)) + (
            (2 if head_cast else 4) * v * hdim + 4 * v * hdim if head_trains else 0)
        final_hidden = 4 * view.tokens * hdim
        return grad_hidden + grad_weight + w_copy + chunk_work + final_hidden, 2 * grad_hidden + 2 * grad_weight, 0
    # Plain path: bf16 logits -> fp32 copy -> log_softmax output (kept); backward adds the grad of
    # the log-probs and of the logits: 12 bytes per logit at the worst moment.
    cast_input = 2 * loss_tokens * hdim if head_cast else 0
    forward = loss_tokens * v * (8 + (2 if head_cast else 0)) + cast_input
    # Backward: log_softmax's kept output, its incoming and outgoing gradients (12 bytes a logit);
    # then the head's backward: the logits' gradient and the weight gradient (product, fp32 cast).
    head_backward = loss_tokens * v * (2 if head_cast else 4) + (
        ((2 if head_cast else 0) + 4) * v * hdim if head_trains else 0)
    backward = max(12 * loss_tokens * v, head_backward) + cast_input
    return forward, backward, 2 * v * hdim if head_cast and head_trains else 0


def _backward_peak(view: _StageView, acts: _Activations) -> tuple[int, int]:
    """(gradients, activations) at the worst moment of the walk back through the trained blocks: each
    block's backward starts with every earlier activation alive and the later blocks' gradients."""
    shape = view.shape
    head_params = 0 if shape.tied else shape.vocab * shape.hidden
    grads = 4 * (head_params + shape.hidden) if view.head_trains else 0
    remaining_act = acts.saved - acts.norm_saved
    remaining_copies = acts.copies
    worst = None
    for kept, copies, block_grad, transient, recompute, recompute_copies in reversed(acts.blocks):
        candidate = (grads, remaining_act + remaining_copies + transient + recompute + recompute_copies)
        if worst is None or sum(candidate) > sum(worst):
            worst = candidate
        grads += block_grad
        remaining_act -= kept
        remaining_copies -= copies
    return worst if worst is not None else (grads, 0)


def _trunk_phase_activations(view: _StageView, acts: _Activations) -> int:
    """One block of the last trunk stack running under no_grad (recompute, or extending the cache)."""
    st = view.stacks[view.trunk_ids[-1]]
    sb = DTYPE_BYTES[view.trunk_dtype(st)]
    return acts.inputs + acts.rotary + _trunk_block_transient(view.shape, sb, view.compute_bytes(st.dtype),
                                                             view.autocast and sb == 4, view.tokens)


def _phases(view: _StageView, weights: _Weights, acts: _Activations) -> dict[str, MemoryBreakdown]:
    s, shape = view.settings, view.shape
    cache_batch = view.tokens * shape.hidden * DTYPE_BYTES[view.stacks[view.first - 1].dtype] if view.cache_mode else 0
    workspace = s.workspace if s.workspace is not None else (64 * 2**20 if s.device_type == "cuda" else 0)
    base = MemoryBreakdown(frozen_weights=int(weights.frozen), trained_weights=int(weights.trained),
                           optimizer_state=int(2 * weights.trained),  # AdamW's two moments, like the parameter
                           cache_buffers=int(cache_batch + workspace))
    loss_forward, loss_backward, head_copy = _loss_working_set(view)
    phases = {"loss": dataclasses.replace(base, activations=int(acts.saved + acts.copies + head_copy),
                                          logits_loss=int(max(loss_forward, loss_backward)))}
    grads, activations = _backward_peak(view, acts)
    phases["backward"] = dataclasses.replace(base, gradients=int(grads), activations=int(activations))
    # All gradients and both moments (fused on CUDA; CPU's loop holds two temporaries of a parameter).
    head_linear = shape.vocab * shape.hidden if view.head_trains else 0
    opt_temp = 0 if s.device_type == "cuda" else 2 * 4 * max(shape.largest_linear, head_linear)
    phases["optimizer"] = dataclasses.replace(base, gradients=int(weights.trained),
                                              activations=int(acts.inputs + opt_temp))
    if view.trunk_ids and not view.cache_mode:
        phases["trunk"] = dataclasses.replace(base, activations=int(_trunk_phase_activations(view, acts)))
    if view.cache_mode:  # the newest trunk stack comes to the device to extend the cache
        st = view.stacks[view.trunk_ids[-1]]
        stack_w = view.frozen_weight_bytes(st) if view.on_host else 0
        phases["extend"] = dataclasses.replace(base, frozen_weights=int(weights.frozen + stack_w),
                                               activations=int(_trunk_phase_activations(view, acts)))
    return phases


def plan_stage(config: StackWiseConfig, stage: ResolvedStage, settings: PlanSettings,
               stacks: list[_StackState] | None = None) -> StagePlan:
    """Predicts one stage's peak device memory under `settings`.

    Args:
        config: the rack's architecture (its stack layout is the one before the schedule runs).
        stage: the stage, from `resolve_schedule`.
        settings: micro-batch, sequence length, precision, trunk mode and precision.
        stacks: the stage's stacks with dtypes (from `_replay`); replayed from `stage` alone when None
            (growth and dtypes of earlier stages then come from `stage.stack_sizes` and `config`).
    """
    view = _stage_view(config, stage, settings, stacks)
    weights = _weights(view)
    phases = _phases(view, weights, _activations(view, weights.lora_params))
    peak_phase = max(phases, key=lambda k: phases[k].total)
    cache_dtype_bytes = DTYPE_BYTES[view.trunk_dtype(view.stacks[view.first - 1])] if view.first > 0 else 4
    return StagePlan(
        index=stage.index, name=stage.name, stack=stage.stack, stack_sizes=tuple(stage.stack_sizes), settings=settings,
        device=phases[peak_phase], peak_phase=peak_phase, phases={k: v.total for k, v in phases.items()},
        host_bytes=int(weights.host), cache_bytes_per_token=view.shape.hidden * cache_dtype_bytes,
        trained_parameters=int(weights.trained_params), frozen_parameters=int(weights.frozen_params),
    )


# Measuring -------------------------------------------------------------------------------------------


class MemoryMeter:
    """Measures the peak bytes of tensors alive on a device while a block of code runs.

    On CUDA it reads the caching allocator (`torch.cuda.max_memory_allocated`). On CPU, where torch
    keeps no allocator statistics, it is a `TorchDispatchMode` that sees every tensor an op returns
    (the autograd engine's backward ops included), counts each storage once, and subtracts it when
    the storage is freed; tensors that existed before are counted through `track` (parameters,
    optimizer state, inputs). What it cannot see: memory that kernels allocate internally without
    returning it (oneDNN scratch, SDPA workspaces), and allocator rounding.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf.planner import MemoryMeter
    >>> with MemoryMeter("cpu") as meter:
    ...     x = torch.ones(1024, 256)
    ...     y = x * 2
    ...     del x, y
    >>> meter.peak, meter.current
    (2097152, 0)
    ```
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak = 0
        self.current = 0
        self._mode = None
        self._base = 0

    def track(self, *tensors) -> None:
        """Counts tensors that exist already (CPU: once per storage; CUDA: already in the allocator's count)."""
        if self.device.type == "cuda":
            return
        if self._mode is None:
            self._mode = _LiveStorages(self.device.type)
        for t in tensors:
            self._mode.add(t)

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        if self._mode is None:
            self._mode = _LiveStorages(self.device.type)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.current = torch.cuda.memory_allocated(self.device)
            return
        self._mode.__exit__(*exc)
        self.peak, self.current = self._mode.peak, self._mode.current


class _LiveStorages:
    """The CPU half of `MemoryMeter`: live bytes by storage, through a dispatch mode and weak finalizers."""

    def __init__(self, device_type: str):
        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    meter.add(t)
                return out

        self.device_type = device_type
        self.live = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        self._mode = _Mode()

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type or t.is_meta:
            return
        if is_traceable_wrapper_subclass(t):  # a quantized weight (torchao): its memory is its inner tensors
            for attr in t.__tensor_flatten__()[0]:
                self.add(getattr(t, attr))
            return
        storage = t.untyped_storage()
        if storage in self.live:
            return
        n = storage.nbytes()
        self.live[storage] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.current -= n

    def __enter__(self):
        self.peak = self.current
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


# The schedule ----------------------------------------------------------------------------------------


def settings_for_stage(experiment, stage: ResolvedStage, device_type: str = "cuda", **overrides) -> PlanSettings:
    """The `PlanSettings` a stage of `experiment` runs with (cache mode keeps the trunk on the host,
    as the trainer does on one process)."""
    training, c = experiment.training, stage.config
    quantization = c.trunk_quantization
    fields = dict(
        micro_batch=training.per_device_train_batch_size, seq_len=experiment.data.block_size,
        mixed_precision=training.mixed_precision, loss_chunk_size=getattr(training, "loss_chunk_size", None),
        trunk_mode=c.trunk_mode, trunk_precision=quantization or "stack",
        # Where the trainer keeps the trunk on one accelerator (a CPU plan models the same split).
        trunk_placement="host" if trunk_on_host(stage, "cuda", num_processes=1) else "device",
        gradient_checkpointing=c.gradient_checkpointing, device_type=device_type,
    )
    fields.update(overrides)
    return PlanSettings(**fields)


def variant_settings(settings: PlanSettings) -> dict[str, PlanSettings]:
    """Every trunk mode and precision for one stage: recompute with the trunk as configured, in bf16,
    int8 and NF4, and cache mode with the trunk on the host."""
    out = {}
    for precision in ("stack", "bfloat16", "int8", "nf4"):
        v = settings.replace(trunk_mode="recompute", trunk_placement="device", trunk_precision=precision)
        out[v.label] = v
    v = settings.replace(trunk_mode="cache", trunk_placement="host", trunk_precision="stack")
    out[v.label] = v
    return out


def plan_experiment(experiment, gpu_memory=None, host_memory=None, reserve: float = 0.05,
                    device_type: str = "cuda", **overrides) -> ExperimentPlan:
    """Plans every stage of an experiment.

    Args:
        experiment: an `ExperimentConfig` (or a path to its YAML).
        gpu_memory (`int` or `str`, *optional*): device memory ("141GB", "80GiB" or bytes); when given, each
            stage says whether it fits and, if not, what would.
        host_memory (`int` or `str`, *optional*): host memory, checked against an offloaded trunk.
        reserve (`float`): fraction of `gpu_memory` kept free for the CUDA context and fragmentation.
        device_type (`str`): "cuda" or "cpu".
        overrides: `PlanSettings` fields applied to every stage (e.g. `micro_batch=2`).

    Example:

    ```python
    >>> from stackwise_hf.planner import plan_experiment
    >>> plan = plan_experiment("configs/llama-70b-stackwise.yaml", gpu_memory="141GB")
    >>> plan.fits
    True
    ```
    """
    if not isinstance(experiment, ExperimentConfig):
        experiment = ExperimentConfig.from_yaml(experiment)
    gpu = parse_size(gpu_memory, "gpu_memory") if gpu_memory is not None else None
    host = parse_size(host_memory, "host_memory") if host_memory is not None else None
    usable = int(gpu * (1 - reserve)) if gpu is not None else None
    config = experiment.model
    schedule = resolve_schedule(experiment.stages, config.stack_sizes, experiment.training.max_stacks)
    layouts = _replay(config, schedule)
    stages, variants = [], {}
    for stage, stacks in zip(schedule, layouts):
        settings = settings_for_stage(experiment, stage, device_type, **overrides)
        plan = plan_stage(config, stage, settings, stacks)
        for label, v in variant_settings(settings).items():
            variants.setdefault(label, []).append(plan_stage(config, stage, v, stacks).peak)
        if usable is not None:
            plan.fits = plan.peak <= usable and (host is None or plan.host_bytes <= host)
            if not plan.fits:
                plan.suggestions = suggest(config, stage, settings, stacks, usable, plan)
        stages.append(plan)
    return ExperimentPlan(stages, variants, gpu, host, usable)


def suggest(config, stage: ResolvedStage, settings: PlanSettings, stacks, usable: int, plan: StagePlan) -> list[str]:
    """Changes that bring a stage under `usable` bytes, each with the peak it gives, cheapest first."""
    candidates = []
    if settings.micro_batch > 1:
        for mb in _halvings(settings.micro_batch):
            candidates.append((f"per_device_train_batch_size: {mb} (raise gradient_accumulation_steps "
                               f"x{settings.micro_batch // mb} to keep the tokens per step)", settings.replace(micro_batch=mb),
                               None))
    if not settings.loss_chunk_size:
        candidates.append(("training.loss_chunk_size: 4096 (chunked head + loss)",
                           settings.replace(loss_chunk_size=4096), None))
    if not settings.gradient_checkpointing and stage.config.trains("stack"):
        candidates.append(("gradient_checkpointing: true on the stage", settings.replace(gradient_checkpointing=True), None))
    if settings.trunk_mode != "cache" and stage.stack > 0:
        candidates.append(("trunk_mode: cache (the trunk stays on the host; its output is cached)",
                           settings.replace(trunk_mode="cache", trunk_placement="host"), None))
    if settings.trunk_mode == "recompute":
        for precision, text in (("bfloat16", "trunk_dtype: bf16"), ("int8", "trunk_quantization: int8"),
                                ("nf4", "trunk_quantization: nf4")):
            if settings.trunk_precision != precision:
                candidates.append((text, settings.replace(trunk_precision=precision), None))
    if stage.config.trains("stack") and "all" not in stage.config.train:
        lora = dataclasses.replace(stage, config=dataclasses.replace(
            stage.config, train=[p for p in stage.config.train if p != "stack"] + ["stack_adapter"],
            stack_adapter=stage.config.stack_adapter or {}))
        candidates.append(("train: [stack_adapter, head] (LoRA on the new stack instead of all its weights)", settings, lora))
    trained = stacks[stage.stack]
    if trained.dtype == "float32" and stage.config.trains("stack"):
        bf16 = [dataclasses.replace(st) for st in stacks]
        bf16[stage.stack].dtype = "bfloat16"
        candidates.append(("dtype: bf16 for the new stack (weights, gradients and AdamW moments in bf16)", settings,
                           ("stacks", bf16)))
    out = []
    for text, s, other in candidates:
        st, stk = stage, stacks
        if isinstance(other, ResolvedStage):
            st = other
        elif isinstance(other, tuple):
            stk = other[1]
        peak = plan_stage(config, st, s, stk).peak
        if peak <= usable:
            out.append((peak, text))
    if not out:
        return [f"no single change fits {usable / GiB:.1f} GiB; combine them (e.g. cache mode with a smaller "
                f"micro-batch) or use fewer blocks per stack"]
    # One line per kind of change (the largest micro-batch that fits, not every halving).
    seen, lines = set(), []
    for peak, text in sorted(out, key=lambda x: -x[0]):
        key = text.split(":")[0]
        if key not in seen:
            seen.add(key)
            lines.append(f"{text}: peak {peak / GiB:.1f} GiB")
    return lines


def _halvings(n: int):
    n //= 2
    while n >= 1:
        yield n
        n //= 2


# Tables ----------------------------------------------------------------------------------------------


def format_plan(plan: ExperimentPlan) -> str:
    """The plan as text tables: per stage the breakdown at the peak, then peaks by trunk mode and precision."""
    lines = []
    if plan.gpu_memory is not None:
        lines.append(f"device memory {plan.gpu_memory / GiB:.1f} GiB, usable {plan.usable_memory / GiB:.1f} GiB "
                     f"(after the reserve); figures in GiB")
    head = (f"{'stage':<12}{'blocks':>7}{'mode':>18}{'frozen':>8}{'trained':>8}{'grads':>7}{'optim':>7}{'act':>7}"
            f"{'loss':>7}{'cache':>7}{'peak':>8}{'phase':>10}{'host':>8}  fits")
    lines.append(head)
    for s in plan.stages:
        d = s.device
        fits = "-" if s.fits is None else ("yes" if s.fits else "NO")
        lines.append(
            f"{s.name[:12]:<12}{sum(s.stack_sizes):>7}{s.settings.label:>18}{_g(d.frozen_weights):>8}"
            f"{_g(d.trained_weights):>8}{_g(d.gradients):>7}{_g(d.optimizer_state):>7}{_g(d.activations):>7}"
            f"{_g(d.logits_loss):>7}{_g(d.cache_buffers):>7}{_g(s.peak):>8}{s.peak_phase:>10}{_g(s.host_bytes):>8}  {fits}")
        for line in s.suggestions:
            lines.append(f"{'':12}  -> {line}")
    per_token = plan.stages[-1].cache_bytes_per_token if plan.stages else 0
    lines.append(f"activation cache: {per_token} bytes per token = {per_token * 1e9 / 1e12:.2f} TB per billion tokens "
                 f"(host memory, or disk with training.trunk_cache_dir)")
    lines.append("")
    labels = list(plan.variants)
    width = max(len(label) for label in labels) + 2
    lines.append(f"{'peak by trunk mode:precision':<30}" + "".join(f"{label:>{width}}" for label in labels))
    for i, s in enumerate(plan.stages):
        cells = []
        for label in labels:
            peak = plan.variants[label][i]
            mark = "" if plan.usable_memory is None else (" " if peak <= plan.usable_memory else "*")
            cells.append(f"{_g(peak) + mark:>{width}}")
        lines.append(f"{s.name[:30]:<30}" + "".join(cells))
    if plan.usable_memory is not None:
        lines.append("* does not fit")
    return "\n".join(lines)


def _g(n: int) -> str:
    return f"{n / GiB:.1f}"
