"""CLIP task: the loss against its formula, text pooling, temperature clamp, zero-shot and retrieval metrics on
hand-built cases, checkpoint round trip and a tiny Lightning fit."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing.loading import load_task
from polyformer.data.image_text import ImageTextData, tokenize
from polyformer.data.tokenizers import byte_level
from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig
from polyformer.tasks.contrastive_loss import contrastive_loss, gather_uneven, retrieval_recall, topk_hits


def tiny_clip(**kw) -> CLIP:
    torch.manual_seed(0)
    image = ImageEncoderConfig(TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="none"), 8, 4, 1)
    text = TextEncoderConfig(
        TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="learned", max_len=12, causal=True)
    )
    tok = byte_level()
    model = CLIP(image=image, text=text, embed_dim=8, vocab_size=tok.vocab_size, eos_id=tok.eos_id, **kw)
    model.configure_model()
    model.tokenizer = tok
    return model


def test_loss_equals_symmetric_cross_entropy_formula():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.1], [0.5, 0.9], [-0.2, 1.0]]), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T  # written out: -log softmax of the diagonal, rows and columns
    i2t = -torch.stack([logits[i].log_softmax(0)[i] for i in range(3)]).mean()
    t2i = -torch.stack([logits[:, j].log_softmax(0)[j] for j in range(3)]).mean()
    torch.testing.assert_close(contrastive_loss(image, text, scale), (i2t + t2i) / 2)
    # Perfectly aligned, well separated pairs at a high temperature give ~0 loss; swapped pairs a large one.
    eye = torch.eye(3)
    assert contrastive_loss(eye, eye, torch.tensor(100.0)) < 1e-6
    assert contrastive_loss(eye, eye.flip(0), torch.tensor(100.0)) > 50


def test_topk_and_retrieval_recall_on_hand_built_case():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.4]])
    hits = topk_hits(logits, torch.tensor([0, 0, 2]), (1, 2))
    assert hits[1].tolist() == [True, False, False] and hits[2].tolist() == [True, False, True]

    # 4 pairs; image 0 is nearest to text 1 and second nearest to its own, image 1 likewise with text 0.
    sim = torch.tensor([[0.5, 0.9, 0.0, 0.1], [0.9, 0.5, 0.1, 0.0], [0.0, 0.1, 0.9, 0.2], [0.1, 0.0, 0.2, 0.9]])
    image, text = torch.eye(4), sim.T  # image @ text.T = sim
    r = retrieval_recall(image, text, torch.arange(4), ks=(1, 2))
    assert r["image_to_text_R@1"] == 0.5 and r["text_to_image_R@1"] == 0.5
    assert r["image_to_text_R@2"] == 1.0 and r["text_to_image_R@2"] == 1.0
    # If texts 0 and 1 are the same caption, retrieving either copy is a hit.
    r = retrieval_recall(image, text, torch.tensor([0, 0, 1, 2]), ks=(1,))
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_R@1"] == 1.0


def test_gather_uneven_without_process_group_is_identity():
    x = torch.arange(6.0).view(3, 2)
    assert gather_uneven(x) is x


def test_text_tower_pools_last_end_of_text_and_ignores_padding():
    model = tiny_clip().eval()
    tok = model.tokenizer
    tokens = tokenize(tok, ["seven", "a photo of a seven"], 12)
    assert tokens[0, 0] == tok.eos_id == tok.bos_id  # byte-level: bos is eos, so pooling must take the last one
    padded = tokens.clone()
    padded[0, 7:] = 123  # anything after end-of-text is invisible under the causal mask
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(tokens))
        pooled = model.text(tokens)
        full = model.text.encoder(model.text.embed(tokens))
    torch.testing.assert_close(pooled[0], full[0, 6])  # [eos] s e v e n [eos]: position 6
    # Too long: cut, and end-of-text is kept as the last token.
    long = tokenize(tok, ["x" * 40], 12)
    assert long[0, -1] == tok.eos_id and long.shape == (1, 12)


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    model = tiny_clip()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0)


def test_zero_shot_uses_averaged_normalized_prompt_embeddings():
    model = tiny_clip().eval()
    names, prompts = ["zero", "one"], ["{}", "a photo of {}"]
    classifier = model.class_embeddings(names, prompts)
    with torch.no_grad():
        each = model.encode_text(tokenize(model.tokenizer, [p.format(n) for n in names for p in prompts], 12))
    expected = F.normalize(each.view(2, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(classifier, expected)


def test_score_returns_probabilities_over_texts():
    model = tiny_clip().eval()
    probs = model.score(torch.randn(3, 1, 8, 8), ["zero", "one", "two", "three"])
    assert probs.shape == (3, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="causal"):
        TextEncoderConfig(TransformerConfig(width=16, depth=1, heads=2, causal=False))
    with pytest.raises(ValueError, match="init_logit_scale"):
        CLIP(init_logit_scale=200.0)
    with pytest.raises(ValueError, match="context_length"):
        tokenize(byte_level(), ["a"], 1)


def test_every_parameter_gets_a_gradient():
    model = tiny_clip()
    tokens = tokenize(model.tokenizer, ["one", "two", "three"], 12)
    contrastive_loss(*model(torch.randn(3, 1, 8, 8), tokens)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_tiny_fit_logs_metrics_and_checkpoint_round_trips(tmp_path):
    L.seed_everything(0)
    image = ImageEncoderConfig(TransformerConfig(width=32, depth=1, heads=2, dropout=0.0, position="none"), 8, 2, 1)
    text = TextEncoderConfig(
        TransformerConfig(width=32, depth=1, heads=2, dropout=0.0, position="learned", max_len=32, causal=True)
    )
    model = CLIP(image=image, text=text, embed_dim=32)
    data = ImageTextData(batch_size=64, context_length=32)
    trainer = L.Trainer(
        max_steps=6, limit_val_batches=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        enable_model_summary=False, val_check_interval=6, check_val_every_n_epoch=None,
    )  # fmt: skip
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/zero_shot_top1", "val/zero_shot_top5", "val/image_to_text_R@10"):
        assert key in metrics and torch.isfinite(metrics[key])
    assert set(model.zero_shot_per_class) == set(data.class_names)
    assert len(model.retrieval_examples) == 8 and "\x00" not in model.retrieval_examples[0]["caption"]
    ckpt = tmp_path / "clip.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_task(ckpt, expected=CLIP)
    assert loaded.class_names == data.class_names and loaded.tokenizer.to_json() == data.tokenizer.to_json()
    assert loaded.preprocess["image_size"] == 8 and loaded.preprocess["mean"] == [0.5]
    images = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.score(images, ["one", "two"]), model.eval().score(images, ["one", "two"]))
