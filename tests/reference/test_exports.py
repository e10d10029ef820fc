"""Weights out: each exporter's folder loads in the foreign library (built locally, nothing downloaded) and computes
what our model computes: transformers GPT-2 logits, greedy generations and tokenization; timm ViT logits through
`pretrained_cfg_overlay` and `local-dir:`; open_clip image and text embeddings through `add_model_config` and
`local-dir:`. Importing the export back gives the same function, a model the target cannot express is refused with
every setting named before anything is written, and a non-empty folder is refused unless overwriting. Tiny shapes:
the whole file runs in seconds."""

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.data.tokenizers import byte_level
from polyformer.decoding import Decoder, sample
from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.models.vit import ViT, ViTConfig
from polyformer.weights import load_weights
from polyformer.weights.export import EXPORTERS, FORMATS, export
from polyformer.weights.gpt2 import convert_gpt2, export_hf_gpt2
from polyformer.weights.open_clip import convert_open_clip, export_open_clip
from polyformer.weights.timm_vit import convert_timm_vit, export_timm_vit, model_config

VOCAB = 258  # the byte-level tokenizer's: 256 bytes, end-of-text, pad


def perturbed(model: torch.nn.Module, std: float, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Inits leave biases and norms at 0/1: move every weight so a mis-mapped tensor cannot hide."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in skip:
                p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def gpt(**backbone: Any) -> GPT:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**dict(width=32, depth=2, heads=4, dropout=0.0, position="learned", max_len=24,
                                      causal=True, activation="gelu_tanh"), **backbone})  # fmt: skip
    # Wide random weights: logits far apart, so greedy paths are not decided by rounding.
    return perturbed(GPT(GPTConfig(cfg, vocab_size=VOCAB)), 0.3)


# --- transformers GPT-2 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone",
    [{}, dict(activation="gelu", bias=False, position="sinusoidal", norm_eps=1e-6, mlp_ratio=2.0)],
    ids=["gpt2", "gelu-no-bias-sinusoidal"],
)
def test_hf_gpt2_export_loads_in_transformers_with_our_logits_and_generations(tmp_path, backbone):
    import transformers

    model, tokenizer = gpt(**backbone), byte_level()
    out = export_hf_gpt2(model, tmp_path / "gpt2", tokenizer=tokenizer)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    theirs.eval()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(theirs(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1.0  # not a comparison of near-constant outputs
    prompts = tokens[:, :5]
    generated = theirs.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12, do_sample=False, eos_token_id=None,
        pad_token_id=tokenizer.pad_id,
    )[:, 5:].tolist()  # fmt: skip
    with torch.no_grad():
        ours = sample(Decoder(model, model.new_cache, True), prompts.tolist(), 12, 0.0, None, None, pad_id=0)
    assert ours == generated and len({t for row in ours for t in row}) > 4  # real paths, not one token
    # The tokenizer goes along: the same ids and special tokens through AutoTokenizer.
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto("héllo, world")["input_ids"] == tokenizer.encode("héllo, world")
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id) == (256, 257, 256)
    assert theirs.config.eos_token_id == 256 and theirs.config.vocab_size == VOCAB


def test_hf_gpt2_export_round_trips_through_the_importer(tmp_path):
    model = gpt()
    out = export_hf_gpt2(model, tmp_path / "gpt2")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no tokenizer given
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    assert written["transformer.wte.weight"].shape == (VOCAB, 32)  # the vocabulary, not the 320 padded rows
    _, state = convert_gpt2(written, model.cfg.padded_vocab_size)
    ours = model.state_dict()
    assert state.keys() == ours.keys()
    for key, value in state.items():  # the padded rows of embedding and head are never predicted: not exported
        rows = VOCAB if key in ("embed.weight", "head.weight") else None
        torch.testing.assert_close(value[:rows], ours[key][:rows], rtol=0, atol=0, msg=key)
    again = GPT(GPTConfig(model.cfg.backbone, vocab_size=VOCAB))
    load_weights(again, f"hf:{out}")  # init_from=hf:<export> checks the architecture and loads
    tokens = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(tokens), model(tokens), rtol=0, atol=0)


