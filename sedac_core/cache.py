"""A preallocated (static) KV cache that knows, per layer and position, whether the entry was computed by the
layer itself or filled in for a skipped layer (propagated, predicted), and can be rolled back."""

from __future__ import annotations

from typing import Any

import torch

FILL_EMPTY = 0
FILL_COMPUTED = 1
FILL_PROPAGATED = 2
FILL_GHOST = 3

_GROW = 256  # capacity grows in steps of this many positions


class StaticKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, capacity: int, max_capacity: int,
                 dtype: torch.dtype, device: Any, batch: int = 1) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.batch = batch
        self.max_capacity = max_capacity
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.fill = torch.zeros(num_layers, 0, dtype=torch.int8)
        self.length = 0  # positions 0..length-1 hold valid entries in every layer
        self.token_ids: list[int] = []  # the tokens whose entries are cached (for prefix reuse)
        self.ensure_capacity(capacity)

    def ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = min(self.max_capacity, -(-needed // _GROW) * _GROW)
        shape = (self.batch, self.num_kv_heads, new_cap, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        if self.capacity:
            for i in range(self.num_layers):
                new_k[i][:, :, : self.capacity] = self.keys[i]
                new_v[i][:, :, : self.capacity] = self.values[i]
        fill = torch.zeros(self.num_layers, new_cap, dtype=torch.int8)
        fill[:, : self.capacity] = self.fill
        self.keys, self.values, self.fill, self.capacity = new_k, new_v, fill, new_cap

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
              kind: int = FILL_COMPUTED) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, head_dim] at positions start..start+T-1; return the layer's full buffers."""
        end = start + k.shape[2]
        kb, vb = self.keys[layer], self.values[layer]
        kb[:, :, start:end] = k
        vb[:, :, start:end] = v
        self.fill[layer, start:end] = kind
        return kb, vb

    def truncate(self, length: int) -> None:
        """Forget positions >= length (rollback after rejected drafts, or before a new prompt)."""
        length = max(0, min(length, self.length))
        if length < self.capacity:
            with torch.inference_mode():  # the buffers are inference tensors (made inside the decode loop)
                self.fill[:, length:] = FILL_EMPTY
        self.length = length
        del self.token_ids[length:]

    def common_prefix(self, token_ids: list[int]) -> int:
        """How many leading positions can be reused for `token_ids`: same tokens, and computed by every layer
        (an entry filled in for a skipped layer is an approximation a later full-depth run must not inherit)."""
        n = 0
        for a, b in zip(self.token_ids, token_ids):
            if a != b:
                break
            n += 1
        n = min(n, self.length)
        if n:
            exact = (self.fill[:, :n] == FILL_COMPUTED).all(dim=0)
            if not bool(exact.all()):
                n = int((~exact).nonzero()[0, 0])
        return n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
