"""Multi-head scaled dot-product attention, softmax(QK^T / sqrt(d_k)) V (Vaswani et al. 2017, section 3.2).

Runs on F.scaled_dot_product_attention so the flash / memory-efficient kernels are used where they apply.
Legend: B batch, T query positions, S key positions, D width, H heads, G key/value heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerConfig
from .positional import apply_rotary


def build_mask(
    q_len: int, k_len: int, *, causal: bool, window: int | None, padding_mask: Tensor | None, device: torch.device
) -> Tensor | None:
    """Boolean mask (B|1, 1, T, S), True = may attend. Queries are the last q_len of the k_len positions."""
    qi = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kj = torch.arange(k_len, device=device)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed = kj <= qi
    if window is not None:
        allowed = allowed & ((qi - kj).abs() < window)
    mask = allowed[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :].bool()
    # A query that sees no key (a padded position) would give NaN and poison later layers through V: let it see all.
    return mask | ~mask.any(dim=-1, keepdim=True)


def residual_projection(layer: nn.Linear) -> nn.Linear:
    """Tag a layer whose output is added to the residual stream (`init_weights` scales its init by 1/sqrt(2 depth)):
    decided where the layer is built, not by matching its name."""
    layer.residual_projection = True  # type: ignore[assignment]
    return layer


class Attention(nn.Module):
    """Self-attention with a fused QKV projection, or cross-attention (Q from x, K/V from the context)."""

    def __init__(self, cfg: TransformerConfig, cross: bool = False) -> None:
        super().__init__()
        self.cross, self.heads, self.kv_heads, self.head_dim = cross, cfg.heads, cfg.kv_heads or cfg.heads, cfg.head_dim
        kv_width = self.kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
            self.kv = nn.Linear(cfg.width, 2 * kv_width, bias=cfg.bias)
        else:
            self.qkv = nn.Linear(cfg.width, cfg.width + 2 * kv_width, bias=cfg.bias)
        self.proj = residual_projection(nn.Linear(cfg.width, cfg.width, bias=cfg.bias))
        # QK-norm over the head dim, one learnable scale shared by the heads. RMSNorm whatever `cfg.norm` is: it only
        # has to bound the logits' scale, and a LayerNorm's centring would remove one direction of each query/key.
        qk_norm = lambda: nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()  # noqa: E731
        self.q_norm, self.k_norm = qk_norm(), qk_norm()
        self.dropout = cfg.attention_dropout

    def _heads(self, x: Tensor, n: int) -> Tensor:  # (B, T, n*Dh) -> (B, n, T, Dh)
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        G, kv_width = self.kv_heads, self.kv_heads * self.head_dim
        if self.cross:  # encoder keys/values are computed once and kept in the cache while decoding
            q = self.q_norm(self._heads(self.q(x), self.heads))
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = (self._heads(t, G) for t in self.kv(context).split(kv_width, dim=-1))
                k = self.k_norm(k)
        else:
            q, k, v = self.qkv(x).split([x.shape[-1], kv_width, kv_width], dim=-1)
            q, k, v = self.q_norm(self._heads(q, self.heads)), self.k_norm(self._heads(k, G)), self._heads(v, G)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None and "k" in cache:  # incremental decoding: append this step's keys/values
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal, enable_gqa=self.heads != G
        )
        return self.proj(y.transpose(1, 2).flatten(2))  # (B, H, T, Dh) -> (B, T, D)
