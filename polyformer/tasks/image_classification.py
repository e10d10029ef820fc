"""ViT image classification (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words") trained with the DeiT recipe
(Touvron et al. 2021): label smoothing, Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) through timm's `Mixup`
with the soft-target cross-entropy they need, AdamW with weight decay on matrices only (tasks/base.py). DeiT III
(Touvron et al. 2022, "DeiT III: Revenge of the ViT") trains with binary cross-entropy instead (`loss="bce"`): each
class a sigmoid against the (mixed) target, which Mixup/CutMix's two-label targets fit better than one softmax.

The network is `polyformer.models.vit.ViT` (the shared `ImageTower` plus a linear head), held as `self.model`; its
first weights may come from timm (`init_from="timm:<name>"`, `polyformer.weights.timm_vit`).
Metrics: top-1, top-5 and a confusion matrix (torchmetrics, synced across ranks). After each validation epoch the
confusion matrix and a few misclassified images are kept on the task; `media()` shows them.

Legend: B batch, C channels, H/W image side, K classes, D width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from polyformer.backbone import TransformerConfig
from polyformer.data.info import DataInfo
from polyformer.models.image_tower import resize_pos_embed
from polyformer.models.vit import ViT, ViTConfig
from polyformer.tasks.base import OptimizerConfig, TaskModule
from polyformer.tasks.media import Heatmap, Images, Media, MediaRequest, tower_overlay


@dataclass
class MixupConfig:
    """timm's Mixup/CutMix; DeiT: mixup_alpha 0.8, cutmix_alpha 1.0, prob 1, switch_prob 0.5, per batch."""

    mixup_alpha: float = 0.8  # 0 = off
    cutmix_alpha: float = 1.0  # 0 = off
    prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    mode: Literal["batch", "pair", "elem"] = "batch"  # one lambda per batch, per pair or per sample

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or self.mixup_alpha + self.cutmix_alpha == 0:
            raise ValueError(
                f"mixup.mixup_alpha and cutmix_alpha must be >= 0 and not both 0 (got {self.mixup_alpha}, "
                f"{self.cutmix_alpha}); leave --model.mixup unset to train without mixing"
            )
        if not (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1):
            raise ValueError(f"mixup.prob and switch_prob are probabilities, got {self.prob}, {self.switch_prob}")


class Misclassified(NamedTuple):
    image: Tensor  # (C, H, W) uint8, as the model saw it (after the eval transform)
    target: int
    predicted: int
    confidence: float  # softmax probability of the predicted class


