"""Configuration of the shared transformer (Vaswani et al. 2017, "Attention Is All You Need").

Defaults follow the paper where it applies (dropout 0.1, FFN 4d, sinusoidal positions); pre-LN is the default
because it trains without the paper's careful warmup (Xiong et al. 2020), post-LN is one flag away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Activation = Literal["relu", "relu2", "gelu", "gelu_tanh", "quick_gelu", "swiglu"]  # relu2 = relu(x)^2
Norm = Literal["layernorm", "rmsnorm"]
Position = Literal["sinusoidal", "learned", "rotary", "none"]


@dataclass
class TransformerConfig:
    """A stack of transformer blocks. Encoder, decoder-only and encoder-decoder decoder are settings of this."""

    width: int = 512  # d_model
    depth: int = 6
    heads: int = 8
    kv_heads: int | None = None  # grouped-query attention: fewer key/value heads; None = heads (plain MHA)
    mlp_ratio: float = 4.0  # FFN hidden = mlp_ratio * width (the paper: 2048 / 512)
    activation: Activation = "gelu"  # exact GELU: ~5x faster than tanh-GELU on CPU; "relu" is the paper's
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True  # False = the paper's post-LN
    final_norm: bool = True  # a last norm after a pre-LN stack (GPT-2, ViT); post-LN stacks end normalised anyway
    dropout: float = 0.1  # on embeddings and residual branches
    attention_dropout: float = 0.0  # on attention weights
    drop_path: float = 0.0  # stochastic depth (Huang et al. 2016): rate of the last block, 0 -> rate over depth
    bias: bool = True
    position: Position = "sinusoidal"
    max_len: int = 1024  # learned positions: table size; sinusoidal: precomputed (longer inputs still work)
    rope_base: float = 10000.0
    causal: bool = False
    cross_attention: bool = False  # decoder of an encoder-decoder model
    window: int | None = None  # sliding-window (local) attention: each query sees the last `window` keys
    # RMSNorm of each head's queries and keys before rotary and the dot product (Dehghani et al. 2023, OLMo 2):
    # bounds the attention logits, which otherwise grow with the weights and spike the loss at high lr.
    qk_norm: bool = False
    # LayerScale (Touvron et al. 2021 "Going deeper with Image Transformers"; DeiT III): every residual branch times a
    # learned per-channel gamma starting at this value, x + gamma * f(x), so a deep stack starts near the identity.
    # DeiT III: 1e-4 for deep models, 0.1 for small ones. None = off (no parameters).
    layer_scale: float | None = None

    def __post_init__(self) -> None:
        for name, kind in (("activation", Activation), ("norm", Norm), ("position", Position)):
            if (value := getattr(self, name)) not in get_args(kind):
                raise ValueError(f"TransformerConfig.{name} must be one of {get_args(kind)}, got {value!r}")
        for name in ("width", "depth", "heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(
                f"TransformerConfig.width ({self.width}) must be divisible by heads ({self.heads}); "
                f"e.g. heads in {[h for h in range(1, 33) if self.width % h == 0]}"
            )
        kv = self.kv_heads or self.heads
        if kv < 1 or self.heads % kv:
            raise ValueError(f"TransformerConfig.kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.position == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got width/heads = {self.head_dim}")
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"TransformerConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"TransformerConfig.window must be >= 1 or None, got {self.window}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise ValueError(f"TransformerConfig.layer_scale must be > 0 or None, got {self.layer_scale}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.width)
