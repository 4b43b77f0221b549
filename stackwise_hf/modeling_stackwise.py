"""The rack: a Llama-shaped decoder whose blocks are grouped into stacks.

Read top to bottom, parts to whole, in the order of transformers' `modeling_llama.py`: RMSNorm,
rotary embedding, SwiGLU MLP, attention, block, stack, then the `PreTrainedModel` classes. Module
paths follow Llama (`q_proj`, ..., `down_proj`) under `model.stacks[i].blocks[j]`, so peft targets a
stack by name and a rack maps onto `LlamaForCausalLM` by a name table (see `llama_interop.py`).

Each stack holds its weights in its own dtype (`config.stack_dtypes`); hidden states are cast to a
stack's dtype when they enter it. Growth, freezing and per-stack save/load are in `rack.py`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_stackwise import StackWiseConfig
from .rack import RackMixin

# transformers 5.24 renamed the cache kwarg and output field `past_key_values` to `cache`; 5.17-5.23
# only know `past_key_values`. Forwards accept both names and outputs fill whichever field exists.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _renamed_cache_kwarg(forward):
    """Where transformers renamed `past_key_values` to `cache` (5.24+), its own deprecation shim on a forward:
    the old name still works, with a FutureWarning at the caller's line. Older versions only know the old
    name, which `_cache_argument` accepts without a warning."""
    if _CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
    return forward


def _cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache passed under either name."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    return past_key_values


class StackWiseRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class StackWiseRotaryEmbedding(nn.Module):
    """RoPE of every type Llama supports (`config.rope_parameters["rope_type"]`), through transformers'
    `ROPE_INIT_FUNCTIONS` and `dynamic_rope_update`. cos/sin come out in float32; each stack casts them
    to its own dtype."""

    def __init__(self, config: StackWiseConfig):
        super().__init__()
        self.config = config
        # Read by `dynamic_rope_update` ("dynamic" and "longrope" types).
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = self.compute_rope_parameters(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_rope_parameters(config: StackWiseConfig) -> tuple[torch.Tensor, float]:
        """(inverse frequencies of shape (head_dim / 2,), scaling factor of cos/sin) for the config's RoPE type."""
        rope_type = config.rope_parameters["rope_type"]
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config)
        dim, base = config.head_dim, config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0

    @staticmethod
    def compute_inv_freq(config: StackWiseConfig) -> torch.Tensor:
        return StackWiseRotaryEmbedding.compute_rope_parameters(config)[0]

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, T, head_dim) in float32
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    # q: (B, nh, T, hd), k: (B, nkv, T, hd), cos/sin: (B, T, hd) -> broadcast over heads
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class StackWiseMLP(nn.Module):
    def __init__(self, config: StackWiseConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, nkv, T, hd) -> (B, nkv * n_rep, T, hd)
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "eager" entry of the attention interface, as in `modeling_llama.py`, except that the mask may
    also be boolean (True = attend): a caller's 4D mask for packed documents is boolean for every backend."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, T_kv)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hd)
    return output, weights


