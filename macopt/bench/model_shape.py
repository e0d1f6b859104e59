"""The decoder shape the end-to-end benchmark builds (:mod:`.e2e`) or reads from a local
model (:mod:`.e2e_model`), and the cache rounding both use."""

from __future__ import annotations

import dataclasses

CACHE_ROUNDING = 256  # static caches are allocated in multiples of this many tokens


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama configuration (Llama-3.1-8B by default)."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0

    def parameters(self) -> int:
        """Weights of the model (tied embeddings not assumed: embedding and head)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return 2 * self.vocab * self.hidden + self.layers * (attention + mlp + 2 * self.hidden)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """K and V bytes of one token over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize
