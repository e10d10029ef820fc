"""CLIP task: the loss against its formula, text pooling, temperature clamp, zero-shot and retrieval metrics on
hand-built cases, what it takes from the data module's `DataInfo`, media(), checkpoint round trip and a tiny Lightning
fit."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing.loading import load_task
from polyformer.data.image_text import ImageTextData, tokenize
from polyformer.data.info import DataInfo
from polyformer.data.tokenizers import byte_level, decode_rows
from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig
from polyformer.tasks.contrastive_loss import contrastive_loss, gather_uneven, retrieval_recall, topk_hits
from polyformer.tasks.media import Heatmap, MediaRequest, Scalars, Table


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
    clip = model.model
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(padded), clip.encode_text(tokens))
        pooled = clip.text(tokens)
        full = clip.text.encoder(clip.text.embed(tokens))
    torch.testing.assert_close(pooled[0], full[0, 6])  # [eos] s e v e n [eos]: position 6
    # Too long: cut, and end-of-text is kept as the last token.
    long = tokenize(tok, ["x" * 40], 12)
    assert long[0, -1] == tok.eos_id and long.shape == (1, 12)


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    clip = tiny_clip().model
    assert clip.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    assert clip.scale().item() == pytest.approx(100.0)


def test_zero_shot_uses_averaged_normalized_prompt_embeddings():
    model = tiny_clip().eval()
    names, prompts = ["zero", "one"], ["{}", "a photo of {}"]
    classifier = model.class_embeddings(names, prompts)
    with torch.no_grad():
        each = model.model.encode_text(tokenize(model.tokenizer, [p.format(n) for n in names for p in prompts], 12))
    expected = F.normalize(each.view(2, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(classifier, expected)


def test_score_returns_probabilities_over_texts():
    model = tiny_clip().eval()
    probs = model.score(torch.randn(3, 1, 8, 8), ["zero", "one", "two", "three"])
    assert probs.shape == (3, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_score_classes_averages_the_stored_prompts():
    model = tiny_clip().eval()
    model.class_names, model.prompts = ["zero", "one", "two"], ["{}", "a photo of {}"]
    images = torch.randn(2, 1, 8, 8)
    probs = model.score_classes(images)
    with torch.no_grad():
        classifier = model.class_embeddings(["zero", "one", "two"], model.prompts)  # (C, E)
        logits = model.model.scale() * model.model.encode_image(images) @ classifier.T
    torch.testing.assert_close(probs, logits.softmax(-1))
    model.class_names = None
    with pytest.raises(ValueError, match="no class names"):
        model.score_classes(images)


def test_sizes_tokenizer_classes_and_preprocessing_come_from_data_info():
    image = ImageEncoderConfig(TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="none"), 8, 4, 1)
    text = TextEncoderConfig(
        TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="learned", max_len=12, causal=True)
    )
    model = CLIP(image=image, text=text, embed_dim=8)
    assert model.model is None and model.missing_sizes() == ["vocab_size", "eos_id"]
    tok = byte_level()
    info = DataInfo(tokenizer=tok, vocab_size=tok.vocab_size, eos_id=tok.eos_id, class_names=("zero", "one"),
                    prompts=("{}",), image_size=8, channels=1, mean=(0.5,), std=(0.5,))  # fmt: skip
    model.connect_data(info)
    assert model.build() and model.model.cfg.vocab_size == tok.vocab_size and model.model.cfg.eos_id == tok.eos_id
    assert model.hparams["vocab_size"] == tok.vocab_size and model.hparams["eos_id"] == tok.eos_id  # checkpointed
    assert model.tokenizer is tok and model.class_names == ["zero", "one"] and model.prompts == ["{}"]
    assert model.preprocess == {"image_size": 8, "channels": 1, "mean": (0.5,), "std": (0.5,)}
    with pytest.raises(ValueError, match="3-channel images but model.image.channels is 1"):
        model.connect_data(DataInfo(channels=3))


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
    assert set(model.per_class_top1) == set(data.class_names)
    assert len(model.retrievals) == 8 and "\x00" not in model.retrievals[0].caption
    assert len(model.retrievals[0].retrieved) == len(model.retrievals[0].scores) == 3
    ckpt = tmp_path / "clip.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_task(ckpt, expected=CLIP)
    assert loaded.class_names == data.class_names and loaded.tokenizer.to_json() == data.tokenizer.to_json()
    assert loaded.preprocess["image_size"] == 8 and loaded.preprocess["mean"] == [0.5]
    images = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.score(images, ["one", "two"]), model.eval().score(images, ["one", "two"]))


def test_media_shows_similarity_zero_shot_per_class_and_retrieval(tmp_path):
    """After a validation: the similarity heatmap of the first validation batch (what its validation step computed),
    zero-shot top-1 per class as a table and scalars, and the nearest captions of the first evaluation images."""
    L.seed_everything(0)
    image = ImageEncoderConfig(TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="none"), 8, 4, 1)
    text = TextEncoderConfig(
        TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="learned", max_len=32, causal=True)
    )
    model = CLIP(image=image, text=text, embed_dim=8)
    data = ImageTextData(batch_size=32, eval_batch_size=16, context_length=32)
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        enable_model_summary=False, enable_checkpointing=False, val_check_interval=1, check_val_every_n_epoch=None,
    )  # fmt: skip
    trainer.fit(model, data)
    batch = {k: v[:6] for k, v in next(iter(data.val_dataloader())).items()}  # the callback's first rows
    items = model.media(batch, MediaRequest(num_samples=3, similarity_size=4))
    by_key = {getattr(item, "key", "scalars"): item for item in items}
    # + the image tower's attention overlay (drawn by the media callback from recorded attention; tested there)
    assert set(by_key) == {"similarity", "zero_shot_per_class", "scalars", "retrieval", "attention_overlay"}

    heatmap = by_key["similarity"]
    assert isinstance(heatmap, Heatmap) and heatmap.matrix.shape == (4, 4)
    with torch.no_grad():
        expected = model.eval().model.similarity(batch["image"][:4], batch["text"][:4])
    torch.testing.assert_close(heatmap.matrix, expected, rtol=1e-4, atol=1e-4)
    assert heatmap.xlabels == decode_rows(data.tokenizer, batch["text"][:4]) and len(heatmap.ylabels) == 4

    per_class = by_key["zero_shot_per_class"]
    assert isinstance(per_class, Table) and per_class.columns == ["class", "top1"]
    assert [row[0] for row in per_class.rows] == [c for c in data.class_names if c in model.per_class_top1]
    scalars = by_key["scalars"]
    assert isinstance(scalars, Scalars)
    assert scalars.values == {f"val/zero_shot_top1/{c}": v for c, v in model.per_class_top1.items()}

    retrieval = by_key["retrieval"]
    assert isinstance(retrieval, Table) and retrieval.columns == ["image", "caption", "retrieved (cosine)"]
    assert len(retrieval.rows) == 3
    for i, (picture, caption, retrieved) in enumerate(retrieval.rows):
        assert torch.equal(picture, batch["image"][i])  # the gathered set starts with this batch
        assert caption == decode_rows(data.tokenizer, batch["text"][i : i + 1])[0]
        assert retrieved.count(" | ") == 2
    # Without images in the batch the table keeps its text columns.
    text_only = model.media({"text": batch["text"]}, MediaRequest(num_samples=3, similarity_size=4))
    assert next(i for i in text_only if getattr(i, "key", "") == "retrieval").columns == [
        "caption",
        "retrieved (cosine)",
    ]
