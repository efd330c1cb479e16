"""Key/value caches for `generate` on CPU, where a decode step is bound by reading the cache.

- `GrowingCache`: Hugging Face's `DynamicCache` appends each decoded position with `torch.cat`,
  copying the whole cache every step (most of a decode step at batch 128 on this project's 2-core
  machine; docs/findings.md, "Where the time goes"). `StaticCache` avoids the copy but attends
  over its full length from the first step. Here each layer keeps its states in a buffer that
  doubles when full, so a step writes one position and attention reads only what was written.
- `SharedPrefixCache`: n samples of one prompt share its keys and values (image and question,
  about half of a chain's positions here). They are stored once per prompt, not n times, and
  attention reads them once for all n queries ("cascade" attention), with each sample's own
  continuation read from its own rows; one softmax spans both.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

MIN_GROWTH = 64  # positions added at least, when a buffer grows
SHARED_PREFIX_MODELS = ("llava", "llava_next", "idefics3", "internvl")  # VLMs whose positions are 1-D
SHARED_TEXT_MODELS = ("llama", "qwen2")  # text attentions `cascade_attention` is tested equal to


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` whose `keys` / `values` are views of a larger buffer."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self._written()
        end = start + key_states.shape[-2]
        self._reserve(key_states, value_states, start, end)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _written(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def _owns_states(self) -> bool:
        """Whether `keys` is still a view of the buffer: `generate` and beam reordering may
        replace it (batch repeats, row selection, reset), and then the buffer is rebuilt."""
        buffer = self._key_buffer
        return (buffer is not None and self.keys is not None and self.keys.numel() > 0
                and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.shape[:-2] == buffer.shape[:-2])

    def _reserve(self, key_states, value_states, start: int, end: int) -> None:
        owned = self._owns_states()
        if owned and self._key_buffer.shape[-2] >= end:
            return
        capacity = max(end, 2 * start, start + MIN_GROWTH)
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if start:
            keys[..., :start, :] = self.keys
            values[..., :start, :] = self.values
        self._key_buffer, self._value_buffer = keys, values


class GrowingCache(DynamicCache):
    """`DynamicCache` for a model's config with every plain dynamic layer growing in place
    (sliding-window and other special layers are kept as the config asks)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer
                       for layer in self.layers]


SHARED_ATTENTION = "chainstep_shared_prefix"
_ACTIVE: ContextVar[SharedPrefixCache | None] = ContextVar("shared_prefix_cache", default=None)


class SharedPrefixLayer(GrowingLayer):
    """One prompt's prefix states per group of n rows, and each row's own continuation."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, n: int):
        super().__init__()
        self.prefix_keys, self.prefix_values, self.n = prefix_keys, prefix_values, n

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self._written()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prefix cache is already expanded to its samples")

    batch_select_indices = reorder_cache = crop = batch_repeat_interleave


class SharedPrefixCache(DynamicCache):
    """A prefilled `GrowingCache` of one row per prompt, expanded to n samples per prompt
    without copying the prompt's states. Generate with it inside `shared_attention(model)`."""

    def __init__(self, prefilled: GrowingCache, n: int):
        if not can_share(prefilled):
            raise ValueError("only plain dynamic layers can share a prefix")
        DynamicCache.__init__(self)
        self.layers = [SharedPrefixLayer(layer.keys, layer.values, n) for layer in prefilled.layers]
        self.layer_class_to_replicate = None


def sharing_refusal(config) -> str | None:
    """Why a model must not take the shared-prefix path, or None when it may. `cascade_attention`
    is plain scaled softmax attention: a text model that caps logits, attends through a sliding
    window or adds attention sinks would be silently wrong on it, and so would a VLM whose
    positions depend on the whole sequence (Qwen2-VL's multimodal rotary positions)."""
    text = config.get_text_config()
    if config.model_type not in SHARED_PREFIX_MODELS:
        return f"{config.model_type} positions depend on the whole sequence"
    if text.model_type not in SHARED_TEXT_MODELS:
        return f"its text model ({text.model_type}) is not one the shared-prefix attention is tested on"
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "final_logit_softcapping", None):
        return "its text model caps attention logits (softcap)"
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()) or (
            getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None)):
        return "its text model attends through a sliding window"
    return None


