"""A key/value cache that grows in place, for `generate` on CPU.

Hugging Face's `DynamicCache` appends each decoded position with `torch.cat`, copying the whole
cache every step: at batch 128 on this project's 2-core machine that copy was ~80% of a decode
step (docs/findings.md, "Where the time goes"). `StaticCache` avoids the copy but attends over
its full length from the first step. Here each layer keeps its states in a buffer that doubles
when full, so a step writes one position and attention reads only the positions written.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_GROWTH = 64  # positions added at least, when a buffer grows


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` whose `keys` / `values` are views of a larger buffer."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        self._reserve(key_states, value_states, start, end)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

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
