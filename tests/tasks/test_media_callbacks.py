"""Per-task media and training statistics, in-process tiny fits logged to real offline W&B runs read back from their
files; the same callbacks with TensorBoard, CSV and no logger at all."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
from wandb_reader import offline_runs, read_run

from polyformer.backbone import TransformerConfig
from polyformer.callbacks.media import TaskMedia, group_attention
from polyformer.callbacks.stats import LearningRate, TrainingStats, token_count
from polyformer.loggers import RunMetadata, WandbLogger
from polyformer.tasks.base import TaskModule
from polyformer.tasks.media import Heatmap, Images, Scalars, Table

TINY = dict(width=32, depth=2, heads=2, dropout=0.0)


def lm_task():
    from polyformer.data.text import TextDataModule
    from polyformer.tasks.language_model import LanguageModel, SamplingConfig

    model = LanguageModel(
        TransformerConfig(**TINY, position="learned", max_len=64, causal=True),
        samples=SamplingConfig(prompts=["The ", "A "], max_new_tokens=8),
    )
    return model, TextDataModule(tokenizer="byte", block_size=16, batch_size=8)


def translation_task():
    from polyformer.data.translation import TranslationData
    from polyformer.tasks.translation import DecodingConfig, Translation

    data = TranslationData(bpe_vocab_size=300, batch_size=8, train_size=200, val_size=16, test_size=16)
    return Translation(TransformerConfig(**TINY, max_len=128), decoding=DecodingConfig(beam_size=1)), data


def vit_task():
    from polyformer.data.images import ImageDataModule
    from polyformer.tasks.image_classification import ImageClassifier

    model = ImageClassifier(TransformerConfig(**TINY, position="none"), patch_size=4, num_misclassified=4)
    return model, ImageDataModule(dataset="digits", batch_size=16, eval_batch_size=32)


def clip_task():
    from polyformer.data.image_text import ImageTextData
    from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig

    image = ImageEncoderConfig(TransformerConfig(**TINY, position="none"), image_size=8, patch_size=2, channels=1)
    text = TextEncoderConfig(TransformerConfig(**TINY, position="learned", max_len=32, causal=True))
    return CLIP(image=image, text=text, embed_dim=16), ImageTextData(batch_size=16, eval_batch_size=32)


def fit(model, data, logger, tmp_path, callbacks=None, steps=4, limit_val_batches=1):
    callbacks = callbacks if callbacks is not None else [
        RunMetadata(), TaskMedia(num_samples=3, max_new_tokens=6), TrainingStats(window_size=2), LearningRate()
    ]  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=limit_val_batches,
        log_every_n_steps=1,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=logger is not False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return trainer


@pytest.fixture
def wandb_run(tmp_path, monkeypatch):
    """A fit logged to an offline W&B run in tmp_path, read back after wandb.finish() has flushed it."""
    import wandb

    monkeypatch.setenv("POLYFORMER_CACHE", str(tmp_path / "cache"))

    def run(make_task, **kwargs):
        model, data = make_task()
        trainer = fit(model, data, WandbLogger(save_dir=str(tmp_path), offline=True), tmp_path, **kwargs)
        wandb.finish()
        (run_dir,) = offline_runs(tmp_path)
        return trainer, read_run(run_dir)

    yield run
    wandb.finish()
    wandb.teardown()  # stops wandb-core, so no later subprocess inherits its address (WANDB_SERVICE)


def check_common(run, trainer):
    keys = run.metric_keys()
    # FLOP/s from each task's `training_flops` (MFU needs a GPU's peak, so not here)
    expected = {"train/grad_norm", "memory/peak_rss_gb", "train/device/samples_per_sec", "train/device/flops_per_sec"}
    assert expected <= keys, sorted(keys)
    assert any(k.startswith("lr-AdamW") for k in keys), sorted(keys)
    # grad norm every step (log_every_n_steps=1), at the trainer's steps, positive and finite
    steps = [s for s, _ in run.values("train/grad_norm")]
    assert steps == list(range(trainer.global_step)), steps
    assert all(0 < v < float("inf") for _, v in run.values("train/grad_norm"))
    # the resolved config is not there in-process (no CLI), but the model's hyperparameters are
    assert "backbone" in run.config


@pytest.mark.slow
def test_language_model_media(wandb_run):
    trainer, run = wandb_run(lm_task)
    check_common(run, trainer)
    assert "train/device/items_per_sec" in run.metric_keys()  # tokens/s
    assert [s for s, _ in run.values("media/samples._type")] == [2, 4]  # after each of the two validations
    (table, *_) = run.media("table", "media/samples")
    content = json.loads(table.read_text())
    assert content["columns"] == ["step", "prompt", "continuation"]
    assert [row[1] for row in content["data"]] == ["The ", "A "]
    assert all(isinstance(row[2], str) for row in content["data"])
    assert run.media("images", "media/attention/backbone/attn")


@pytest.mark.slow
def test_translation_media(wandb_run):
    trainer, run = wandb_run(translation_task)
    check_common(run, trainer)
    table = json.loads(run.media("table", "media/translations")[0].read_text())
    assert table["columns"] == ["source", "reference", "hypothesis", "sentence_bleu"]
    assert len(table["data"]) == 3 and all(0 <= row[3] <= 100 for row in table["data"])
    assert all(row[0] and row[1] for row in table["data"])
    sig = json.loads(run.media("table", "media/sacrebleu")[0].read_text())
    assert sig["data"][0][0] == "bleu" and sig["data"][0][2].startswith("nrefs:1")
    # encoder self-attention, decoder self- and cross-attention
    for key in ("encoder/attn", "decoder/attn", "decoder/cross_attn"):
        assert run.media("images", f"media/attention/{key}"), key


def test_image_classification_media(wandb_run):
    trainer, run = wandb_run(vit_task)
    check_common(run, trainer)
    assert run.media("images", "media/confusion_matrix")
    shots = run.media("images", "media/misclassified")
    assert shots  # an untrained 10-class model gets most digits wrong
    row = next(r for r in run.history if "media/misclassified.captions" in r or "media/misclassified._type" in r)
    assert row["trainer/global_step"] == 2
    # The class token's attention over the patches, per layer and rolled out, over 4 images, after each validation;
    # no token x token grids for the image tower any more.
    overlays = run.media("images", "media/attention_overlay")
    assert len(overlays) == 2 and [s for s, _ in run.values("media/attention_overlay._type")] == [2, 4]
    picture = np.asarray(PIL.Image.open(overlays[0]))
    assert picture.shape[0] > 400 and picture.shape[1] > 500  # 4 rows; image, 2 layers, rollout
    assert not any(k.startswith("media/attention/") for k in run.metric_keys()), sorted(run.metric_keys())


@pytest.mark.slow
def test_clip_media(wandb_run):
    trainer, run = wandb_run(clip_task)
    assert trainer.global_step == 4 and "image" in run.config  # CLIP's hyperparameters: two towers, no "backbone"
    assert run.media("images", "media/similarity")  # with image thumbnails beside the rows
    similarity = np.asarray(PIL.Image.open(run.media("images", "media/similarity")[0]))[..., :3]
    assert (similarity[:, : similarity.shape[1] // 4] < 60).all(-1).sum() > 100  # dark digit backgrounds, left
    assert run.media("images", "media/attention_overlay")  # the image tower: overlays
    assert run.media("images", "media/attention/text.encoder/attn")  # the text tower: token x token grids
    assert not run.media("images", "media/attention/image.encoder/attn")


@pytest.mark.slow
def test_language_model_without_validation_logs_samples_at_fit_end(wandb_run):
    trainer, run = wandb_run(lm_task, steps=2, limit_val_batches=0)
    assert trainer.global_step == 2
    assert [s for s, _ in run.values("media/samples._type")] == [2]  # once, at fit end
    content = json.loads(run.media("table", "media/samples")[0].read_text())
    assert [row[1] for row in content["data"]] == ["The ", "A "] and all(row[2] for row in content["data"])


def test_group_attention_picks_layers_and_heads():
    maps = {f"encoder.blocks.{i}.attn": torch.rand(4, 5, 5) for i in range(3)}
    maps["decoder.blocks.0.cross_attn"] = torch.rand(4, 5, 7)
    groups = group_attention(maps, layers=[0, 2], heads=[1, 3], max_heads=4)
    assert sorted(groups) == ["decoder/cross_attn", "encoder/attn"]
    assert sorted(groups["encoder/attn"]) == [0, 2]
    torch.testing.assert_close(groups["encoder/attn"][2], maps["encoder.blocks.2.attn"][[1, 3]])


def test_attention_recorder_recomputes_maps_from_hooked_inputs_and_leaves_the_model_alone():
    from polyformer.backbone import build_mask
    from polyformer.callbacks.attention_maps import AttentionRecorder, attention_weights
    from polyformer.tasks.language_model import LanguageModel

    torch.manual_seed(0)
    cfg = TransformerConfig(**TINY, position="rotary", causal=True)
    task = LanguageModel(cfg, vocab_size=40, activation_checkpointing=True)  # wrapped blocks: names are cleaned
    task.configure_model()  # applies the checkpoint wrappers (the model itself was built in __init__)
    task.eval()
    model = task.model
    tokens, pad = torch.randint(0, 40, (3, 6)), torch.ones(3, 6, dtype=torch.bool)
    pad[0, 4:] = False
    with torch.no_grad():
        expected_logits = task(tokens, padding_mask=pad)
        recorder = AttentionRecorder(model, max_tokens=5)
        logits = task(tokens, padding_mask=pad)
        recorder.remove()
    assert torch.equal(logits, expected_logits)  # hooks only read
    assert not any(m._forward_hooks for m in task.modules())
    assert sorted(recorder.maps) == ["backbone.blocks.0.attn", "backbone.blocks.1.attn"]
    # Layer 0 by hand: its attention sees norm1 of the embeddings, the padding mask and rotary positions.
    block = model.backbone.blocks[0]
    mask = build_mask(6, 6, causal=True, window=None, padding_mask=pad, device=tokens.device)
    rope = model.backbone.rope(torch.arange(6)[None])
    with torch.no_grad():
        hand = attention_weights(block.attn, block.norm1(model.embed(tokens)), mask=mask, rope=rope)[0, :, :5, :5]
    torch.testing.assert_close(recorder.maps["backbone.blocks.0.attn"], hand)
    assert (hand[:, :, 4] == 0).all() and (hand.triu(1) == 0).all()  # a padded key, and the future, get no weight

    # Cached decoding steps and weights over the size limit are not recorded.
    decode, full = lambda: task.generate([[1, 2]], max_new_tokens=2), lambda: task(tokens)
    for kwargs, run in (({}, decode), ({"max_elements": 10}, full)):
        recorder = AttentionRecorder(model, max_tokens=5, **kwargs)
        with torch.no_grad():
            run()
        recorder.remove()
        assert recorder.maps == {}


class Shows(TaskModule):
    """A task the callback has never heard of: a linear model and one media item of every kind."""

    def __init__(self) -> None:
        super().__init__()
        self.build()

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model(batch[0]).square().mean())

    def media(self, batch, request):
        x = batch[0]
        return [
            Table("rows", ["n", "picture"], [[len(x), torch.rand(1, 4, 4)]]),
            Images("pictures", [torch.rand(3, 5, 5)], ["a caption"]),
            Heatmap("matrix", x[:3].T @ x[:3], "x x^T", annotate=True),
            Scalars({"shown/batch_rows": float(len(x))}),
        ]


def test_the_callback_logs_whatever_a_task_returns_from_media(tmp_path):
    """The contract is the method, not the task: an unknown task's Table, Images, Heatmap and Scalars all reach
    TensorBoard, with the first rows of the first validation batch (num_samples) given to media()."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=8)
    tb = TensorBoardLogger(tmp_path, name="tb")
    media = TaskMedia(num_samples=3, similarity_size=2, overlay_images=2, attention=False)
    trainer = L.Trainer(
        max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
        logger=tb, callbacks=[media], default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(Shows(), loader, loader)
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"media/pictures/0", "media/matrix/0"} <= set(tags["images"]), tags["images"]
    assert any("media/rows" in t for t in tags["tensors"]), tags["tensors"]  # add_text is stored as a tensor
    assert [e.value for e in events.Scalars("shown/batch_rows")] == [3.0]