def can_share(cache: DynamicCache) -> bool:
    return all(isinstance(layer, GrowingLayer) and layer.keys is not None for layer in cache.layers)


@contextmanager
def shared_attention(model, cache: SharedPrefixCache):
    """Route `model`'s attention through `cascade_attention` for `cache` while inside."""
    previous = model.config._attn_implementation
    token = _ACTIVE.set(cache)
    model.set_attn_implementation(SHARED_ATTENTION)
    try:
        if model.config.get_text_config()._attn_implementation != SHARED_ATTENTION:
            # attention over the continuation alone would silently drop the prompt
            raise RuntimeError(f"{type(model).__name__} cannot switch its attention function")
        yield
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of n samples per prompt over [shared prefix | own continuation].

    query [B, H, q, D] with B = groups x n; key/value [B, Hkv, S, D] (the continuations); the
    prefix [groups, Hkv, P, D]. Grouped-query heads are read without repeating states."""
    if any(kwargs.get(k) is not None for k in ("softcap", "sliding_window", "s_aux")):
        raise RuntimeError("shared-prefix attention got softcap, sliding_window or s_aux; "
                           "`sharing_refusal` should have kept this model off it")
    layer = _ACTIVE.get().layers[module.layer_idx]
    prefix_keys, prefix_values, n = layer.prefix_keys, layer.prefix_values, layer.n
    batch, heads, q, dim = query.shape
    groups, kv_heads, prefix = prefix_keys.shape[0], prefix_keys.shape[1], prefix_keys.shape[-2]
    rep = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling

    # [B, H, q, D] -> [groups, Hkv, n * rep * q, D]: every query of a group against its prefix
    grouped = query.view(groups, n, kv_heads, rep, q, dim).permute(0, 2, 1, 3, 4, 5)
    grouped = grouped.reshape(groups, kv_heads, n * rep * q, dim)
    prefix_scores = (grouped @ prefix_keys.transpose(-1, -2)).view(groups, kv_heads, n, rep, q, prefix)
    prefix_scores = prefix_scores.permute(0, 2, 1, 3, 4, 5).reshape(batch, heads, q, prefix)
    own = query.view(batch, kv_heads, rep * q, dim) @ key.transpose(-1, -2)
    scores = torch.cat([prefix_scores, own.view(batch, heads, q, -1)], -1) * scaling
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    elif q > 1:
        scores = scores.masked_fill(_causal(q, scores.shape[-1], query.device), float("-inf"))
    probs = scores.softmax(-1).to(value.dtype)

    prefix_probs = probs[..., :prefix].reshape(groups, n, kv_heads, rep, q, prefix).permute(0, 2, 1, 3, 4, 5)
    prefix_out = prefix_probs.reshape(groups, kv_heads, n * rep * q, prefix) @ prefix_values
    prefix_out = prefix_out.view(groups, kv_heads, n, rep, q, dim).permute(0, 2, 1, 3, 4, 5)
    own_out = probs[..., prefix:].reshape(batch, kv_heads, rep * q, -1) @ value
    out = prefix_out.reshape(batch, heads, q, dim) + own_out.view(batch, heads, q, dim)
    return out.transpose(1, 2).contiguous(), None


def _causal(q: int, kv: int, device) -> torch.Tensor:
    """True where a query may not look: later positions of its own block."""
    return torch.ones(q, kv, dtype=torch.bool, device=device).triu(kv - q + 1)


AttentionInterface.register(SHARED_ATTENTION, cascade_attention)
AttentionMaskInterface.register(SHARED_ATTENTION, sdpa_mask)
