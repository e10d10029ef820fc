"""Encoder-decoder sequence-to-sequence (Vaswani et al. 2017): translation and T5-style text-to-text tasks.

The network is `polyformer.models.encoder_decoder.EncoderDecoder` (bidirectional encoder, causal decoder with
cross-attention, sqrt(d)-scaled embeddings tied with the output projection, section 3.4), held as `self.model`; the
task owns the tokenizers, which the model never sees. Training: label-smoothed cross-entropy (Szegedy et al. 2016;
eps = 0.1 in the paper). Decoding: greedy or beam search with the GNMT length penalty (Wu et al. 2016) from
`polyformer.decoding`, on the KV cache. Evaluation: sacreBLEU BLEU and chrF on detokenized text (Post 2018),
gathered over all ranks, with the metric signature; `media()` shows sample translations with sentence BLEU.

Legend: B batch, S source positions, T target positions, K beam size, D width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from sacrebleu.metrics import BLEU, CHRF
from torch import Tensor, nn
from torchmetrics import MeanMetric

from polyformer.backbone import Cache, TransformerConfig
from polyformer.data.info import DataInfo
from polyformer.data.tokenizers import Tokenizer, decode_rows
from polyformer.decoding import Decoder, beam_search, sample
from polyformer.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from polyformer.tasks.base import OptimizerConfig, TaskModule
from polyformer.tasks.media import Media, MediaRequest, Table


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


_DIFFERENT_TOKENIZER = (
    "the data module's tokenizer differs from the one stored in the checkpoint, so token ids would not match; use "
    "the data settings the checkpoint was trained with (or data.tokenizer=<its tokenizer.json>)"
)


class Translation(TaskModule):
    architecture_hparams = ("backbone", "decoder_depth", "vocab_size", "source_vocab_size", "tie_encoder_embedding")
    size_arguments = ("vocab_size", "source_vocab_size")

    def __init__(
        self,
        backbone: TransformerConfig | None = None,  # both stacks; the model sets causal / cross-attention per side
        decoder_depth: int | None = None,  # None = backbone.depth
        vocab_size: int | None = None,  # target side; linked from the data
        source_vocab_size: int | None = None,  # linked from the data
        tie_encoder_embedding: bool = True,  # share the source embedding too (needs one joint vocabulary)
        label_smoothing: float = 0.1,
        decoding: DecodingConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,  # a polyformer .ckpt of the same architecture
    ) -> None:
        super().__init__(optimizer or paper_optimizer(), compile, activation_checkpointing, init_from)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.backbone_cfg = backbone or TransformerConfig()
        self.decoder_depth, self.tie_encoder_embedding = decoder_depth, tie_encoder_embedding
        self.vocab_size, self.source_vocab_size = vocab_size, source_vocab_size
        self.label_smoothing = label_smoothing
        self.decoding = decoding or DecodingConfig()
        self.tokenizer: Tokenizer | None = None  # target side; from the data module or the checkpoint
        self.source_tokenizer: Tokenizer | None = None
        # Token-weighted means that sync as sums over ranks: exact under DDP whatever each rank's share of tokens.
        self.eval_metrics = nn.ModuleDict({f"{s}_{m}": MeanMetric() for s in ("val", "test") for m in ("loss", "nll")})
        self._outputs: list[tuple[Any, ...]] = []  # (index, hypothesis, reference, ...) of this rank (_record)
        # Of the last scored evaluation, for media() and checkpoints: the strings that make a score comparable.
        self.signatures: dict[str, str] = {}
        self.scores: dict[str, float] = {}
        self.build()

    # ---- building ---------------------------------------------------------------------------------------------
    def connect_data(self, info: DataInfo) -> None:
        self.link("vocab_size", info.vocab_size)
        self.link("source_vocab_size", info.source_vocab_size)
        if info.tokenizer is None:
            return
        # A tokenizer from a checkpoint (load_task) must be the data's: its token ids must mean the same.
        known = self.tokenizer
        if known is not None and known is not info.tokenizer and known.to_json() != info.tokenizer.to_json():
            raise ValueError(_DIFFERENT_TOKENIZER)
        self.set_tokenizers(info.tokenizer, info.source_tokenizer)

    def build_model(self) -> EncoderDecoder:
        assert self.vocab_size is not None and self.source_vocab_size is not None
        cfg = EncoderDecoderConfig(
            self.backbone_cfg, self.vocab_size, self.source_vocab_size, self.decoder_depth, self.tie_encoder_embedding
        )
        return EncoderDecoder(cfg)

    def set_tokenizers(self, target: Tokenizer, source: Tokenizer | None = None) -> None:
        """The target tokenizer and the source one (None = the same, a joint vocabulary)."""
        self.tokenizer, self.source_tokenizer = target, source or target

    def _tokenizers(self) -> tuple[Tokenizer, Tokenizer]:
        """(target, source), or a clear error when this task has none (bare weights, no data module)."""
        if self.tokenizer is None or self.source_tokenizer is None:
            raise ValueError("this model has no tokenizer: train it with a data module or load it with load_task()")
        return self.tokenizer, self.source_tokenizer

    # ---- model ------------------------------------------------------------------------------------------------
    def encode(self, source: Tensor) -> tuple[Tensor, Tensor]:  # (B, S) -> memory (B, S, D), mask (B, S)
        mask = source != self._tokenizers()[1].pad_id
        return self.model.encode(source, mask), mask

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:  # (B, S), (B, T) -> (B, T, V)
        return self.model(source, source != self._tokenizers()[1].pad_id, target_in)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        logits = self(batch["source"], batch["target_in"])
        pad = self._tokenizers()[0].pad_id
        loss = label_smoothed_nll(logits, batch["target_out"], self.label_smoothing, pad)
        with torch.no_grad():
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch["target_out"].flatten(), ignore_index=pad)
        return loss, nll

    # ---- training and evaluation ------------------------------------------------------------------------------
    def training_flops(self, batch: dict[str, Any]) -> float:
        (B, S), T = batch["source"].shape, batch["target_in"].shape[1]
        return self.model.training_flops(B, S, T)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, nll = self.loss(batch)
        ntok = (batch["target_out"] != self._tokenizers()[0].pad_id).sum()
        self.log_dict({"train/loss": loss, "train/nll": nll}, prog_bar=True, batch_size=int(ntok))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        loss, nll = self.loss(batch)
        tok = self._tokenizers()[0]
        ntok = (batch["target_out"] != tok.pad_id).sum()
        for name, value in (("loss", loss), ("nll", nll)):
            metric = self.eval_metrics[f"{stage}_{name}"]
            metric.update(value, ntok)
            self.log(f"{stage}/{name}", metric)
        self._record(batch, tok.decode_batch(self.generate(batch["source"])))

    def _record(self, batch: dict[str, Any], hypotheses: list[str]) -> None:
        """Keep what `_score` needs of an evaluation batch: (index, hypothesis, reference) per row."""
        self._outputs += zip(batch["index"].tolist(), hypotheses, batch["references"])

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, stage: str) -> None:
        """Corpus BLEU / chrF over every rank's hypotheses (each sample once), so any number of ranks agree."""
        outputs = self._gathered_outputs()
        if not outputs:
            return
        hyps, refs = [o[1] for o in outputs], [o[2] for o in outputs]
        scores = corpus_scores(hyps, refs)
        self.log_dict({f"{stage}/bleu": scores["bleu"], f"{stage}/chrf": scores["chrf"]}, rank_zero_only=False)
        self.signatures = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
        self.scores = {"bleu": scores["bleu"], "chrf": scores["chrf"]}
        rank_zero_info(
            f"{stage}: BLEU {scores['bleu']:.2f} ({scores['bleu_signature']}), "
            f"chrF {scores['chrf']:.2f} ({scores['chrf_signature']}) on {len(hyps)} sentences"
        )

    def _gathered_outputs(self) -> list[tuple[Any, ...]]:
        """Every rank's recorded rows, each sample once (DDP's padded duplicates dropped), in index order."""
        outputs, self._outputs = self._outputs, []
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        return sorted({o[0]: o for o in outputs}.values(), key=lambda o: o[0])

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
        tok = self._tokenizers()[0]
        if K == 1:
            decoder = self._decoder(memory, memory_mask, use_cache)
            out = sample(decoder, [[tok.bos_id]] * source.shape[0], int(max_len.max()), temperature=0.0,
                         eos_id=tok.eos_id, pad_id=tok.pad_id, device=source.device)  # fmt: skip
            return [row[: int(n)] for row, n in zip(out, max_len)]
        memory, memory_mask = memory.repeat_interleave(K, 0), memory_mask.repeat_interleave(K, 0)  # row b*K + k
        decoder = self._decoder(memory, memory_mask, use_cache)
        return beam_search(decoder, source.shape[0], tok.bos_id, tok.eos_id, K, max_len, alpha, device=source.device)

    def _decoder(self, memory: Tensor, memory_mask: Tensor, use_cache: bool) -> Decoder:
        model = self.model

        def forward(tokens: Tensor, mask: Tensor | None, positions: Tensor, cache: Cache | None) -> Tensor:
            return model.decode(tokens, memory, memory_mask, mask, positions, cache)

        return Decoder(forward, model.new_cache, use_cache)

    @torch.no_grad()
    def translate(self, lines: list[str], beam_size: int | None = None, batch_size: int = 64) -> list[str]:
        """Translate raw text lines (for the CLI verb)."""
        tok, src_tok = self._tokenizers()
        was_training = self.training
        self.eval()
        out: list[str] = []
        for start in range(0, len(lines), batch_size):
            ids = [[*s, src_tok.eos_id] for s in src_tok.encode_batch(lines[start : start + batch_size])]
            source = torch.full((len(ids), max(map(len, ids))), src_tok.pad_id, dtype=torch.long, device=self.device)
            for i, row in enumerate(ids):
                source[i, : len(row)] = torch.tensor(row, device=self.device)
            out += tok.decode_batch(self.generate(source, beam_size))
        self.train(was_training)
        return out

    # ---- media ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """A table "translations" (source, reference, hypothesis, sentence BLEU) for the first `request.num_samples`
        rows of the validation `batch` (a dict with "source" (B, S) and "references"), decoded with `decoding`; and
        a table "sacrebleu" (metric, corpus score, signature) of the last scored evaluation, when there was one."""
        if self.tokenizer is None or not isinstance(batch, dict) or "source" not in batch:
            return []
        tok, src_tok = self._tokenizers()
        n = request.num_samples
        source = batch["source"][:n].to(self.device)
        was_training = self.training
        self.eval()  # no dropout in the shown hypotheses, wherever the trainer's loop is
        hyps = tok.decode_batch(self.generate(source))
        self.train(was_training)
        sources, refs = decode_rows(src_tok, source), list(batch["references"][:n])
        bleu = BLEU(effective_order=True)  # sentence BLEU needs effective order: short lines miss 4-grams
        rows: list[list[Any]] = [
            [s, r, h, round(bleu.sentence_score(h, [r]).score, 2)] for s, r, h in zip(sources, refs, hyps)
        ]
        items: list[Media] = [Table("translations", ["source", "reference", "hypothesis", "sentence_bleu"], rows)]
        if self.signatures:
            scores = [
                [name, None if name not in self.scores else round(self.scores[name], 2), signature]
                for name, signature in self.signatures.items()
            ]
            items.append(Table("sacrebleu", ["metric", "corpus_score", "signature"], scores))
        return items

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None and self.source_tokenizer is not None:
            # JSON strings: the checkpoint stays loadable with weights_only=True.
            checkpoint["tokenizers"] = {"target": self.tokenizer.to_json(), "source": self.source_tokenizer.to_json()}
        if self.signatures:
            checkpoint["sacrebleu_signatures"] = dict(self.signatures)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        toks = checkpoint.get("tokenizers")
        if toks is not None and self.tokenizer is not None and self.tokenizer.to_json() != toks["target"]:
            raise ValueError(_DIFFERENT_TOKENIZER)
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
