"""The rack: a Llama-shaped decoder whose blocks are grouped into stacks.

Read top to bottom, parts to whole, in the order of transformers' `modeling_llama.py`: RMSNorm,
rotary embedding, SwiGLU MLP, attention, block, stack, then the `PreTrainedModel` classes. Module
paths follow Llama (`q_proj`, ..., `down_proj`) under `model.stacks[i].blocks[j]`, so peft targets a
stack by name and a rack maps onto `LlamaForCausalLM` by a name table (see `llama_interop.py`).

Each stack holds its weights in its own dtype (`config.stack_dtypes`); hidden states are cast to a
stack's dtype when they enter it. Growth, freezing and per-stack save/load are in `rack.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput

from .configuration_stackwise import StackWiseConfig
from .rack import RackMixin

# transformers 5.24 renamed the cache kwarg and output field `past_key_values` to `cache`; 5.17-5.23
# only know `past_key_values`. Forwards accept both names and outputs fill whichever field exists.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


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
    """Default RoPE; cos/sin are computed in float32 and cast by each stack to its own dtype."""

    def __init__(self, config: StackWiseConfig):
        super().__init__()
        self.config = config
        self.inv_freq = nn.Buffer(self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: StackWiseConfig) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, T, head_dim) in float32
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


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


class StackWiseAttention(nn.Module):
    """Grouped-query attention through `F.scaled_dot_product_attention`, causal or bidirectional."""

    def __init__(self, config: StackWiseConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # global block index: the KV cache's layer slot; renumbered on growth
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # (B, nh, T, hd); SDPA picks the flash / memory-efficient kernel when no explicit mask is given.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=is_causal and attention_mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class StackWiseBlock(nn.Module):
    def __init__(self, config: StackWiseConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = StackWiseRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = StackWiseAttention(config, layer_idx)
        self.post_attention_layernorm = StackWiseRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = StackWiseMLP(config)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, is_causal=True, cache=None):
        attn_out = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, is_causal, cache
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class StackWiseStack(nn.Module):
    """A run of blocks that is grown, frozen, trained, cast, saved and loaded as one unit."""

    # Set by `PreTrainedModel.gradient_checkpointing_enable()`, or per stack by the trainer.
    gradient_checkpointing = False

    def __init__(self, config: StackWiseConfig, num_blocks: int, first_layer_idx: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(StackWiseBlock(config, first_layer_idx + j) for j in range(num_blocks))

    @property
    def dtype(self) -> torch.dtype:
        # A norm weight is never quantized nor wrapped by an adapter, so it tells the stack's dtype.
        return self.blocks[0].input_layernorm.weight.dtype

    def forward(self, hidden_states, position_embeddings, attention_mask=None, is_causal=True, cache=None):
        dtype = self.dtype
        hidden_states = hidden_states.to(dtype)
        position_embeddings = tuple(t.to(dtype) for t in position_embeddings)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(dtype)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                hidden_states = self._gradient_checkpointing_func(
                    block.__call__, hidden_states, position_embeddings, attention_mask, is_causal, None
                )
            else:
                hidden_states = block(hidden_states, position_embeddings, attention_mask, is_causal, cache)
        return hidden_states

    def _gradient_checkpointing_func(self, fn, *args):
        # Non-reentrant so gradients reach the stack's weights even when its input (a frozen trunk's
        # output) does not require grad. `gradient_checkpointing_enable()` replaces this attribute.
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class StackWisePreTrainedModel(RackMixin, PreTrainedModel):
    config: StackWiseConfig
    config_class = StackWiseConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["StackWiseBlock"]
    _supports_sdpa = True

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
            # A non-persistent buffer: rebuilt here because from_pretrained creates the model on `meta`.
            init.copy_(module.inv_freq, module.compute_inv_freq(self.config))


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

    def __init__(self, config: StackWiseConfig):
        super().__init__(config)
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

        Returns the keyword arguments of `StackWiseStack.forward`: `position_embeddings`,
        `attention_mask` (None or a boolean `(B, 1, T, T_kv)` mask, True = attend) and `is_causal`.
        """
        batch, seq_len, _ = hidden_states.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq_len, device=hidden_states.device).expand(batch, -1)
        causal = self.config.attention_mode == "causal"
        mask = _build_attention_mask(attention_mask, causal, seq_len, past, hidden_states.device)
        return {
            "position_embeddings": self.rotary_emb(position_ids),
            "attention_mask": mask,
            # SDPA's own causal masking is only right when queries and keys are the same positions.
            "is_causal": causal and mask is None and past == 0 and seq_len > 1,
        }

    def forward_stacks(
        self, hidden_states: torch.Tensor, start: int = 0, stop: int | None = None, *, cache=None, **attention
    ) -> torch.Tensor:
        """Runs stacks `start` to `stop` (exclusive) over `hidden_states`, without the final norm.

        This is the seam the progressive trainer uses: the frozen trunk is `forward_stacks(h, 0, k)`
        and the trained part `forward_stacks(h, k)`; `attention` is the output of `attention_inputs`.
        """
        for stack in self.stacks[start:stop]:
            hidden_states = stack(hidden_states, cache=cache, **attention)
        return hidden_states

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training and self.config.attention_mode == "causal":
            cache = DynamicCache()
        if not use_cache:
            cache = None
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        attention = self.attention_inputs(hidden_states, attention_mask, position_ids, cache)
        all_hidden = [hidden_states] if output_hidden_states else None
        for stack in self.stacks:
            hidden_states = stack(hidden_states, cache=cache, **attention)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype))
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{_CACHE_FIELD: cache},
        )


