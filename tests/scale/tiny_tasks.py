"""The four tasks at a tiny size, built eagerly, for tests that need real task modules without a Trainer."""

from __future__ import annotations

from polyformer.backbone import TransformerConfig
from polyformer.models.clip import ImageEncoderConfig, TextEncoderConfig
from polyformer.tasks.base import TaskModule
from polyformer.tasks.contrastive import CLIP
from polyformer.tasks.image_classification import ImageClassifier
from polyformer.tasks.language_model import LanguageModel
from polyformer.tasks.translation import Translation

W = dict(width=16, depth=2, heads=2, dropout=0.0)


def tiny_tasks() -> dict[str, TaskModule]:
    lm = LanguageModel(backbone=TransformerConfig(**W, position="learned", max_len=16, causal=True), vocab_size=50)
    vit = ImageClassifier(backbone=TransformerConfig(**W), patch_size=4, num_classes=3, image_size=8, channels=1)
    mt = Translation(backbone=TransformerConfig(**W), vocab_size=40, source_vocab_size=40)
    clip = CLIP(
        image=ImageEncoderConfig(backbone=TransformerConfig(**W, position="none"), image_size=8, patch_size=4,
                                 channels=1),
        text=TextEncoderConfig(backbone=TransformerConfig(**W, position="learned", max_len=8, causal=True)),
        embed_dim=8, vocab_size=30, eos_id=29,
    )  # fmt: skip
    return {"lm": lm, "vit": vit, "translation": mt, "clip": clip}