class StackWiseAttention(nn.Module):
    """Grouped-query attention, causal or bidirectional, computed by the backend `config._attn_implementation`
    names in transformers' attention interface ("eager", "sdpa", "flex_attention", "flash_attention_2", ...)."""

    def __init__(self, config: StackWiseConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx  # global block index: the KV cache's layer slot; renumbered on growth
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = config.attention_mode == "causal"  # read by the sdpa and flash backends
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask=None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class StackWiseBlock(GradientCheckpointingLayer):
    # Used when a stack is checkpointed on its own (`stack.gradient_checkpointing = True`, as the trainer
    # does): non-reentrant, so gradients reach the stack's weights even when its input (a frozen trunk's
    # output) does not require grad. `gradient_checkpointing_enable(...)` sets its own function per block.
    _gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def __init__(self, config: StackWiseConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = StackWiseRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = StackWiseAttention(config, layer_idx)
        self.post_attention_layernorm = StackWiseRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = StackWiseMLP(config)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        """Returns `(hidden_states, attention weights)`; the weights are None except on the eager path."""
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, **kwargs
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), attn_weights


@dataclass
class LayerOutputs:
    """What a forward pass records per block when asked: the hidden states entering the first block and
    leaving each block, and each block's attention weights."""

    hidden_states: list[torch.Tensor] | None = None
    attentions: list[torch.Tensor | None] | None = None


class StackWiseStack(nn.Module):
    """A run of blocks that is grown, frozen, trained, cast, saved and loaded as one unit."""

    def __init__(self, config: StackWiseConfig, num_blocks: int, first_layer_idx: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(StackWiseBlock(config, first_layer_idx + j) for j in range(num_blocks))

    @property
    def dtype(self) -> torch.dtype:
        # A norm weight is never quantized nor wrapped by an adapter, so it tells the stack's dtype.
        return self.blocks[0].input_layernorm.weight.dtype

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the stack's blocks recompute their activations in the backward pass. Setting it turns
        checkpointing on or off for this stack alone (`gradient_checkpointing_enable()` sets every block)."""
        return any(block.gradient_checkpointing for block in self.blocks)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        for block in self.blocks:
            block.gradient_checkpointing = enable

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask=None,
        cache: Cache | None = None,
        record: LayerOutputs | None = None,
        **kwargs,
    ) -> torch.Tensor:
        dtype = self.dtype
        hidden_states = hidden_states.to(dtype)
        position_embeddings = tuple(t.to(dtype) for t in position_embeddings)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point() and attention_mask.dtype != dtype:
            # An additive mask holds float32's lowest value, which is -inf in bf16/fp16: clamp before casting.
            attention_mask = attention_mask.clamp(min=torch.finfo(dtype).min).to(dtype)
        for block in self.blocks:
            hidden_states, attn_weights = block(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache,
                **kwargs,
            )
            if record is not None and record.hidden_states is not None:
                record.hidden_states.append(hidden_states)
            if record is not None and record.attentions is not None:
                record.attentions.append(attn_weights)
        return hidden_states


def stack_hidden_states(hidden_states: tuple[torch.Tensor, ...], stack_sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """The per-stack view of per-layer `hidden_states` (`output_hidden_states=True`): the embeddings, then
    the output of each stack. Like every transformers decoder, the last entry is the final-normed output.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf import StackWiseConfig, StackWiseModel
    >>> from stackwise_hf.modeling_stackwise import stack_hidden_states
    >>> config = StackWiseConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
    ...                          stack_sizes=[2, 1])
    >>> out = StackWiseModel(config)(torch.tensor([[1, 2]]), output_hidden_states=True)
    >>> len(out.hidden_states), len(stack_hidden_states(out.hidden_states, config.stack_sizes))
    (4, 3)
    ```
    """
    if len(hidden_states) != sum(stack_sizes) + 1:
        raise ValueError(
            f"Expected {sum(stack_sizes) + 1} hidden states (layers + 1) for stack_sizes={list(stack_sizes)}; "
            f"got {len(hidden_states)}."
        )
    ends, total = [0], 0
    for n in stack_sizes:
        total += n
        ends.append(total)
    return tuple(hidden_states[i] for i in ends)


class StackWisePreTrainedModel(RackMixin, PreTrainedModel):
    config: StackWiseConfig
    config_class = StackWiseConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["StackWiseBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: StackWiseConfig, *inputs, _body_of_head: bool = False, **kwargs):
        # Growth edits the config (stack_sizes, stack_dtypes): each rack owns a copy, so growing one never
        # grows the config the caller or another rack holds. A head's body shares its head's copy.
        super().__init__(config if _body_of_head else copy.deepcopy(config), *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, StackWiseRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, StackWiseRotaryEmbedding):
            # Non-persistent buffers: rebuilt here because from_pretrained creates the model on `meta`.
            inv_freq, _ = module.compute_rope_parameters(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class StackWiseModel(StackWisePreTrainedModel):
    """Embeddings, the stacks, and the final norm; returns the last hidden state.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf import StackWiseConfig, StackWiseModel
    >>> config = StackWiseConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    ...                          stack_sizes=[1, 2])
    >>> model = StackWiseModel(config)
    >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
    torch.Size([1, 3, 32])
    ```
    """

    stack_class = StackWiseStack  # what growth builds a new stack from

    def __init__(self, config: StackWiseConfig, _body_of_head: bool = False):
        super().__init__(config, _body_of_head=_body_of_head)
        config = self.config  # this rack's own copy
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.stacks = nn.ModuleList()
        first = 0
        for n_blocks in config.stack_sizes:
            self.stacks.append(StackWiseStack(config, n_blocks, first))
            first += n_blocks
        self.norm = StackWiseRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = StackWiseRotaryEmbedding(config)
        self.post_init()
        for stack, dtype in zip(self.stacks, config.stack_dtypes):
            stack.to(getattr(torch, dtype))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def attention_inputs(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> dict:
        """Rotary embeddings and the attention mask every stack shares for one forward pass.

        Args:
            hidden_states: the embeddings, (B, T, H).
            attention_mask: None, a (B, T_kv) padding mask (1 = token), or a ready (B, 1, T, T_kv) mask
                (boolean, True = attend; or additive float), e.g. block-diagonal for packed documents.
            position_ids: (B, T) positions; default past length + arange(T). Positions that restart at 0
                inside a row mark packed documents: with no mask and no cache (training), each document
                attends only to itself (transformers' packed-sequence detection).
            cache: the KV cache, whose length offsets the positions and sizes the mask.

        Returns the keyword arguments of `StackWiseStack.forward`: `position_embeddings`,
        `attention_mask` (in the form `config._attn_implementation` takes, from transformers'
        `create_causal_mask` / `create_bidirectional_mask`) and `position_ids`.
        """
        batch, seq_len, _ = hidden_states.shape
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + seq_len, device=hidden_states.device).expand(batch, -1)
        if attention_mask is not None and attention_mask.ndim == 4:
            mask = _prepared_4d_mask(attention_mask, self.config._attn_implementation)
        elif self.config.attention_mode == "causal":
            # Positional: the cache argument is `past_key_values` in 5.17-5.23 and `cache` in 5.24.
            mask = create_causal_mask(self.config, hidden_states, attention_mask, cache, position_ids)
        else:
            mask = create_bidirectional_mask(self.config, hidden_states, attention_mask)
        return {
            "position_embeddings": self.rotary_emb(hidden_states, position_ids),
            "attention_mask": mask,
            "position_ids": position_ids,
        }

    def forward_stacks(
        self, hidden_states: torch.Tensor, start: int = 0, stop: int | None = None, *, cache=None, record=None,
        **attention,
    ) -> torch.Tensor:
        """Runs stacks `start` to `stop` (exclusive) over `hidden_states`, without the final norm.

        This is the seam the progressive trainer uses: the frozen trunk is `forward_stacks(h, 0, k)`
        and the trained part `forward_stacks(h, k)`; `attention` is the output of `attention_inputs`.
        """
        for stack in self.stacks[start:stop]:
            hidden_states = stack(hidden_states, cache=cache, record=record, **attention)
        return hidden_states

    @_renamed_cache_kwarg
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Like `LlamaModel.forward`: `hidden_states` (when asked) holds the embeddings and each block's
        output, layers + 1 entries, the last one final-normed; `stack_hidden_states` gives the per-stack view.
        `output_attentions`, `output_hidden_states`, `use_cache` and `return_dict` default to the config's."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        cache = _cache_argument(cache, past_key_values)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training and self.config.attention_mode == "causal":
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        attention = self.attention_inputs(hidden_states, attention_mask, position_ids, cache)
        record = LayerOutputs(
            hidden_states=[hidden_states] if output_hidden_states else None,
            attentions=[] if output_attentions else None,
        )
        hidden_states = self.forward_stacks(hidden_states, cache=cache, record=record, **attention, **kwargs)
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype))
        if record.hidden_states is not None:
            record.hidden_states[-1] = hidden_states  # as in every transformers decoder: the last one is normed
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(record.hidden_states) if output_hidden_states else None,
            attentions=tuple(record.attentions) if output_attentions else None,
            **{_CACHE_FIELD: cache},
        )


def _prepared_4d_mask(mask: torch.Tensor, implementation: str | None):
    """A caller's (B, 1, T, T_kv) mask in the form the attention backend takes. Boolean (True = attend) and
    additive float masks pass to "eager" and "sdpa" as they are; flex_attention gets a `BlockMask` of
    it (transformers would add a tensor mask inside the compiled kernel, which crashes torch's CPU
    build); flash attention takes no 4D mask."""
    if implementation is not None and implementation.startswith("flash"):
        raise ValueError(
            f"attn_implementation={implementation!r} takes no 4D attention mask (got shape {tuple(mask.shape)}); for "
            "packed documents pass `position_ids` that restart at 0 for each document and no mask."
        )
    if implementation != "flex_attention":
        return mask
    attend = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2  # (B, 1, T, T_kv)
    batch, _, q_len, kv_len = attend.shape
    return create_block_mask(
        lambda b, h, q, kv: attend[b, 0, q, kv], batch, None, q_len, kv_len, device=attend.device
    )


class StackWiseLMHeadModel(StackWisePreTrainedModel):
    """The rack plus an LM head over the final hidden states (weights tied when the config says so);
    the heads below differ in attention mode and loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    attention_mode: str  # the `config.attention_mode` a head requires

    def __init__(self, config: StackWiseConfig):
        super().__init__(config)
        if self.config.attention_mode != self.attention_mode:
            raise ValueError(
                f"{type(self).__name__} needs `attention_mode={self.attention_mode!r}`; got "
                f"{self.config.attention_mode!r} (StackWiseForCausalLM is causal, StackWiseForMaskedLM bidirectional)."
            )
        self.model = StackWiseModel(self.config, _body_of_head=True)  # one config for both: growth edits it once
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


class StackWiseForCausalLM(StackWiseLMHeadModel, GenerationMixin):
    """The rack with a causal LM head; generates with a dynamic or static KV cache.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    >>> config = StackWiseConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    ...                          stack_sizes=[2])
    >>> rack = StackWiseForCausalLM(config)
    >>> rack.append_stack(2, init="identity")
    1
    >>> rack.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape
    torch.Size([1, 7])
    ```
    """

    attention_mode = "causal"

    @_renamed_cache_kwarg
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As `LlamaForCausalLM.forward`. The loss is transformers' causal-LM loss: `labels` are shifted
        inside it, or pass `shift_labels` already shifted (context parallelism); `num_items_in_batch`
        is honoured too."""
        loss_kwargs = {k: kwargs.pop(k) for k in ("shift_labels", "num_items_in_batch", "ignore_index") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None or loss_kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


class StackWiseForMaskedLM(StackWiseLMHeadModel):
    """The rack with bidirectional attention and an LM head over every position, for masked LM and
    masked-diffusion objectives. Labels are -100 except at the masked positions.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf import StackWiseConfig, StackWiseForMaskedLM
    >>> config = StackWiseConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
    ...                          stack_sizes=[1, 1], attention_mode="bidirectional", mask_token_id=3)
    >>> rack = StackWiseForMaskedLM(config)
    >>> rack(torch.tensor([[5, 3, 7]]), labels=torch.tensor([[-100, 9, -100]])).loss.shape
    torch.Size([])
    ```
    """

    attention_mode = "bidirectional"

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


__all__ = [
    "StackWisePreTrainedModel",
    "StackWiseModel",
    "StackWiseForCausalLM",
    "StackWiseForMaskedLM",
    "stack_hidden_states",
]
