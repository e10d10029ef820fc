"""GPT-style decoder-only language model (Radford et al. 2018/2019): token embedding, a causal backbone, and an
output head tied with the embedding (Press & Wolf 2017) unless `tie_embeddings=False`, optionally soft-capped,
logits = c tanh(logits / c) (Gemma 2, Team et al. 2024).

Plain PyTorch: `polyformer.tasks.language_model.LanguageModel` trains it (next-token loss, bits per byte, sampling
with the KV cache); `polyformer.weights.gpt2` loads Hugging Face GPT-2 weights into it.

Legend: B batch, T positions, D width, V vocabulary, Vp vocabulary padded to a multiple of 64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polyformer.backbone import Cache, TokenEmbedding, Transformer, TransformerConfig, weight_count


def check_decoder_only(backbone: TransformerConfig) -> None:
    """ValueError unless `backbone` is a causal stack without cross-attention (what next-token prediction needs).
    `GPTConfig` checks it; the task calls it too, so a wrong preset fails before the data is prepared."""
    if not backbone.causal or backbone.cross_attention:
        raise ValueError(
            f"a language model needs a causal decoder-only backbone: set model.backbone.causal=true and "
            f"model.backbone.cross_attention=false (got causal={backbone.causal}, "
            f"cross_attention={backbone.cross_attention})"
        )


@dataclass
class GPTConfig:
    backbone: TransformerConfig
    vocab_size: int
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    # Logits squashed smoothly into (-c, c): no token's logit can run away, which keeps the loss stable late in
    # training; ~c for small logits (tanh(x) ~ x), so it barely changes a model whose logits stay well below c.
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        check_decoder_only(self.backbone)
        if self.vocab_size < 1:
            raise ValueError(f"model.vocab_size must be >= 1, got {self.vocab_size}")
        if self.logit_softcap is not None and not (math.isfinite(self.logit_softcap) and self.logit_softcap > 0):
            raise ValueError(f"model.logit_softcap must be a finite number > 0 or None (off), got {self.logit_softcap}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head: a multiple of 64 for aligned matmuls; logits beyond `vocab_size` are
        cut off in `forward`, so they are never predicted."""
        return 64 * math.ceil(self.vocab_size / 64)


class GPT(nn.Module):
    """(B, T) token ids -> (B, T, V) next-token logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        padded, width = cfg.padded_vocab_size, cfg.backbone.width
        # Embedding, backbone, head, in this order: the order the RNG is drawn in (and the state-dict keys) of the
        # task that built them before, so seeded runs and the golden curve are unchanged.
        self.embed = TokenEmbedding(padded, width)
        self.backbone = Transformer(cfg.backbone)
        self.head = nn.Linear(width, padded, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    def forward(
        self,
        tokens: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:  # (B, T) -> (B, T, V)
        """`padding_mask` (B, S) True at real tokens, S = cached + new positions; `positions` (B|1, T), given for
        left-padded prompts (default: counting on from the cache); `cache` from `new_cache()` for incremental
        decoding (the keys and values of earlier calls, extended in place)."""
        h = self.backbone(self.embed(tokens), padding_mask=padding_mask, positions=positions, cache=cache)
        logits = self.head(h)[..., : self.cfg.vocab_size]
        if (cap := self.cfg.logit_softcap) is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def new_cache(self) -> Cache:
        """An empty KV cache for `forward(..., cache=)`: one dict per block, filled as tokens are decoded."""
        return self.backbone.new_cache()

    def training_flops(self, batch: int, length: int) -> float:
        """Forward + backward FLOPs of `batch` sequences of `length` input tokens: the backbone's, and 6 per head
        weight per position (the embedding is a lookup, no FLOPs)."""
        return self.backbone.training_flops(batch, length) + 6.0 * weight_count(self.head) * batch * length
