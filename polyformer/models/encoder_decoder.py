"""Encoder-decoder transformer (Vaswani et al. 2017, "Attention Is All You Need"): a bidirectional encoder over the
source, a causal decoder with cross-attention to the encoder's output, token embeddings scaled by sqrt(D) and tied
with the output projection (section 3.4), and with the source embedding too under one joint vocabulary.

Plain PyTorch: `polyformer.tasks.translation.Translation` trains it (label-smoothed loss, BLEU / chrF, greedy and
beam-search decoding on the KV cache, tokenizers in checkpoints). The model knows no tokenizer: callers pass the
source padding mask (True at real tokens).

Legend: B batch, S source positions, T target positions, D width, V target vocabulary, Vs source vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from polyformer.backbone import Cache, TokenEmbedding, Transformer, TransformerConfig


@dataclass
class EncoderDecoderConfig:
    # Both stacks' layout; `causal` and `cross_attention` are set per side (encoder: neither, decoder: both), so the
    # backbone's own values of those two are not used.
    backbone: TransformerConfig
    vocab_size: int  # target side, and the output projection's rows
    source_vocab_size: int
    decoder_depth: int | None = None  # None = backbone.depth
    tie_encoder_embedding: bool = True  # the source embedding is the target one (needs one joint vocabulary)

    def __post_init__(self) -> None:
        if self.decoder_depth is None:
            self.decoder_depth = self.backbone.depth
        if self.vocab_size < 1 or self.source_vocab_size < 1:
            raise ValueError(
                f"model.vocab_size and model.source_vocab_size must be >= 1, got {self.vocab_size} and "
                f"{self.source_vocab_size}"
            )
        if self.decoder_depth < 1:
            raise ValueError(f"model.decoder_depth must be >= 1 (or unset: backbone.depth), got {self.decoder_depth}")
        if self.tie_encoder_embedding and self.source_vocab_size != self.vocab_size:
            raise ValueError(
                f"model.tie_encoder_embedding needs one vocabulary, but source_vocab_size={self.source_vocab_size} "
                f"and vocab_size={self.vocab_size}; set model.tie_encoder_embedding=false or data.shared_vocab=true"
            )

    @property
    def encoder(self) -> TransformerConfig:
        return dataclasses.replace(self.backbone, causal=False, cross_attention=False)

    @property
    def decoder(self) -> TransformerConfig:
        return dataclasses.replace(self.backbone, depth=self.decoder_depth, causal=True, cross_attention=True)


class EncoderDecoder(nn.Module):
    """(B, S) source ids + (B, T) target ids -> (B, T, V) next-token logits."""

    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.backbone.width
        # Encoder, decoder, target embedding, then an untied source embedding: the order the translation task built
        # them in before this class existed, so the RNG is drawn alike (seeded runs, the golden curve) and the
        # state-dict keys are the task's old ones under `model.`.
        self.encoder = Transformer(cfg.encoder)
        self.decoder = Transformer(cfg.decoder)
        self.target_embed = TokenEmbedding(cfg.vocab_size, d, scale=True)
        # With the sqrt(D) input scale, N(0, D^-1/2) gives unit-scale inputs and unit-scale tied logits (fairseq's).
        nn.init.normal_(self.target_embed.weight, std=d**-0.5)
        self.source_embed = self.target_embed
        if not cfg.tie_encoder_embedding:
            self.source_embed = TokenEmbedding(cfg.source_vocab_size, d, scale=True)
            nn.init.normal_(self.source_embed.weight, std=d**-0.5)

    def encode(self, source: Tensor, source_padding_mask: Tensor) -> Tensor:  # (B, S), (B, S) -> memory (B, S, D)
        """The encoder's output; `source_padding_mask` (B, S) is True at real tokens."""
        return self.encoder(self.source_embed(source), padding_mask=source_padding_mask)

    def decode(
        self,
        tokens: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:  # (B, T) -> logits (B, T, V)
        """Logits for `tokens` (B, T), the target tokens not yet in `cache`, attending to `memory` (B, S, D) where
        `memory_mask` (B, S) is True. `padding_mask` (B, cached + T) True at real target tokens; `positions` (B|1, T)
        default to counting on from the cache; `cache` from `new_cache()`, extended in place (it keeps the
        cross-attention keys and values of `memory` after the first call)."""
        x = self.decoder(
            self.target_embed(tokens), padding_mask, positions, memory=memory, memory_padding_mask=memory_mask,
            cache=cache,
        )  # fmt: skip
        return x @ self.target_embed.weight.T  # the tied output projection

    def forward(self, source: Tensor, source_padding_mask: Tensor, target_in: Tensor) -> Tensor:
        """(B, S) source ids, (B, S) True at real source tokens, (B, T) decoder inputs -> (B, T, V) logits."""
        memory = self.encode(source, source_padding_mask)
        # Right padding in the target needs no mask: causal attention never lets a real token see later padding.
        return self.decode(target_in, memory, source_padding_mask)

    def new_cache(self) -> Cache:
        """An empty KV cache for `decode(..., cache=)`: one dict per decoder block, filled as tokens are decoded."""
        return self.decoder.new_cache()

    def training_flops(self, batch: int, source_len: int, target_len: int) -> float:
        """Forward + backward FLOPs of `batch` pairs of `source_len` source and `target_len` target positions: both
        stacks', and 6 per weight of the tied output projection per target position (the embeddings are lookups).
        From the declared sizes, not `weight.numel()`, which under FSDP is one rank's shard."""
        head = 6.0 * self.cfg.vocab_size * self.cfg.backbone.width * batch * target_len
        encoder = self.encoder.training_flops(batch, source_len)
        return encoder + self.decoder.training_flops(batch, target_len, memory=source_len) + head