def test_the_media_callback_knows_no_task():
    """No task is recognised by its attributes any more: the callbacks never probe a module by name."""
    import ast
    from pathlib import Path

    import polyformer.callbacks as callbacks

    probes = []
    for file in sorted(Path(callbacks.__path__[0]).glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr"):
                target = ast.unparse(node.args[0]) if node.args else ""
                if target in ("pl_module", "task", "model", "trainer.lightning_module"):
                    probes.append(f"{file.name}:{node.lineno}: {ast.unparse(node)}")
    assert probes == [], probes


def test_token_count():
    assert token_count(torch.zeros(4, 9, dtype=torch.long)) == 36
    assert token_count({"source": torch.zeros(2, 5, dtype=torch.long), "target_in": torch.zeros(2, 7).long()}) == 14
    assert token_count((torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))) == 0


def test_tensorboard_csv_and_no_logger(tmp_path, monkeypatch):
    """Media degrade to what the logger supports: images and text in TensorBoard, nothing in CSV; no logger at all
    must not crash either."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("POLYFORMER_CACHE", str(tmp_path / "cache"))
    tb, csv = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    fit(*vit_task(), [tb, csv], tmp_path, steps=2)
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert "media/confusion_matrix/0" in tags["images"], tags
    assert any(t.startswith("media/misclassified/") for t in tags["images"])
    assert "train/grad_norm" in tags["scalars"]
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/grad_norm" in metrics and "lr-AdamW" in metrics

    trainer = fit(*vit_task(), False, tmp_path / "none", steps=2)
    assert trainer.global_step == 2