def test_hf_gpt2_export_names_every_setting_gpt2_lacks_and_writes_nothing(tmp_path):
    backbone = TransformerConfig(width=32, depth=1, heads=4, kv_heads=2, activation="swiglu", norm="rmsnorm",
                                 prenorm=False, position="rotary", causal=True, window=8, drop_path=0.1)  # fmt: skip
    model = GPT(GPTConfig(backbone, vocab_size=VOCAB, tie_embeddings=False))
    with pytest.raises(ValueError, match="cannot be exported as a transformers GPT-2") as e:
        export_hf_gpt2(model, tmp_path / "out")
    for needed in ("model.backbone.kv_heads=None (here 2)", "model.backbone.activation in", "(here 'swiglu')",
                   "model.backbone.norm='layernorm' (here 'rmsnorm')", "model.backbone.prenorm=True (here False)",
                   "model.backbone.position='learned' (here 'rotary')", "model.backbone.window=None (here 8)",
                   "model.tie_embeddings=True (here False)"):  # fmt: skip
        assert needed in str(e.value)
    assert "drop_path" not in str(e.value)  # training only: nothing to refuse
    assert not (tmp_path / "out").exists()
    small = GPT(GPTConfig(gpt().cfg.backbone, vocab_size=200))
    with pytest.raises(ValueError, match="model.vocab_size>=258"):  # the tokenizer's ids must fit the embedding
        export_hf_gpt2(small, tmp_path / "out", tokenizer=byte_level())


def test_a_non_empty_folder_is_refused_unless_overwriting(tmp_path):
    model = gpt()
    out = tmp_path / "out"
    export_hf_gpt2(model, out, tokenizer=byte_level())
    with pytest.raises(FileExistsError, match="is not empty; choose another or pass overwrite=True"):
        export_hf_gpt2(model, out)
    export_hf_gpt2(model, out, overwrite=True)
    # The earlier export's tokenizer is gone: it would pass for this export's.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is not a folder"):
        export_timm_vit(vit(), tmp_path / "file", overwrite=True)


# --- timm VisionTransformer -----------------------------------------------------------------------------------------


def vit(backbone: dict[str, Any] | None = None, **rest: Any) -> ViT:
    torch.manual_seed(0)
    b = TransformerConfig(**{**dict(width=32, depth=2, heads=2, dropout=0.0, norm_eps=1e-6), **(backbone or {})})
    return perturbed(ViT(ViTConfig(b, **{**dict(image_size=16, patch_size=4, channels=3, num_classes=5), **rest})), 0.2)


@pytest.mark.parametrize(
    "backbone, rest",
    [
        ({}, {}),  # class token, timm's defaults
        (dict(bias=False, activation="quick_gelu"), dict(pool="avg", norm_pre=True, channels=1)),  # fc_norm, CLIP-style
        (dict(norm="rmsnorm", final_norm=False, activation="gelu_tanh"), dict(position="sincos2d", num_classes=3)),
    ],
    ids=["token", "avg-prenorm-nobias", "rmsnorm-sincos"],
)
def test_timm_export_loads_in_timm_with_our_logits(tmp_path, backbone, rest):
    import timm

    model = vit(backbone, **rest)
    out = export_timm_vit(model, tmp_path / "vit")
    spec = json.loads((out / "timm_kwargs.json").read_text())
    overlay = dict(file=str(out / "model.safetensors"))
    built = [
        timm.create_model(spec["model_name"], pretrained=True, pretrained_cfg_overlay=overlay, **spec["kwargs"]),
        timm.create_model(f"local-dir:{out}", pretrained=True),  # timm's own config.json
    ]
    images = torch.randn(2, model.cfg.channels, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
        for theirs in built:
            torch.testing.assert_close(theirs.eval()(images), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.1
    if not model.cfg.backbone.bias:
        return  # timm's norms keep (zero) biases that a bias-free ViT has no place for: nothing to import into
    # And back in: timm's weights converted by the importer compute the same logits (sin-cos become learned).
    needs, state = convert_timm_vit(built[0].state_dict())
    again = ViT(dataclasses.replace(model.cfg, position="learned"))
    assert needs.items() <= model_config(again).items()
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images), expected, rtol=1e-5, atol=1e-5)


