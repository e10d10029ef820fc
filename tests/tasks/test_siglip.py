"""SigLIP (CLIP task with loss="siglip", Zhai et al. 2023): the sigmoid loss against its formula written out, its
init (t = 10, b = -10), gradients to t and b, the native export round trip of b, and zero-shot evaluation, scoring and
checkpoints after a tiny fit."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing.loading import load_task
from polyformer.data.image_text import ImageTextData
from polyformer.data.tokenizers import byte_level
from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig
from polyformer.tasks.contrastive_loss import sigmoid_loss
from polyformer.weights.native import export_safetensors, load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest


def tiny_siglip(width: int = 16, patch: int = 4, max_len: int = 12, **kw) -> CLIP:
    torch.manual_seed(0)
    image = ImageEncoderConfig(
        TransformerConfig(width=width, depth=1, heads=2, dropout=0.0, position="none"), 8, patch, 1
    )
    text = TextEncoderConfig(
        TransformerConfig(width=width, depth=1, heads=2, dropout=0.0, position="learned", max_len=max_len, causal=True)
    )
    tok = byte_level()
    model = CLIP(image=image, text=text, embed_dim=8, vocab_size=tok.vocab_size, eos_id=tok.eos_id, loss="siglip", **kw)
    model.configure_model()
    model.tokenizer = tok
    return model


def test_sigmoid_loss_equals_the_formula_by_hand():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.1], [0.5, 0.9], [-0.2, 1.0]]), dim=-1)
    t, b = torch.tensor(10.0), torch.tensor(-3.0)
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            logit = t * float(image[i] @ text[j]) + b
            total += math.log(1 / (1 + math.exp(-z * logit)))  # log sigmoid(z * logit), written out
    torch.testing.assert_close(sigmoid_loss(image, text, t, b), torch.tensor(-total / 3))
    # Aligned pairs with a bias that separates them give ~0; a wrong sign of the bias makes every negative a loss.
    eye = torch.eye(3)
    assert sigmoid_loss(eye, eye, torch.tensor(100.0), torch.tensor(-50.0)) < 1e-6
    assert sigmoid_loss(eye, eye, torch.tensor(100.0), torch.tensor(50.0)) > 50


def test_init_and_gradients_reach_temperature_and_bias():
    model = tiny_siglip()
    clip = model.model
    torch.testing.assert_close(clip.scale(), torch.tensor(10.0))  # log t = log 10
    torch.testing.assert_close(clip.bias(), torch.tensor(-10.0))
    tokens = torch.randint(0, 256, (4, 12))
    model.objective(*clip(torch.randn(4, 1, 8, 8), tokens)).backward()
    assert clip.logit_scale.grad.abs().item() > 0 and clip.logit_bias.grad.abs().item() > 0
    missing = [n for n, p in clip.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing
    assert "logit_bias" not in CLIP(embed_dim=8, vocab_size=258, eos_id=257).state_dict()  # unchanged for CLIP


def test_bad_loss_fails_clearly():
    with pytest.raises(ValueError, match="loss"):
        CLIP(embed_dim=8, vocab_size=258, eos_id=257, loss="sigmoid")


def test_native_export_round_trips_the_bias(tmp_path):
    model = tiny_siglip()
    with torch.no_grad():
        model.model.logit_bias.fill_(-4.25)
    loaded = load_model(export_safetensors(model.model, tmp_path / "siglip"))
    assert loaded.cfg.loss == "siglip"
    torch.testing.assert_close(loaded.logit_bias, model.model.logit_bias)
    images, tokens = torch.randn(2, 1, 8, 8), torch.randint(0, 256, (3, 12))
    torch.testing.assert_close(loaded.similarity(images, tokens), model.model.eval().similarity(images, tokens))


def test_tiny_fit_zero_shot_score_and_checkpoint(tmp_path):
    L.seed_everything(0)
    model = tiny_siglip(width=32, patch=2, max_len=32)
    data = ImageTextData(batch_size=64, context_length=32)
    trainer = L.Trainer(
        max_steps=6, limit_val_batches=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        enable_model_summary=False, val_check_interval=6, check_val_every_n_epoch=None,
    )  # fmt: skip
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/logit_bias", "val/loss", "val/zero_shot_top1", "val/image_to_text_R@1"):
        assert key in metrics and torch.isfinite(metrics[key])
    assert set(model.per_class_top1) == set(data.class_names)
    ckpt = tmp_path / "siglip.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_task(ckpt, expected=CLIP).eval()
    assert loaded.loss == "siglip"
    torch.testing.assert_close(loaded.model.logit_bias, model.model.logit_bias)
    images = torch.randn(2, 1, 8, 8)
    probs = loaded.score(images, ["one", "two", "three"])  # independent sigmoids per pair
    expected = loaded.model.similarity(images, loaded._tokenize(["one", "two", "three"])).sigmoid()
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(loaded.score_classes(images).sum(-1), torch.ones(2))
