"""Encoder-decoder sequence-to-sequence (Vaswani et al. 2017): translation and T5-style text-to-text tasks.

Encoder and decoder are the shared `Transformer` (bidirectional; causal with cross-attention); token embeddings are
scaled by sqrt(d) and tied with the output projection (section 3.4), and with the encoder's under a joint BPE.
Training: label-smoothed cross-entropy (Szegedy et al. 2016; eps = 0.1 in the paper). Decoding: greedy or beam
search with the GNMT length penalty (Wu et al. 2016) from `polyformer.decoding`, on the KV cache. Evaluation:
sacreBLEU BLEU and chrF on detokenized text (Post 2018), gathered over all ranks, with the metric signature.

Legend: B batch, S source positions, T target positions, K beam size, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from sacrebleu.metrics import BLEU, CHRF
from torch import Tensor, nn
from torchmetrics import MeanMetric

from polyformer.backbone import Cache, TokenEmbedding, Transformer, TransformerConfig
from polyformer.data.tokenizers import Tokenizer
from polyformer.decoding import Decoder, beam_search, sample
from polyformer.tasks.base import OptimizerConfig, TaskModule


@dataclass
class DecodingConfig:
    beam_size: int = 4  # 1 = greedy
    length_penalty: float = 0.6  # GNMT alpha: score / ((5 + len) / 6) ** alpha
    max_len_a: float = 1.5  # hypotheses stop at a * source_len + b tokens
    max_len_b: int = 10

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"decoding.beam_size must be >= 1, got {self.beam_size}")
        if self.max_len_a < 0 or self.max_len_b < 1:
            raise ValueError(
                f"decoding.max_len_a must be >= 0 and max_len_b >= 1, got {self.max_len_a}, {self.max_len_b}"
            )


def paper_optimizer() -> OptimizerConfig:
    """Section 5.3: Adam (0.9, 0.98, 1e-9), lr = d^-0.5 min(step^-0.5, step warmup^-1.5), warmup 4000; no decay."""
    return OptimizerConfig(lr=7e-4, weight_decay=0.0, schedule="inverse_sqrt", warmup_steps=4000)


def label_smoothed_nll(logits: Tensor, target: Tensor, smoothing: float, ignore_index: int) -> Tensor:
    """Mean over non-pad targets of (1 - eps) * -log p(y) + eps * mean_v -log p(v)."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(), target.flatten(), ignore_index=ignore_index, label_smoothing=smoothing
    )