def test_timm_export_names_every_setting_timm_lacks(tmp_path):
    model = vit(dict(norm_eps=1e-5, activation="swiglu", prenorm=False, kv_heads=1, window=4, qk_norm=True))
    with pytest.raises(ValueError, match="cannot be exported as a timm VisionTransformer") as e:
        export_timm_vit(model, tmp_path / "out")
    for needed in ("model.backbone.kv_heads=None (here 1)", "(here 'swiglu')",
                   "model.backbone.norm_eps=1e-06 (here 1e-05)", "model.backbone.prenorm=True (here False)",
                   "model.backbone.window=None (here 4)", "model.backbone.qk_norm=False (here True)"):  # fmt: skip
        assert needed in str(e.value)
    with pytest.raises(ValueError, match=r"model.norm_pre=False or model.backbone.norm='layernorm'"):
        export_timm_vit(vit(dict(norm="rmsnorm"), norm_pre=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- open_clip ------------------------------------------------------------------------------------------------------


def clip(image: dict[str, Any] | None = None, text: dict[str, Any] | None = None, eos: int = 99, **rest: Any) -> CLIP:
    torch.manual_seed(0)
    i = TransformerConfig(**{**dict(width=32, depth=2, heads=2, dropout=0.0, position="none"), **(image or {})})
    t = TransformerConfig(**{**dict(width=24, depth=2, heads=2, dropout=0.0, position="learned", max_len=16,
                                    causal=True), **(text or {})})  # fmt: skip
    image_cfg = ImageEncoderConfig(i, **{**dict(image_size=32, patch_size=8, channels=3, norm_pre=True), **rest})
    model = CLIP(CLIPConfig(image_cfg, TextEncoderConfig(t), embed_dim=16, vocab_size=100, eos_id=eos))
    return perturbed(model, 0.05, skip=("logit_scale",))


def clip_inputs(eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    tokens = torch.zeros(3, 16, dtype=torch.long)  # words, one end-of-text, then 0-padding
    for row, n in enumerate((2, 7, 14)):
        tokens[row, :n] = torch.randint(1, 49, (n,), generator=g)
        tokens[row, n] = eos
    return torch.randn(3, 3, 32, 32, generator=g), tokens


@pytest.mark.parametrize(
    "image, text, eos",
    [
        ({}, {}, 99),  # OpenAI's layout: end-of-text the highest id ('argmax' pooling)
        (dict(activation="quick_gelu", bias=False, norm_eps=1e-6), dict(activation="quick_gelu", bias=False), 50),
        (dict(activation="gelu_tanh"), dict(position="sinusoidal"), 99),
    ],
    ids=["gelu", "quickgelu-nobias-eos", "tanh-sinusoidal"],
)
def test_open_clip_export_loads_in_open_clip_with_our_embeddings(tmp_path, image, text, eos):
    import open_clip

    model = clip(image, text, eos)
    name = f"test-clip-{eos}-{len(image)}"  # one per case: the registry is process-wide
    out = export_open_clip(model, tmp_path / "clip", name=name)
    open_clip.add_model_config(out / f"{name}.json")
    built = [
        open_clip.create_model(name, pretrained=str(out / "open_clip_model.safetensors"), require_pretrained=True),
        open_clip.create_model(f"local-dir:{out}"),  # the hub layout
    ]
    images, tokens = clip_inputs(eos)
    with torch.no_grad():
        for theirs in built:
            theirs.eval()
            torch.testing.assert_close(theirs.encode_image(images, normalize=True), model.encode_image(images),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
            torch.testing.assert_close(theirs.encode_text(tokens, normalize=True), model.encode_text(tokens),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
            torch.testing.assert_close(theirs.logit_scale.exp(), model.scale())
    # And back in through the importer: the same embeddings (zero biases and learned positions where ours had none).
    _, state = convert_open_clip(built[0].state_dict())
    again = clip({**image, "bias": True}, {**text, "bias": True, "position": "learned"}, eos)
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval().encode_text(tokens), model.encode_text(tokens), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images), rtol=1e-4, atol=1e-5)


def test_open_clip_export_names_every_setting_open_clip_lacks(tmp_path):
    model = clip(dict(activation="quick_gelu", norm="rmsnorm", final_norm=False, qk_norm=True),
                 dict(activation="relu", kv_heads=1), pool="avg", channels=1)  # fmt: skip
    with pytest.raises(ValueError, match="cannot be exported as an open_clip CLIP") as e:
        export_open_clip(model, tmp_path / "out")
    for needed in ("model.image.backbone.norm='layernorm' (here 'rmsnorm')", "model.image.backbone.final_norm=True",
                   "model.text.backbone.kv_heads=None (here 1)", "model.text.backbone.activation in", "(here 'relu')",
                   "both 'quick_gelu' or both GELU (here 'quick_gelu', 'relu')", "model.image.pool='cls' (here 'avg')",
                   "model.image.channels=3 (here 1)", "model.image.backbone.qk_norm=False (here True)"):  # fmt: skip
        assert needed in str(e.value)
    assert not (tmp_path / "out").exists()


# --- the dispatcher -------------------------------------------------------------------------------------------------


def test_export_picks_the_exporter_by_format_and_model(tmp_path):
    model = gpt()
    out = export(model, "hf", tmp_path / "gpt2", tokenizer=byte_level())
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    clip_out = export(clip(), "open_clip", tmp_path / "clip", tokenizer=byte_level())
    assert sorted(p.name for p in clip_out.iterdir()) == [
        "open_clip_config.json", "open_clip_model.safetensors", "polyformer-clip.json",  # the default model name
    ]  # fmt: skip
    assert set(FORMATS) == {"hf", "timm", "open_clip", "onnx", "safetensors"}
    for name in ("GPT", "ViT", "CLIP", "EncoderDecoder"):  # imported only when used
        assert EXPORTERS[("onnx", name)] == "polyformer.weights.onnx:export_onnx"
    with pytest.raises(ValueError, match="a ViT cannot be exported as 'hf'; it exports to timm, onnx, safetensors"):
        export(vit(), "hf", tmp_path / "x")
    with pytest.raises(
        ValueError, match="unknown export format 'keras': the formats are hf, onnx, open_clip, safetensors, timm"
    ):
        export(model, "keras", tmp_path / "x")
    timm_out = export(vit(), "timm", tmp_path / "vit", tokenizer=byte_level())  # no place for one: left out
    assert sorted(p.name for p in timm_out.iterdir()) == ["config.json", "model.safetensors", "timm_kwargs.json"]
    with pytest.raises(FileExistsError, match="not empty"):
        export(model, "hf", out)
    assert not (tmp_path / "x").exists()


def _demo_writer(model: torch.nn.Module, out_dir: Path) -> Path:
    """A writer of a format registered by a test: no overwrite argument, so the dispatcher guards its folder."""
    out_dir.mkdir(exist_ok=True)
    (out_dir / "weights").write_text(type(model).__name__)
    return out_dir


def test_further_formats_are_entries_in_the_table(tmp_path, monkeypatch):
    """The hook: a new (format, model) entry names a writer by import path."""
    monkeypatch.setitem(EXPORTERS, ("demo", "ViT"), f"{__name__}:_demo_writer")
    assert export(vit(), "demo", tmp_path / "demo").joinpath("weights").read_text() == "ViT"
    with pytest.raises(FileExistsError, match="not empty"):
        export(vit(), "demo", tmp_path / "demo")
    assert export(vit(), "demo", tmp_path / "demo", overwrite=True) == tmp_path / "demo"
    with pytest.raises(ValueError, match="a GPT cannot be exported as 'demo'; it exports to hf, onnx"):
        export(gpt(), "demo", tmp_path / "other")
