"""ONNX export (polyformer.weights.onnx) against PyTorch: every graph of the four models run by onnxruntime at two
batch sizes and sequence lengths other than the traced ones, greedy decoding through the KV-cached step graphs, the
manifest, and the refusals. Models are tiny and each is exported once per module (exporting dominates the time)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig
from polyformer.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.models.vit import ViT, ViTConfig
from polyformer.weights import onnx as onnx_export

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

ATOL = 1e-4
VOCAB = 40


def backbone(**kwargs) -> TransformerConfig:
    return TransformerConfig(**{"width": 32, "depth": 1, "heads": 4, "dropout": 0.0, "max_len": 32, **kwargs})


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # CI's two cores are shared with the suite
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export(model: torch.nn.Module, folder: Path) -> tuple[torch.nn.Module, Path]:
    model.eval()
    return model, onnx_export.export_onnx(model, folder)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    torch.manual_seed(0)
    # Two layers (the past is per layer), grouped-query attention and rotary positions (taken from the input).
    cfg = GPTConfig(backbone(depth=2, kv_heads=2, causal=True, position="rotary"), vocab_size=VOCAB)
    return export(GPT(cfg), tmp_path_factory.mktemp("gpt") / "onnx")


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig(backbone(), vocab_size=VOCAB, source_vocab_size=VOCAB)  # sinusoidal positions
    return export(EncoderDecoder(cfg), tmp_path_factory.mktemp("seq2seq") / "onnx")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ViTConfig(backbone(position="none"), image_size=16, patch_size=8, channels=3, num_classes=5)
    return export(ViT(cfg), tmp_path_factory.mktemp("vit") / "onnx")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(0)
    image = ImageEncoderConfig(backbone(position="none"), image_size=16, patch_size=8)
    text = TextEncoderConfig(backbone(position="learned", causal=True))
    cfg = CLIPConfig(image, text, embed_dim=16, vocab_size=VOCAB, eos_id=VOCAB - 1, init_logit_scale=20.0)
    return export(CLIP(cfg), tmp_path_factory.mktemp("clip") / "onnx")


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (batch, length))


def greedy_onnx(step: ort.InferenceSession, prompt: np.ndarray, steps: int, manifest: dict, extra: dict) -> np.ndarray:
    """Greedy decoding through a step graph: the whole prompt against an empty past, then one token per step."""
    cache = manifest["cache"]
    batch = prompt.shape[0]
    past = {
        f"past_{kind}_{i}": np.zeros((batch, cache["kv_heads"], 0, cache["head_dim"]), np.float32)
        for i in range(cache["layers"])
        for kind in ("key", "value")
    }
    new, out = prompt, prompt
    for _ in range(steps):
        cached = next(iter(past.values())).shape[2]
        positions = np.arange(cached, cached + new.shape[1])[None].repeat(batch, 0)
        mask = np.ones((batch, cached + new.shape[1]), bool)
        logits, *present = step.run(
            None, {"tokens": new, "positions": positions, "attention_mask": mask, **past, **extra}
        )
        new = logits[:, -1].argmax(-1)[:, None]
        out = np.concatenate([out, new], axis=1)
        past = {
            name.replace("present", "past"): t for name, t in zip([o.name for o in step.get_outputs()][1:], present)
        }
    return out


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "export.json").read_text())


def test_gpt_full_forward_matches_pytorch(gpt):
    model, folder = gpt
    run = session(folder / "model.onnx")
    for batch, length in [(1, 2), (3, 9)]:  # traced at batch 2, length 7
        x = tokens(batch, length)
        (logits,) = run.run(None, {"tokens": x.numpy()})
        np.testing.assert_allclose(logits, model(x).detach().numpy(), atol=ATOL)


def test_gpt_greedy_decoding_through_the_kv_step_equals_pytorch(gpt):
    model, folder = gpt
    step = session(folder / "decoder_step.onnx")
    for batch, length in [(1, 2), (3, 5)]:  # traced at batch 2, 3 new tokens after 4 cached
        prompt = tokens(batch, length)
        expected = prompt
        with torch.no_grad():
            for _ in range(5):
                expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
        np.testing.assert_array_equal(greedy_onnx(step, prompt.numpy(), 5, manifest_of(folder), {}), expected.numpy())


def test_gpt_step_logits_and_cache_match_pytorch(gpt):
    """One step after a left-padded prompt: the attention mask and positions are taken as given."""
    model, folder = gpt
    step = session(folder / "decoder_step.onnx")
    prompt, mask = tokens(3, 6), torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False  # row 0 is left-padded by two
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = model.new_cache()
    with torch.no_grad():
        expected = model(prompt, padding_mask=mask, positions=positions, cache=cache)
    names = [i.name for i in step.get_inputs()][3:]
    empty = {n: np.zeros((3, 2, 0, 8), np.float32) for n in names}
    feed = {"tokens": prompt.numpy(), "positions": positions.numpy(), "attention_mask": mask.numpy(), **empty}
    logits, *present = step.run(None, feed)
    np.testing.assert_allclose(logits, expected.numpy(), atol=ATOL)
    flat = [t for block in cache for t in (block["self"]["k"], block["self"]["v"])]
    for ours, theirs in zip(present, flat):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=ATOL)


def test_encoder_decoder_matches_pytorch_and_decodes_greedily_alike(seq2seq):
    model, folder = seq2seq
    encoder, decoder = session(folder / "encoder.onnx"), session(folder / "decoder.onnx")
    for batch, length in [(1, 3), (3, 8)]:  # traced at batch 2, source length 5
        source = tokens(batch, length)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[-1, length - 1 :] = False  # the last row is right-padded
        with torch.no_grad():
            memory = model.encode(source, mask)
        (ours,) = encoder.run(None, {"source": source.numpy(), "source_padding_mask": mask.numpy()})
        np.testing.assert_allclose(ours, memory.numpy(), atol=ATOL)

        start = torch.zeros(batch, 1, dtype=torch.long)
        expected = start
        with torch.no_grad():
            for _ in range(4):
                next_token = model.decode(expected, memory, mask)[:, -1].argmax(-1, keepdim=True)
                expected = torch.cat([expected, next_token], dim=1)
        extra = {"memory": memory.numpy(), "memory_mask": mask.numpy()}
        decoded = greedy_onnx(decoder, start.numpy(), 4, manifest_of(folder), extra)
        np.testing.assert_array_equal(decoded, expected.numpy())


def test_vit_matches_pytorch(vit):
    model, folder = vit
    run = session(folder / "model.onnx")
    for batch in (1, 3):  # traced at 2
        images = torch.randn(batch, 3, 16, 16)
        (logits,) = run.run(None, {"images": images.numpy()})
        np.testing.assert_allclose(logits, model(images).detach().numpy(), atol=ATOL)


def test_clip_towers_and_scale_match_pytorch(clip):
    model, folder = clip
    image, text = session(folder / "image_encoder.onnx"), session(folder / "text_encoder.onnx")
    for batch, length in [(1, 3), (3, 10)]:  # traced at batch 2, length 7
        images, ids = torch.randn(batch, 3, 16, 16), tokens(batch, length)
        ids[:, -2] = VOCAB - 1  # end-of-text before one padding token
        (image_embeds,) = image.run(None, {"images": images.numpy()})
        (text_embeds,) = text.run(None, {"tokens": ids.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(image_embeds, model.encode_image(images).numpy(), atol=ATOL)
            np.testing.assert_allclose(text_embeds, model.encode_text(ids).numpy(), atol=ATOL)
    scale = json.loads((folder / "logit_scale.json").read_text())["logit_scale"]
    assert scale == pytest.approx(20.0) and manifest_of(folder)["logit_scale"] == scale


def test_manifests_describe_the_files_and_graphs(gpt, seq2seq, vit, clip):
    expected = {
        "GPT": ["decoder_step.onnx", "export.json", "model.onnx"],
        "EncoderDecoder": ["decoder.onnx", "encoder.onnx", "export.json"],
        "ViT": ["export.json", "model.onnx"],
        "CLIP": ["export.json", "image_encoder.onnx", "logit_scale.json", "text_encoder.onnx"],
    }
    for model, folder in (gpt, seq2seq, vit, clip):
        manifest = manifest_of(folder)
        assert manifest["model"] == type(model).__name__ and manifest["opset"] == onnx_export.OPSET
        assert manifest["files"] == expected[manifest["model"]] == sorted(p.name for p in folder.iterdir())
        for file, graph in manifest["graphs"].items():
            run = session(folder / file)
            assert [i["name"] for i in graph["inputs"]] == [i.name for i in run.get_inputs()]
            assert [o["name"] for o in graph["outputs"]] == [o.name for o in run.get_outputs()]
    step = manifest_of(gpt[1])["graphs"]["decoder_step.onnx"]
    assert step["inputs"][0]["shape"] == ["batch", "seq"] and step["inputs"][3]["shape"] == ["batch", 2, "past", 8]
    assert manifest_of(vit[1])["graphs"]["model.onnx"]["inputs"][0]["shape"] == ["batch", 3, 16, 16]


def test_refuses_a_non_empty_folder_a_file_and_other_models(tmp_path):
    model = ViT(ViTConfig(backbone(position="none"), image_size=16, patch_size=8, channels=3, num_classes=5))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        onnx_export.export_onnx(model, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        onnx_export.export_onnx(model, tmp_path / "file")
    with pytest.raises(TypeError, match="GPT, EncoderDecoder, ViT, CLIP"):
        onnx_export.export_onnx(torch.nn.Linear(2, 2), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_an_export(vit):
    model, folder = vit  # after every other use of this export
    manifest = (folder / "export.json").read_text()
    assert onnx_export.export_onnx(model, folder, overwrite=True) == folder
    assert (folder / "export.json").read_text() == manifest and not list(folder.glob(".onnx-export-*"))


def test_without_the_extra_the_module_imports_and_export_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    spec = importlib.util.spec_from_file_location("onnx_export_probe", onnx_export.__file__)
    probe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, probe)  # dataclasses look their module up there
    spec.loader.exec_module(probe)  # the module itself imports without onnx
    model = ViT(ViTConfig(backbone(position="none"), image_size=16, patch_size=8, channels=3, num_classes=5))
    with pytest.raises(ImportError, match=r"pip install 'polyformer\[export\]'"):
        probe.export_onnx(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