class Translation(TaskModule):
    data_links = ("vocab_size", "source_vocab_size")
    architecture_hparams = ("backbone", "decoder_depth", "vocab_size", "source_vocab_size", "tie_encoder_embedding")

    def __init__(
        self,
        backbone: TransformerConfig | None = None,  # both stacks; the task sets causal / cross-attention per side
        decoder_depth: int | None = None,  # None = backbone.depth
        vocab_size: int | None = None,  # target side; linked from the data
        source_vocab_size: int | None = None,  # linked from the data
        tie_encoder_embedding: bool = True,  # share the source embedding too (needs one joint vocabulary)
        label_smoothing: float = 0.1,
        decoding: DecodingConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(optimizer or paper_optimizer(), compile, activation_checkpointing)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.backbone_cfg = backbone or TransformerConfig()
        self.decoder_depth = decoder_depth or self.backbone_cfg.depth
        self.vocab_size, self.source_vocab_size = vocab_size, source_vocab_size
        self.decoding = decoding or DecodingConfig()
        self.tokenizer: Tokenizer | None = None  # target side; set from the data module or the checkpoint
        self.source_tokenizer: Tokenizer | None = None
        self._outputs: list[tuple[int, str, str]] = []  # (index, hypothesis, reference) of this rank
        self.signatures: dict[str, str] = {}

    # ---- building ---------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, d = self.backbone_cfg, self.backbone_cfg.width
        if self.hparams.tie_encoder_embedding and self.source_vocab_size != self.vocab_size:
            raise ValueError(
                f"tie_encoder_embedding needs one vocabulary, but source_vocab_size={self.source_vocab_size} and "
                f"vocab_size={self.vocab_size}; set model.tie_encoder_embedding=false or data.shared_vocab=true"
            )
        self.encoder = Transformer(dataclasses.replace(cfg, causal=False, cross_attention=False))
        self.decoder = Transformer(
            dataclasses.replace(cfg, depth=self.decoder_depth, causal=True, cross_attention=True)
        )
        self.target_embed = TokenEmbedding(self.vocab_size, d, scale=True)
        # With the sqrt(d) input scale, N(0, d^-1/2) gives unit-scale inputs and unit-scale tied logits (fairseq's).
        nn.init.normal_(self.target_embed.weight, std=d**-0.5)
        self.source_embed = self.target_embed
        if not self.hparams.tie_encoder_embedding:
            self.source_embed = TokenEmbedding(self.source_vocab_size, d, scale=True)
            nn.init.normal_(self.source_embed.weight, std=d**-0.5)
        # Token-weighted means that sync as sums over ranks: exact under DDP whatever each rank's share of tokens.
        self.eval_metrics = nn.ModuleDict({f"{s}_{m}": MeanMetric() for s in ("val", "test") for m in ("loss", "nll")})

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            self.set_tokenizers(dm.tokenizer, dm.source_tokenizer)

    def set_tokenizers(self, target: Tokenizer, source: Tokenizer | None = None) -> None:
        self.tokenizer, self.source_tokenizer = target, source or target

    # ---- model ------------------------------------------------------------------------------------------------
    def encode(self, source: Tensor) -> tuple[Tensor, Tensor]:  # (B, S) -> memory (B, S, D), mask (B, S)
        mask = source != self.source_tokenizer.pad_id
        return self.encoder(self.source_embed(source), padding_mask=mask), mask

    def decode_step(
        self,
        tokens: Tensor,  # (B, T) target tokens not yet in the cache
        memory: Tensor,
        memory_mask: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:  # -> logits (B, T, V)
        x = self.decoder(
            self.target_embed(tokens), padding_mask, positions, memory=memory, memory_padding_mask=memory_mask,
            cache=cache,
        )  # fmt: skip
        return x @ self.target_embed.weight.T  # tied output projection

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:  # (B, S), (B, T) -> (B, T, V)
        memory, memory_mask = self.encode(source)
        # Right padding in the target needs no mask: causal attention never lets a real token see later padding.
        return self.decode_step(target_in, memory, memory_mask)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        logits = self(batch["source"], batch["target_in"])
        pad = self.tokenizer.pad_id
        loss = label_smoothed_nll(logits, batch["target_out"], self.hparams.label_smoothing, pad)
        with torch.no_grad():
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch["target_out"].flatten(), ignore_index=pad)
        return loss, nll

    # ---- training and evaluation ------------------------------------------------------------------------------
    def training_flops(self, batch: dict[str, Any]) -> float:
        (B, S), T = batch["source"].shape, batch["target_in"].shape[1]
        head = 6.0 * self.vocab_size * self.backbone_cfg.width * B * T  # the tied output projection
        return self.encoder.training_flops(B, S) + self.decoder.training_flops(B, T, memory=S) + head

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, nll = self.loss(batch)
        ntok = (batch["target_out"] != self.tokenizer.pad_id).sum()
        self.log_dict({"train/loss": loss, "train/nll": nll}, prog_bar=True, batch_size=int(ntok))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        loss, nll = self.loss(batch)
        ntok = (batch["target_out"] != self.tokenizer.pad_id).sum()
        for name, value in (("loss", loss), ("nll", nll)):
            metric = self.eval_metrics[f"{stage}_{name}"]
            metric.update(value, ntok)
            self.log(f"{stage}/{name}", metric)
        hyps = self.tokenizer.decode_batch(self.generate(batch["source"]))
        self._outputs += zip(batch["index"].tolist(), hyps, batch["references"])

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, stage: str) -> None:
        """Corpus BLEU / chrF over every rank's hypotheses (each sample once), so any number of ranks agree."""
        outputs, self._outputs = self._outputs, []
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        if not outputs:
            return
        outputs = sorted(dict((i, (h, r)) for i, h, r in outputs).items())
        hyps, refs = [h for _, (h, _) in outputs], [r for _, (_, r) in outputs]
        scores = corpus_scores(hyps, refs)
        self.log_dict({f"{stage}/bleu": scores["bleu"], f"{stage}/chrf": scores["chrf"]}, rank_zero_only=False)
        self.signatures = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
        rank_zero_info(
            f"{stage}: BLEU {scores['bleu']:.2f} ({scores['bleu_signature']}), "
            f"chrF {scores['chrf']:.2f} ({scores['chrf_signature']}) on {len(hyps)} sentences"
        )

    # ---- decoding ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, source: Tensor, beam_size: int | None = None, length_penalty: float | None = None, use_cache: bool = True
    ) -> list[list[int]]:
        """Target token ids (without bos/eos) for a padded source batch (B, S)."""
        cfg = self.decoding
        K = beam_size or cfg.beam_size
        alpha = cfg.length_penalty if length_penalty is None else length_penalty
        memory, memory_mask = self.encode(source)  # once: cross-attention K/V are then kept in the cache
        max_len = (memory_mask.sum(-1) * cfg.max_len_a + cfg.max_len_b).long()  # (B,)
        tok = self.tokenizer
        if K == 1:
            decoder = self._decoder(memory, memory_mask, use_cache)
            out = sample(decoder, [[tok.bos_id]] * source.shape[0], int(max_len.max()), temperature=0.0,
                         eos_id=tok.eos_id, pad_id=tok.pad_id, device=source.device)  # fmt: skip
            return [row[: int(n)] for row, n in zip(out, max_len)]
        memory, memory_mask = memory.repeat_interleave(K, 0), memory_mask.repeat_interleave(K, 0)  # row b*K + k
        decoder = self._decoder(memory, memory_mask, use_cache)
        return beam_search(decoder, source.shape[0], tok.bos_id, tok.eos_id, K, max_len, alpha, device=source.device)

    def _decoder(self, memory: Tensor, memory_mask: Tensor, use_cache: bool) -> Decoder:
        def forward(tokens: Tensor, mask: Tensor | None, positions: Tensor, cache: Cache | None) -> Tensor:
            return self.decode_step(tokens, memory, memory_mask, mask, positions, cache)

        return Decoder(forward, self.decoder.new_cache, use_cache)

    @torch.no_grad()
    def translate(self, lines: list[str], beam_size: int | None = None, batch_size: int = 64) -> list[str]:
        """Translate raw text lines (for the CLI verb and W&B sample tables)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: train it with a data module or load it with load_task()")
        src_tok, was_training = self.source_tokenizer, self.training
        self.eval()
        out: list[str] = []
        for start in range(0, len(lines), batch_size):
            ids = [[*s, src_tok.eos_id] for s in src_tok.encode_batch(lines[start : start + batch_size])]
            source = torch.full((len(ids), max(map(len, ids))), src_tok.pad_id, dtype=torch.long, device=self.device)
            for i, row in enumerate(ids):
                source[i, : len(row)] = torch.tensor(row, device=self.device)
            out += self.tokenizer.decode_batch(self.generate(source, beam_size))
        self.train(was_training)
        return out

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:  # JSON strings: the checkpoint stays loadable with weights_only=True
            checkpoint["tokenizers"] = {"target": self.tokenizer.to_json(), "source": self.source_tokenizer.to_json()}
        if self.signatures:
            checkpoint["sacrebleu_signatures"] = dict(self.signatures)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        toks = checkpoint.get("tokenizers")
        if toks is not None and self.tokenizer is not None and self.tokenizer.to_json() != toks["target"]:
            raise ValueError(
                "the data module's tokenizer differs from the one stored in the checkpoint, so token ids would not "
                "match; use the data settings the checkpoint was trained with (or data.tokenizer=<its tokenizer.json>)"
            )
        if toks is not None:
            target = Tokenizer.from_json(toks["target"])
            source = target if toks["source"] == toks["target"] else Tokenizer.from_json(toks["source"])
            self.set_tokenizers(target, source)
        self.signatures = dict(checkpoint.get("sacrebleu_signatures", {}))


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """sacreBLEU corpus BLEU and chrF with their signatures (the string that makes a score comparable)."""
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hypotheses, [references]), chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
