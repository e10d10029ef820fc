"""Feed-forward network, norms and the residual block (Vaswani et al. 2017, sections 3.1 and 3.3).

Legend: B batch, T positions, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, residual_projection
from .config import TransformerConfig


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer"; the modded-nanoGPT speedruns): sparse like ReLU, smooth at 0."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu2": ReLUSquared,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # GPT-2's; slow on CPU, keep it for faithful weights
    "quick_gelu": QuickGELU,
}


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, d -> hidden -> d; SwiGLU gates the hidden layer (Shazeer 2020)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden * (2 if self.gated else 1), bias=cfg.bias)
        self.act = nn.Identity() if self.gated else ACTIVATIONS[cfg.activation]()
        self.fc2 = residual_projection(nn.Linear(cfg.mlp_hidden, cfg.width, bias=cfg.bias))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.fc2(self.act(h))


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=cfg.bias)


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p, scale survivors by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Self-attention, optional cross-attention and FFN sublayers, each residual, pre-LN or post-LN."""

    def __init__(self, cfg: TransformerConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.cross_norm = make_norm(cfg) if cfg.cross_attention else None
        self.cross_attn = Attention(cfg, cross=True) if cfg.cross_attention else None
        self.norm2, self.mlp = make_norm(cfg), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def sublayer(self, x: Tensor, norm: nn.Module, fn) -> Tensor:
        if self.prenorm:  # x + f(LN(x))
            return x + self.drop_path(self.drop(fn(norm(x))))
        return norm(x + self.drop_path(self.drop(fn(x))))  # the paper: LN(x + f(x))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: dict[str, dict[str, Tensor]] | None = None,
    ) -> Tensor:
        own, cross = (None, None) if cache is None else (cache.setdefault("self", {}), cache.setdefault("cross", {}))
        x = self.sublayer(x, self.norm1, lambda h: self.attn(h, mask=mask, is_causal=is_causal, rope=rope, cache=own))
        if self.cross_attn is not None:
            x = self.sublayer(x, self.cross_norm, lambda h: self.cross_attn(h, memory, mask=memory_mask, cache=cross))
        return self.sublayer(x, self.norm2, self.mlp)