class ImageClassifier(TaskModule):
    # image_size is not here on purpose: positions are interpolated, so a checkpoint loads at any resolution.
    architecture_hparams = ("backbone", "num_classes", "channels", "patch_size", "pool", "position", "norm_pre")
    size_arguments = ("num_classes", "image_size", "channels")

    def __init__(
        self,
        backbone: TransformerConfig | None = None,
        patch_size: int = 16,
        pool: Literal["cls", "avg"] = "cls",
        position: Literal["learned", "sincos2d"] = "learned",
        norm_pre: bool = False,
        label_smoothing: float = 0.1,
        mixup: MixupConfig | None = None,  # None = plain (label-smoothed) cross-entropy
        loss: Literal["ce", "bce"] = "ce",  # bce: DeiT III's binary cross-entropy on the (mixed, smoothed) targets
        num_misclassified: int = 16,  # kept after validation for media()
        num_classes: int | None = None,  # the rest default to the data module's values
        image_size: int | None = None,
        channels: int | None = None,
        class_names: list[str] | None = None,
        mean: tuple[float, ...] | None = None,  # the data's normalisation, kept for `polyformer classify`
        std: tuple[float, ...] | None = None,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,  # e.g. "timm:vit_small_patch16_224.augreg_in21k_ft_in1k", or a .ckpt
    ) -> None:
        super().__init__(optimizer, compile, activation_checkpointing, init_from)
        self.save_hyperparameters()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if loss not in ("ce", "bce"):
            raise ValueError(f"model.loss must be 'ce' (softmax cross-entropy) or 'bce' (DeiT III), got {loss!r}")
        self.backbone_cfg = backbone or TransformerConfig(width=192, depth=12, heads=3, dropout=0.0, norm_eps=1e-6)
        self.patch_size, self.pool, self.position, self.norm_pre = patch_size, pool, position, norm_pre
        self.label_smoothing, self.mixup_cfg, self.loss = label_smoothing, mixup, loss
        self.num_misclassified = num_misclassified
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.class_names, self.mean, self.std = class_names, mean, std
        # Model inputs back to uint8 pixels for the misclassified images (the data module's; None = min-max).
        self.denormalize: Callable[[Tensor], Tensor] | None = None
        self.mixup: Any = None  # timm's Mixup, made with the metrics once the class count is known
        # Kept after each validation epoch for media() (rank 0 holds the synced matrix; images are per rank).
        self.confusion_matrix: Tensor | None = None  # (K, K) int64, rows = true class, columns = predicted
        self.misclassified: list[Misclassified] = []
        self.build()

    # ---- building ---------------------------------------------------------------------------------------------
    def connect_data(self, info: DataInfo) -> None:
        self.link("num_classes", info.num_classes)
        self.link("image_size", info.image_size)
        self.link("channels", info.channels)
        # Stored as hyperparameters too: `polyformer classify` names and normalises from the checkpoint alone.
        self.link("class_names", None if info.class_names is None else list(info.class_names))
        self.link("mean", info.mean)
        self.link("std", info.std)
        self.denormalize = info.denormalize

    def build_model(self) -> ViT:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names given for num_classes={self.num_classes}")
        assert self.num_classes is not None and self.image_size is not None and self.channels is not None
        K = self.num_classes
        # The model first: it is what draws from the RNG (the mixing and metrics below draw nothing).
        model = ViT(
            ViTConfig(
                self.backbone_cfg, self.image_size, self.patch_size, self.channels, K, self.pool, self.position,
                self.norm_pre,
            )
        )  # fmt: skip
        if self.mixup_cfg is not None:
            from timm.data import Mixup

            m = self.mixup_cfg
            self.mixup = Mixup(
                m.mixup_alpha, m.cutmix_alpha, prob=m.prob, switch_prob=m.switch_prob, mode=m.mode,
                label_smoothing=self.label_smoothing, num_classes=K,
            )  # fmt: skip
        top5 = min(5, K)
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(K, top_k=k, average="micro")
                for split in ("val", "test")
                for name, k in (("top1", 1), ("top5", top5))
            }
        )
        self.val_confusion = MulticlassConfusionMatrix(K)
        return model

    # ---- steps ------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K) logits
        return self.model(images)

    def training_flops(self, batch: tuple[Tensor, Tensor] | Tensor) -> float:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch  # predict batches may be images alone
        return self.model.training_flops(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        if self.mixup is not None:
            if len(images) % 2:
                raise ValueError(f"Mixup/CutMix pairs samples: the batch size must be even, got {len(images)}")
            images, soft = self.mixup(images, targets)  # soft: (B, K), label smoothing included
            # fp32 logits: CPU autocast leaves log_softmax in bf16 (CUDA autocast promotes it), an error of ~1e-3 in
            # the loss; F.cross_entropy below already runs in fp32 under both autocasts, the cast makes that explicit.
            logits = self.model(images).float()
            if self.loss == "bce":
                loss = binary_cross_entropy(logits, soft.float())
            else:
                loss = torch.sum(-soft.float() * F.log_softmax(logits, dim=-1), dim=-1).mean()
        elif self.loss == "bce":
            logits = self.model(images).float()
            loss = binary_cross_entropy(logits, smoothed_one_hot(targets, logits.shape[-1], self.label_smoothing))
        else:
            loss = F.cross_entropy(self.model(images).float(), targets, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self.misclassified = []

    def on_validation_epoch_end(self) -> None:
        self.confusion_matrix = self.val_confusion.compute().cpu()
        self.val_confusion.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs, classes = self.model(images).softmax(dim=-1).topk(min(5, self.model.cfg.num_classes), dim=-1)
        return {"probabilities": probs, "classes": classes}  # (B, 5) each

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: Literal["val", "test"]) -> None:
        images, targets = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits, targets)  # no smoothing: comparable across recipes
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=len(targets))
        for name in ("top1", "top5"):
            metric = self.metrics[f"{split}_{name}"]
            metric.update(logits, targets)
            self.log(f"{split}/{name}", metric, prog_bar=name == "top1", batch_size=len(targets))
        if split == "val":
            self.val_confusion.update(logits, targets)
            self._keep_misclassified(images, logits, targets)

    def _keep_misclassified(self, images: Tensor, logits: Tensor, targets: Tensor) -> None:
        room = self.num_misclassified - len(self.misclassified)
        if room <= 0:
            return
        probs, predicted = logits.softmax(dim=-1).max(dim=-1)
        wrong = (predicted != targets).nonzero().flatten()[:room]
        if len(wrong) == 0:
            return
        shown = self.denormalize(images[wrong]) if self.denormalize else _to_uint8(images[wrong])
        for img, i in zip(shown.cpu(), wrong.tolist()):
            self.misclassified.append(Misclassified(img, int(targets[i]), int(predicted[i]), float(probs[i])))

    # ---- media ------------------------------------------------------------------------------------------------
    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """The last validation's confusion matrix ("confusion_matrix", rows = true class, annotated up to 20
        classes), up to `request.num_samples` misclassified images of this rank ("misclassified", captioned
        "true X / predicted Y (confidence)"), both kept during validation, and the first `request.overlay_images`
        images of `batch` with where the tower looks ("attention_overlay": its class token's attention over the
        patches per layer, and the rollout; the callback draws it from the weights it recorded)."""
        names = list(self.class_names or [str(i) for i in range(self.model.cfg.num_classes)])
        items: list[Media] = []
        cm = self.confusion_matrix
        if cm is not None:
            items.append(
                Heatmap("confusion_matrix", cm, "validation confusion matrix", xlabels=names, ylabels=names,
                        xlabel="predicted", ylabel="true", annotate=cm.shape[0] <= 20)
            )  # fmt: skip
        wrong = self.misclassified[: request.num_samples]
        if wrong:
            captions = [f"true {names[m.target]} / predicted {names[m.predicted]} ({m.confidence:.2f})" for m in wrong]
            items.append(Images("misclassified", [m.image for m in wrong], captions))
        if isinstance(batch, (list, tuple)) and isinstance(batch[0], Tensor) and batch[0].ndim == 4:
            images = batch[0][: request.overlay_images]
            shown = self.denormalize(images) if self.denormalize else _to_uint8(images)
            captions = [f"true {names[int(t)]}" for t in batch[1][: len(images)]] if len(batch) > 1 else None
            items.append(tower_overlay("attention_overlay", self.model.tower, "tower", list(shown), captions))
        return items

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Another resolution than the checkpoint's: resize its position table to this model's grid.
        state, key = checkpoint["state_dict"], "model.tower.pos_embed"
        if self.model is not None and key in state and state[key].shape != self.model.tower.pos_embed.shape:
            tower = self.model.tower
            state[key] = resize_pos_embed(state[key], tower.patch.grid, tower.prefix)


def smoothed_one_hot(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) class ids -> (B, K) targets: 1 - smoothing + smoothing / K on the class, smoothing / K elsewhere (timm's
    Mixup builds its targets the same way)."""
    off = smoothing / num_classes
    return F.one_hot(targets, num_classes).float() * (1.0 - smoothing) + off


def binary_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """DeiT III's loss: every class an independent sigmoid against its soft target, averaged over the B x K entries
    (timm's `BinaryCrossEntropy`, torch's `BCEWithLogitsLoss` default). logits, targets: (B, K)."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def _to_uint8(images: Tensor) -> Tensor:  # (B, C, H, W) any range -> uint8, per image min-max
    lo = images.amin(dim=(1, 2, 3), keepdim=True)
    hi = images.amax(dim=(1, 2, 3), keepdim=True)
    return ((images - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
