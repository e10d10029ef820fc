"""Masked-language-model pre-training (Devlin et al. 2019, "BERT"): the task around
`polyformer.models.bert.BertForMaskedLM` (a bidirectional encoder, an MLM head tied to the token embedding), with
cross-entropy on the selected positions only. The masking itself (15%, 80/10/10, whole words optionally) happens when
a sample is loaded (`polyformer.data.masked_text`), seeded per sample, so a resumed run is exact.

Metrics: loss (nats per selected token), perplexity = exp(loss) over the selected tokens, and MLM accuracy (the
share of selected tokens predicted exactly), summed over batches and ranks.
Legend: B batch, T positions, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from polyformer.backbone import TransformerConfig
from polyformer.data.info import DataInfo
from polyformer.data.tokenizers import Tokenizer
from polyformer.models.bert import BertConfig, BertForMaskedLM, check_encoder
from polyformer.tasks.base import OptimizerConfig, TaskModule
from polyformer.tasks.language_model import check_same_tokenizer
from polyformer.tasks.media import Media, MediaRequest, Table

IGNORE = -100  # labels of the positions that are not predicted

# BERT's layout (post-LN, learned positions, exact GELU) at a small size; presets set the size.
BERT_BACKBONE = TransformerConfig(width=256, depth=4, heads=4, prenorm=False, position="learned", max_len=512)


class MaskedLM(TaskModule):
    architecture_hparams = ("backbone", "vocab_size", "type_vocab_size")
    size_arguments = ("vocab_size",)

    def __init__(
        self,
        backbone: TransformerConfig = BERT_BACKBONE,
        vocab_size: int | None = None,  # linked from the data module's tokenizer
        type_vocab_size: int = 2,  # BERT's two segments (what transformers' checkpoints have)
        init_from: str | None = None,  # "hf:<BERT save_pretrained folder or hub name>" or a .ckpt
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(optimizer, compile, activation_checkpointing, init_from)
        check_encoder(backbone)  # before the data module prepares its data
        self.save_hyperparameters()
        self.backbone_cfg, self.vocab_size, self.type_vocab_size = backbone, vocab_size, type_vocab_size
        self.tokenizer: Tokenizer | None = None  # from the data module, or from the checkpoint
        self.val_loss, self.val_accuracy = MeanMetric(), MeanMetric()  # weighted by selected tokens
        self.build()

    # ---- building ---------------------------------------------------------------------------------------------
    def build_model(self) -> BertForMaskedLM:
        assert self.vocab_size is not None
        return BertForMaskedLM(BertConfig(self.backbone_cfg, self.vocab_size, self.type_vocab_size))

    def connect_data(self, info: DataInfo) -> None:
        self.link("vocab_size", info.vocab_size)
        if info.tokenizer is not None:
            if self.tokenizer is not None:  # from a checkpoint (load_task): its token ids must mean the same
                check_same_tokenizer(self.tokenizer, info.tokenizer)
            self.tokenizer = info.tokenizer
        cfg = self.backbone_cfg
        if info.block_size is not None and cfg.position == "learned" and info.block_size > cfg.max_len:
            raise ValueError(
                f"data.block_size ({info.block_size}) exceeds model.backbone.max_len ({cfg.max_len}), the "
                "learned position table; raise max_len or lower block_size"
            )

    # ---- steps ------------------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:  # (B, T) -> (B, T, V)
        return self.model(tokens, padding_mask)

    def masked_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Summed nats, correct predictions and the count of the selected positions of a batch."""
        inputs, labels = batch
        selected = labels != IGNORE  # (B, T)
        # The head runs on every position (the tied decoder is the costly part, V x D per position); gathering the
        # ~15% selected ones first would save that, at the price of a dynamic shape under compile.
        logits = self.model(inputs)[selected].float()  # (N, V)
        targets = labels[selected]
        nats = F.cross_entropy(logits, targets, reduction="sum")
        return nats, (logits.argmax(dim=-1) == targets).sum(), selected.sum()

    def training_flops(self, batch: tuple[Tensor, Tensor]) -> float:
        return self.model.training_flops(*batch[0].shape)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        nats, correct, count = self.masked_loss(batch)
        # The mean over the selected tokens of the *global* batch: ranks select different numbers of tokens, so the
        # mean of per-rank means (what DDP's gradient averaging would give) is another loss than one process's.
        # Each rank divides its sum by the global count and scales by the world size, which DDP averages away.
        strategy = self.trainer.strategy
        stats = strategy.reduce(torch.stack([nats.detach(), correct.float(), count.float()]), reduce_op="sum")
        total = stats[2].clamp(min=1)
        loss = nats * self.trainer.world_size / total
        self.log("train/loss", stats[0] / total, prog_bar=True)
        self.log("train/accuracy", stats[1] / total)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        nats, correct, count = self.masked_loss(batch)
        weight = count.clamp(min=1).float()
        self.val_loss.update(nats / weight, weight)
        self.val_accuracy.update(correct / weight, weight)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synced over ranks, weighted by the selected tokens
        self.log("val/loss", loss, prog_bar=True)
        self.log_dict({"val/ppl": loss.exp(), "val/accuracy": self.val_accuracy.compute()})
        self.val_loss.reset()
        self.val_accuracy.reset()

    # ---- media ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """A table "predictions": for up to `request.num_samples` validation blocks, the masked input (the first
        64 tokens, [MASK] shown), the original tokens at the selected positions and the model's predictions there."""
        if self.tokenizer is None or not isinstance(batch, (list, tuple)):
            return []
        tok = self.tokenizer
        inputs, labels = (t[: request.num_samples, :64].to(self.device) for t in batch)
        was_training = self.training
        self.eval()
        predicted = self.model(inputs).argmax(dim=-1)
        self.train(was_training)
        rows: list[list[Any]] = []
        for x, y, p in zip(inputs.tolist(), labels.tolist(), predicted.tolist()):
            picked = [i for i, label in enumerate(y) if label != IGNORE]
            shown = tok.inner.decode(x, skip_special_tokens=False).replace("[CLS]", "").replace("[SEP]", "")
            truth = " | ".join(tok.inner.decode([y[i]]).strip() for i in picked)
            guess = " | ".join(tok.inner.decode([p[i]]).strip() for i in picked)
            right = sum(y[i] == p[i] for i in picked)
            rows.append([self.global_step, shown, truth, guess, f"{right}/{len(picked)}"])
        return [Table("predictions", ["step", "masked input", "original", "predicted", "correct"], rows)]

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:  # fine-tuning checks that its data tokenizes the same way
            checkpoint["tokenizer"] = self.tokenizer.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "tokenizer" in checkpoint and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_json(checkpoint["tokenizer"])
        elif "tokenizer" in checkpoint:
            check_same_tokenizer(Tokenizer.from_json(checkpoint["tokenizer"]), self.tokenizer)
