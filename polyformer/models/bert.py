"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers"): the shared backbone as a
bidirectional encoder under token + position + token-type embeddings, with a masked-LM head and a [CLS] pooler.

BERT itself is post-LN (`backbone.prenorm=false`): the embeddings are normalised before the first block and every
block ends in its norm. A pre-LN encoder (`prenorm=true`, with the backbone's final norm) drops the embedding norm,
since each block normalises its own input. Learned positions are added here, with the token embeddings and before the
embedding norm (where BERT adds them), so the backbone is built with `position="none"`; any other position kind is
the backbone's own. The MLM head is dense -> activation -> norm -> a decoder tied to the token embedding plus a bias.

`BertForMaskedLM` is trained by `polyformer.tasks.masked_lm`, `BertForSequenceClassification` by
`polyformer.tasks.sequence_classification`; `polyformer.weights.bert` loads Hugging Face BERT weights into both.
Legend: B batch, T positions, D width, V vocabulary, Vp vocabulary padded to a multiple of 64, K classes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polyformer.backbone import TokenEmbedding, Transformer, TransformerConfig, weight_count
from polyformer.backbone.layers import ACTIVATIONS, make_norm
from polyformer.backbone.positional import LearnedPositions


def check_encoder(backbone: TransformerConfig) -> None:
    """ValueError unless `backbone` is a bidirectional stack without cross-attention (what BERT reads with)."""
    if backbone.causal or backbone.cross_attention:
        raise ValueError(
            f"BERT needs a bidirectional encoder: set model.backbone.causal=false and "
            f"model.backbone.cross_attention=false (got causal={backbone.causal}, "
            f"cross_attention={backbone.cross_attention})"
        )
    if backbone.activation == "swiglu":
        raise ValueError("BERT's MLM head applies model.backbone.activation alone: choose one other than swiglu")


@dataclass
class BertConfig:
    backbone: TransformerConfig
    vocab_size: int
    type_vocab_size: int = 2  # segment A / B (BERT's sentence pairs); single texts use type 0
    num_classes: int | None = None  # sequence classification only

    def __post_init__(self) -> None:
        check_encoder(self.backbone)
        if self.vocab_size < 1 or self.type_vocab_size < 1:
            raise ValueError(
                f"model.vocab_size and model.type_vocab_size must be >= 1, got {self.vocab_size}, "
                f"{self.type_vocab_size}"
            )
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {self.num_classes}")

    @property
    def padded_vocab_size(self) -> int:
        """Embedding (and tied decoder) rows: a multiple of 64; logits past `vocab_size` are cut off."""
        return 64 * math.ceil(self.vocab_size / 64)


class BertEncoder(nn.Module):
    """(B, T) token ids -> (B, T, D) hidden states."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        b, width = cfg.backbone, cfg.backbone.width
        self.embed = TokenEmbedding(cfg.padded_vocab_size, width)
        learned = b.position == "learned"
        self.positions = LearnedPositions(width, b.max_len) if learned else None
        self.token_types = nn.Embedding(cfg.type_vocab_size, width)
        self.embed_norm = nn.Identity() if b.prenorm else make_norm(b)
        self.backbone = Transformer(dataclasses.replace(b, position="none") if learned else b)
        for table in (self.token_types.weight, *([self.positions.weight] if learned else [])):
            nn.init.normal_(table, std=0.02)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None, token_types: Tensor | None = None) -> Tensor:
        """`padding_mask` (B, T) True at real tokens; `token_types` (B, T), default all 0."""
        T = tokens.shape[1]
        x = self.embed(tokens)
        if self.positions is not None:
            x = x + self.positions(torch.arange(T, device=tokens.device)[None], end=T)
        types = token_types if token_types is not None else torch.zeros_like(tokens)
        x = self.embed_norm(x + self.token_types(types))
        return self.backbone(x, padding_mask=padding_mask)  # (B, T, D)


class MaskedLMHead(nn.Module):
    """(B, T, D) -> (B, T, Vp): act(dense(h)) normalised, then the token embedding's transpose plus a bias."""

    def __init__(self, cfg: BertConfig, embedding: nn.Parameter) -> None:
        super().__init__()
        width = cfg.backbone.width
        self.dense = nn.Linear(width, width)
        self.act = ACTIVATIONS[cfg.backbone.activation]()
        self.norm = make_norm(cfg.backbone)
        self.decoder = nn.Linear(width, cfg.padded_vocab_size)
        self.decoder.weight = embedding  # tied (Press & Wolf 2017), as BERT's
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class BertForMaskedLM(nn.Module):
    """(B, T) token ids -> (B, T, V) logits of the original token at every position."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = BertEncoder(cfg)
        self.head = MaskedLMHead(cfg, self.bert.embed.weight)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None, token_types: Tensor | None = None) -> Tensor:
        return self.head(self.bert(tokens, padding_mask, token_types))[..., : self.cfg.vocab_size]

    def training_flops(self, batch: int, length: int) -> float:
        """Forward + backward FLOPs: the backbone's and 6 per head weight (dense and decoder) per position."""
        head = weight_count(self.head.dense) + weight_count(self.head.decoder)
        return self.bert.backbone.training_flops(batch, length) + 6.0 * head * batch * length


class BertForSequenceClassification(nn.Module):
    """(B, T) token ids -> (B, K) class logits from the pooled [CLS] state, tanh(W h_0 + b), through dropout and a
    linear classifier. The pooler lives here, not in the encoder: masked-LM pre-training never trains it (BERT's
    next-sentence task did, which is left out), and an unused parameter would stop DDP."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.num_classes is None:
            raise ValueError("BertForSequenceClassification needs model.num_classes")
        self.cfg = cfg
        self.bert = BertEncoder(cfg)
        self.pooler = nn.Linear(cfg.backbone.width, cfg.backbone.width)
        self.drop = nn.Dropout(cfg.backbone.dropout)
        self.classifier = nn.Linear(cfg.backbone.width, cfg.num_classes)
        for layer in (self.pooler, self.classifier):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None, token_types: Tensor | None = None) -> Tensor:
        return self.classifier(self.drop(self.pooled(tokens, padding_mask, token_types)))

    def pooled(self, tokens: Tensor, padding_mask: Tensor | None = None, token_types: Tensor | None = None) -> Tensor:
        """(B, T) -> (B, D): the [CLS] position's final state through the pooler."""
        return torch.tanh(self.pooler(self.bert(tokens, padding_mask, token_types)[:, 0]))

    def training_flops(self, batch: int, length: int) -> float:
        """Forward + backward FLOPs: the backbone's; the pooler and classifier act on one position (negligible)."""
        return self.bert.backbone.training_flops(batch, length)
