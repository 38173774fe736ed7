"""What KV cache one rank's model stage needs: shape per layer, bytes per page, allocation.

The worker sizes its cache from a memory budget with :meth:`KVCacheSpec.bytes_per_page`
and allocates it once with :meth:`KVCacheSpec.allocate`; the model then receives the
tensors through ``bind_kv_cache``. Page ids mean the same tokens on every rank; each
rank stores only its own KV heads of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Multi-head (MHA/GQA) cache: per layer ``[2, pages, page_size, kv_heads, head_dim]``.

    Attributes:
        num_layers: attention layers on this pipeline stage.
        num_kv_heads: KV heads this tp rank stores per layer.
        head_dim: size of one head.
        dtype: element type of the cache.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def page_shape(self, page_size: int) -> tuple[int, ...]:
        """Shape of one page of one layer, keys and values together."""
        return (2, page_size, self.num_kv_heads, self.head_dim)

    def bytes_per_page(self, page_size: int) -> int:
        """Bytes one page takes across all local layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_layer = 2 * page_size * self.num_kv_heads * self.head_dim * elem
        return per_layer * self.num_layers

    def allocate(
        self, num_pages: int, page_size: int, device: torch.device | str
    ) -> list[torch.Tensor]:
        """One zeroed cache tensor per local layer."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"need at least one page of at least one token, got "
                f"num_pages={num_pages}, page_size={page_size}"
            )
        shape = (2, num_pages, page_size, self.num_kv_heads, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]