def _build_attention_mask(attention_mask, causal: bool, seq_len: int, past: int, device) -> torch.Tensor | None:
    """A boolean (B, 1, T, past + T) mask, or None when SDPA's own `is_causal` (or no mask) is exact.

    Written here rather than through `transformers.masking_utils.create_causal_mask`, whose keyword
    arguments changed between transformers 5.17 and 5.24.
    """
    padding = attention_mask is not None and not bool(attention_mask.all())
    if not padding and (not causal or past == 0 or seq_len == 1):
        return None
    kv_len = past + seq_len
    if causal:
        q_pos = torch.arange(past, kv_len, device=device)[:, None]
        mask = (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, T, T_kv)
    else:
        mask = torch.ones(1, 1, seq_len, kv_len, dtype=torch.bool, device=device)
    if padding:
        mask = mask & attention_mask[:, None, None, -kv_len:].bool()
        # A padded query (left padding) would otherwise see no key at all and softmax to NaN; letting
        # every query see itself changes nothing for real tokens, which already see themselves.
        own_position = torch.arange(kv_len, device=device)[None, :] == torch.arange(past, kv_len, device=device)[:, None]
        mask = mask | own_position
    return mask


class StackWiseLMHeadModel(StackWisePreTrainedModel):
    """The rack plus an LM head over the final hidden states (weights tied when the config says so);
    the heads below differ in attention mode and loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    attention_mode: str  # the `config.attention_mode` a head requires

    def __init__(self, config: StackWiseConfig):
        super().__init__(config)
        if config.attention_mode != self.attention_mode:
            raise ValueError(
                f"{type(self).__name__} needs `attention_mode={self.attention_mode!r}`; got "
                f"{config.attention_mode!r} (StackWiseForCausalLM is causal, StackWiseForMaskedLM bidirectional)."
            )
        self.model = StackWiseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


class StackWiseForCausalLM(StackWiseLMHeadModel, GenerationMixin):
    """The rack with a causal LM head; generates with a KV cache.

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
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=kwargs.get("output_hidden_states"),
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
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
            output_hidden_states=kwargs.get("output_hidden_states"),
        )
        logits = self.lm_head(outputs.last_hidden_state.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = [
    "StackWisePreTrainedModel",
    "StackWiseModel",
    "StackWiseForCausalLM",
    "StackWiseForMaskedLM",
]
