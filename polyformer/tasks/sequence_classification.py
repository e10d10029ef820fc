"""Sequence classification by fine-tuning a BERT encoder (Devlin et al. 2019, section 4.1): the pooled [CLS] state
through dropout and a linear classifier (`polyformer.models.bert.BertForSequenceClassification`), cross-entropy.

First weights: `init_from` one of our masked-LM checkpoints (`runs/.../last.ckpt`; the encoder and pooler load, the
classifier starts fresh; its tokenizer must be the data's), a transformers BERT (`hf:<save_pretrained folder or hub
name>`), or nothing (from scratch, for comparison).
Metrics: accuracy and macro F1 (torchmetrics, synced across ranks) and a confusion matrix, which `media()` shows with
a table of misclassified texts.
Legend: B batch, T positions, K classes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from polyformer.backbone import TransformerConfig
from polyformer.data.info import DataInfo
from polyformer.data.tokenizers import Tokenizer
from polyformer.models.bert import BertConfig, BertForSequenceClassification, check_encoder
from polyformer.tasks.base import OptimizerConfig, TaskModule
from polyformer.tasks.language_model import check_same_tokenizer
from polyformer.tasks.masked_lm import BERT_BACKBONE
from polyformer.tasks.media import Heatmap, Media, MediaRequest, Table


class Misclassified(NamedTuple):
    text: str
    target: int
    predicted: int
    confidence: float


class SequenceClassifier(TaskModule):
    architecture_hparams = ("backbone", "vocab_size", "type_vocab_size", "num_classes")
    size_arguments = ("vocab_size", "num_classes")

    def __init__(
        self,
        backbone: TransformerConfig = BERT_BACKBONE,
        vocab_size: int | None = None,  # linked from the data module's tokenizer
        num_classes: int | None = None,  # linked from the data module
        type_vocab_size: int = 2,
        class_names: list[str] | None = None,  # linked from the data module; stored for inference
        init_from: str | None = None,  # a masked-LM .ckpt of ours, "hf:<BERT folder or hub name>", or None
        num_misclassified: int = 8,  # texts kept per validation for the media table
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(optimizer, compile, activation_checkpointing, init_from)
        check_encoder(backbone)
        self.save_hyperparameters()
        self.backbone_cfg, self.vocab_size, self.num_classes = backbone, vocab_size, num_classes
        self.type_vocab_size, self.class_names, self.num_misclassified = type_vocab_size, class_names, num_misclassified
        self.tokenizer: Tokenizer | None = None
        self.confusion_matrix: Tensor | None = None  # (K, K) int64, rows = true class, columns = predicted
        self.misclassified: list[Misclassified] = []
        self.build()

    # ---- building ---------------------------------------------------------------------------------------------
    def build_model(self) -> BertForSequenceClassification:
        assert self.vocab_size is not None and self.num_classes is not None
        K = self.num_classes
        self.val_accuracy, self.val_f1 = MulticlassAccuracy(K), MulticlassF1Score(K, average="macro")
        self.val_confusion = MulticlassConfusionMatrix(K)
        cfg = BertConfig(self.backbone_cfg, self.vocab_size, self.type_vocab_size, num_classes=K)
        return BertForSequenceClassification(cfg)

    def build(self) -> bool:
        # Our own checkpoints and exports hold another head (a masked-LM's): only the encoder is carried over.
        source = self.init_from
        if self.model is None and not self.missing_sizes() and source and source.endswith((".ckpt", ".safetensors")):
            from polyformer.weights.bert import load_encoder

            self.model = self.build_model()
            load_encoder(self.model, source)
            if source.endswith(".ckpt"):
                self._check_checkpoint_tokenizer(source)
            return True
        return super().build()

    def _check_checkpoint_tokenizer(self, path: str) -> None:
        from polyformer.checkpointing.files import load_checkpoint

        stored = load_checkpoint(path).get("tokenizer")
        if stored is not None and self.tokenizer is not None:
            check_same_tokenizer(Tokenizer.from_json(stored), self.tokenizer)

    def connect_data(self, info: DataInfo) -> None:
        self.link("vocab_size", info.vocab_size)
        self.link("num_classes", info.num_classes)
        self.link("class_names", None if info.class_names is None else list(info.class_names))
        if info.tokenizer is not None:
            self.tokenizer = info.tokenizer
        cfg = self.backbone_cfg
        if info.block_size is not None and cfg.position == "learned" and info.block_size > cfg.max_len:
            raise ValueError(
                f"data.max_length ({info.block_size}) exceeds model.backbone.max_len ({cfg.max_len}), the learned "
                "position table; raise max_len or lower max_length"
            )

    # ---- steps ------------------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:  # (B, T) -> (B, K)
        return self.model(tokens, padding_mask)

    def training_flops(self, batch: tuple[Tensor, Tensor, Tensor]) -> float:
        return self.model.training_flops(*batch[0].shape)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, mask, labels = batch
        logits = self.model(tokens, mask)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(dim=-1) == labels).float().mean())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        tokens, mask, labels = batch
        logits = self.model(tokens, mask)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=len(labels))
        for metric in (self.val_accuracy, self.val_f1, self.val_confusion):
            metric.update(logits, labels)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)
        self.log("val/f1", self.val_f1)
        self._keep_misclassified(tokens, mask, logits, labels)

    def on_validation_epoch_start(self) -> None:
        self.misclassified = []

    def on_validation_epoch_end(self) -> None:
        self.confusion_matrix = self.val_confusion.compute().cpu()
        self.val_confusion.reset()

    def _keep_misclassified(self, tokens: Tensor, mask: Tensor, logits: Tensor, labels: Tensor) -> None:
        room = self.num_misclassified - len(self.misclassified)
        if room <= 0 or self.tokenizer is None:
            return
        probs, predicted = logits.float().softmax(dim=-1).max(dim=-1)
        for i in (predicted != labels).nonzero().flatten()[:room].tolist():
            text = self.tokenizer.decode(tokens[i][mask[i]].tolist())
            self.misclassified.append(Misclassified(text, int(labels[i]), int(predicted[i]), float(probs[i])))

    # ---- media ------------------------------------------------------------------------------------------------
    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """The last validation's confusion matrix ("confusion_matrix", rows = true class) and up to
        `request.num_samples` misclassified texts ("misclassified": the text's start, true and predicted class)."""
        names = list(self.class_names or [str(i) for i in range(self.num_classes or 0)])
        items: list[Media] = []
        cm = self.confusion_matrix
        if cm is not None:
            items.append(
                Heatmap("confusion_matrix", cm, "validation confusion matrix", xlabels=names, ylabels=names,
                        xlabel="predicted", ylabel="true", annotate=cm.shape[0] <= 20)
            )  # fmt: skip
        wrong = self.misclassified[: request.num_samples]
        if wrong:
            rows = [[self.global_step, m.text[:300], names[m.target], names[m.predicted], round(m.confidence, 3)]
                    for m in wrong]  # fmt: skip
            items.append(Table("misclassified", ["step", "text", "true", "predicted", "confidence"], rows))
        return items

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "tokenizer" in checkpoint and self.tokenizer is None:
            self.tokenizer = Tokenizer.from_json(checkpoint["tokenizer"])
