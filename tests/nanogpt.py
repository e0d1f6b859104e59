"""A plain-PyTorch nanoGPT-style decoder with its own RoPE (complex multiply), GQA and a
static KV cache: the passes must handle models that are not Hugging Face ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NanoGPTConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 256
    max_len: int = 128


def rope_frequencies(head_dim: int, max_len: int) -> torch.Tensor:
    """Complex rotations ``exp(i * pos * theta_j)``, ``[max_len, head_dim // 2]``."""
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), theta)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x[B,H,S,D]`` by ``freqs[B,S,D/2]`` as complex numbers (pairs (2j, 2j+1))."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, None]).flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: NanoGPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, freqs, positions, key_mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, *(2 * [self.n_kv_head *
                                                                     self.head_dim])], -1)
        q = q.view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        # key_mask[B,S,N]: True where a query may attend a key (causal and not padding).
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache,
                                           attn_mask=key_mask[:, None], enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, cfg: NanoGPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 2 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(2 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, freqs, positions, key_mask):
        x = x + self.attn(self.ln1(x), freqs, positions, key_mask)
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    def __init__(self, cfg: NanoGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.register_buffer("freqs", rope_frequencies(cfg.n_embd // cfg.n_head, cfg.max_len),
                             persistent=False)

    def setup_cache(self, batch: int) -> None:
        """Allocate a static KV cache for ``batch`` rows (zeros: masked until written)."""
        for block in self.blocks:
            a = block.attn
            shape = (batch, a.n_kv_head, self.cfg.max_len, a.head_dim)
            a.k_cache, a.v_cache = torch.zeros(shape), torch.zeros(shape)

    def forward(self, ids, positions, rope_positions, key_mask):
        """``ids[B,S]`` at cache slots ``positions[S]``, RoPE positions ``rope_positions[B,S]``
        (left padding shifts them), ``key_mask[B,S,N]``. Returns logits ``[B,S,V]``."""
        x = self.wte(ids)
        freqs = self.freqs[rope_positions]
        for block in self.blocks:
            x = block(x, freqs, positions, key_mask)
        return self.head(self.ln_f(x))


@torch.no_grad()
def greedy_generate(model, step, ids, attention_mask, new_tokens):
    """Greedy decode with the static cache: prefill eagerly, then ``step`` (e.g. a compiled
    ``model``) per token. Returns ``(tokens[B, new_tokens], logits[B, new_tokens, V])``."""
    batch, prompt = ids.shape
    n = model.cfg.max_len
    model.setup_cache(batch)
    valid = torch.zeros(batch, n, dtype=torch.bool)
    valid[:, :prompt] = attention_mask.bool()
    rope_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(prompt, n, dtype=torch.bool).tril()
    # A padding query attends itself only, so no row is empty (SDPA would give NaN).
    allowed = causal[None] & valid[:, None] | torch.eye(prompt, n, dtype=torch.bool)
    logits = model(ids, torch.arange(prompt), rope_pos, allowed)[:, -1]
    tokens, all_logits = [], []
    for i in range(new_tokens):
        tokens.append(logits.argmax(-1))
        all_logits.append(logits)
        pos = prompt + i
        valid[:, pos] = True
        rope_pos = rope_pos[:, -1:] + 1
        logits = step(tokens[-1][:, None], torch.tensor([pos]), rope_pos, valid[:, None].clone())
        logits = logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)
