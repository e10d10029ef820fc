"""The plain `CLIP` (`polyformer.models.clip`) with weights converted by the production converters reproduces
open_clip's and transformers' image and text embeddings and logits: small models of the reference architectures
built locally with random weights (no download). `init_from="open_clip:<name>@<file>"` and `"hf:<folder>"` load
through `load_weights`, a mismatched architecture is named key by key, and hub names fail clearly offline."""

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig
from polyformer.weights import load_weights
from polyformer.weights.open_clip import (
    convert_hf_clip,
    convert_open_clip,
    hf_clip_config,
    model_config,
    open_clip_config,
)

IMAGE, PATCH, CTX, VOCAB, EMBED = 32, 8, 16, 100, 24
EOT = VOCAB - 1  # OpenAI's tokenizer puts end-of-text at the highest id


def ours(activation: str, image_width: int, image_heads: int, text_width: int, text_heads: int) -> CLIP:
    image = TransformerConfig(
        width=image_width, depth=2, heads=image_heads, dropout=0.0, activation=activation, position="none"
    )
    text = TransformerConfig(
        width=text_width, depth=2, heads=text_heads, dropout=0.0, activation=activation, position="learned",
        max_len=CTX, causal=True,
    )  # fmt: skip
    cfg = CLIPConfig(ImageEncoderConfig(image, IMAGE, PATCH, 3, norm_pre=True), TextEncoderConfig(text), EMBED, VOCAB,
                     EOT)  # fmt: skip
    return CLIP(cfg).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    tokens = torch.zeros(3, CTX, dtype=torch.long)  # [sot] words [eot] then 0-padding, as open_clip tokenizes
    for i, n in enumerate((3, 9, CTX - 2)):
        tokens[i, 0] = EOT - 1
        tokens[i, 1 : n + 1] = torch.randint(1, EOT - 1, (n,), generator=g)
        tokens[i, n + 1] = EOT
    return images, tokens


def randomize(module: torch.nn.Module) -> None:
    """Reference inits leave biases and norms at 0/1: perturb everything so a mis-mapped tensor cannot hide."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "logit_scale":
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def open_clip_reference(quick_gelu: bool) -> torch.nn.Module:
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, image_size=IMAGE, patch_size=PATCH)
    text = CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=24, heads=2, layers=2)
    ref = OpenCLIP(EMBED, vision, text, quick_gelu=quick_gelu).eval()
    randomize(ref)
    return ref


def assert_same_function(model: CLIP, ref_image: torch.Tensor, ref_text: torch.Tensor, images, tokens) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref_image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(tokens), ref_text, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_vit_embeddings_and_logits_match(quick_gelu):
    ref = open_clip_reference(quick_gelu)
    model = ours("quick_gelu" if quick_gelu else "gelu", 32, 2, 24, 2)
    needs, state = convert_open_clip(ref.state_dict())
    described = {**needs, **open_clip_config(ref)}
    mine = model_config(model)
    assert {k: mine[k] for k in described} == described  # every key the weights fix agrees with the model built
    model.load_state_dict(state, strict=True)

    images, tokens = inputs()
    with torch.no_grad():
        ref_image, ref_text = ref.encode_image(images, normalize=True), ref.encode_text(tokens, normalize=True)
        assert_same_function(model, ref_image, ref_text, images, tokens)
        torch.testing.assert_close(model.scale(), ref.logit_scale.exp())
        ref_logits = ref.logit_scale.exp() * ref_image @ ref_text.T
        torch.testing.assert_close(model.similarity(images, tokens), ref_logits, atol=1e-4, rtol=1e-4)


def features(out) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output object holding them as pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_reference() -> torch.nn.Module:
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel

    torch.manual_seed(0)
    config = HFCLIPConfig(
        text_config={
            "vocab_size": VOCAB, "hidden_size": 24, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": CTX, "eos_token_id": EOT, "bos_token_id": EOT - 1,
            "pad_token_id": 0, "hidden_act": "quick_gelu",
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": IMAGE, "patch_size": PATCH, "hidden_act": "quick_gelu",
        },
        projection_dim=EMBED,
    )  # fmt: skip
    ref = CLIPModel(config).eval()
    randomize(ref)
    return ref


def test_transformers_clip_model_embeddings_match():
    ref = hf_reference()
    model = ours("quick_gelu", 32, 2, 24, 2)
    needs, state = convert_hf_clip(ref.state_dict())
    described = {**needs, **hf_clip_config(ref.config)}
    mine = model_config(model)
    assert {k: mine[k] for k in described} == described
    model.load_state_dict(state, strict=True)

    images, tokens = inputs()
    with torch.no_grad():
        ref_image = F.normalize(features(ref.get_image_features(pixel_values=images)), dim=-1)
        ref_text = F.normalize(features(ref.get_text_features(input_ids=tokens)), dim=-1)
    assert_same_function(model, ref_image, ref_text, images, tokens)
    torch.testing.assert_close(model.scale(), ref.logit_scale.exp())


def test_converters_refuse_foreign_state_dicts():
    with pytest.raises(ValueError, match="not an open_clip CLIP"):
        convert_open_clip({"transformer.h.0.attn.c_attn.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="not a transformers CLIPModel"):
        convert_hf_clip(open_clip_reference(False).state_dict())
    state = dict(open_clip_reference(False).state_dict())
    state["visual.attn_pool.query"] = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="attn_pool"):
        convert_open_clip(state)


# ---- init_from="open_clip:..." and "hf:..." -----------------------------------------------------------------------
TINY_NAME = "polyformer-test-tiny-clip"  # registered with open_clip from a config file, as a user's own model


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> tuple[Any, str]:
    """An open_clip model of our tiny size under its own registered name, and its random weights saved as a file."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps({
        "embed_dim": EMBED, "quick_gelu": True,
        "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 32, "head_width": 16, "patch_size": PATCH},
        "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": 24, "heads": 2, "layers": 2},
    }))  # fmt: skip
    open_clip.add_model_config(folder / f"{TINY_NAME}.json")
    torch.manual_seed(0)
    ref = open_clip.create_model(TINY_NAME).eval()
    randomize(ref)
    path = folder / "weights.pt"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def test_init_from_a_local_open_clip_file_gives_open_clips_embeddings(tiny_open_clip):
    ref, path = tiny_open_clip
    model = ours("quick_gelu", 32, 2, 24, 2)
    load_weights(model, f"open_clip:{TINY_NAME}@{path}")
    images, tokens = inputs()
    with torch.no_grad():
        ref_image, ref_text = ref.encode_image(images, normalize=True), ref.encode_text(tokens, normalize=True)
    assert_same_function(model.eval(), ref_image, ref_text, images, tokens)


def test_init_from_open_clip_names_every_setting_the_weights_need(tiny_open_clip):
    _, path = tiny_open_clip
    wrong = ours("gelu", 32, 4, 24, 2)  # another activation and other image heads: not in the state dict's shapes
    with pytest.raises(ValueError, match="need another architecture") as info:
        load_weights(wrong, f"open_clip:{TINY_NAME}@{path}")
    for key in ("--model.image.backbone.heads=2", "--model.image.backbone.activation='quick_gelu'",
                "--model.text.backbone.activation='quick_gelu'"):  # fmt: skip
        assert key in str(info.value), info.value


def test_open_clip_sources_fail_clearly(tiny_open_clip, tmp_path):
    model = ours("gelu", 32, 2, 24, 2)
    with pytest.raises(ConnectionError, match="cannot fetch open_clip weights 'ViT-B-32@openai'.*needs the network"):
        load_weights(model, "open_clip:ViT-B-32@openai")  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ValueError, match="names no weights.*open_clip:ViT-B-32@openai"):
        load_weights(model, "open_clip:ViT-B-32")  # random weights would load silently
    with pytest.raises(FileNotFoundError, match="neither a pretrained tag"):
        load_weights(model, f"open_clip:ViT-B-32@{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="no_such_model"):
        load_weights(model, f"open_clip:no_such_model@{tiny_open_clip[1]}")


def test_the_offline_error_is_not_chained_to_the_hubs():
    """The CLI reports the innermost error of a chain: ours must be the whole chain."""
    with pytest.raises(ConnectionError) as info:
        load_weights(ours("gelu", 32, 2, 24, 2), "open_clip:ViT-B-32@openai")
    assert info.value.__cause__ is None and info.value.__context__ is None
    with pytest.raises(ConnectionError) as info:
        load_weights(ours("quick_gelu", 32, 2, 24, 2), "hf:openai/clip-vit-base-patch32")
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_init_from_a_local_save_pretrained_folder_gives_transformers_embeddings(tmp_path):
    ref = hf_reference()
    ref.save_pretrained(tmp_path / "clip")
    model = ours("quick_gelu", 32, 2, 24, 2)
    load_weights(model, f"hf:{tmp_path / 'clip'}")
    images, tokens = inputs()
    with torch.no_grad():
        ref_image = F.normalize(features(ref.get_image_features(pixel_values=images)), dim=-1)
        ref_text = F.normalize(features(ref.get_text_features(input_ids=tokens)), dim=-1)
    assert_same_function(model.eval(), ref_image, ref_text, images, tokens)

    wider = ours("quick_gelu", 64, 2, 24, 2)
    with pytest.raises(ValueError, match=r"--model.image.backbone.width=32 \(here 64\)"):
        load_weights(wider, f"hf:{tmp_path / 'clip'}")


def test_hf_sources_fail_clearly(tmp_path):
    model = ours("quick_gelu", 32, 2, 24, 2)
    with pytest.raises(ConnectionError, match="cannot fetch CLIP weights 'openai/clip-vit-base-patch32'.*network"):
        load_weights(model, "hf:openai/clip-vit-base-patch32")
    with pytest.raises(FileNotFoundError, match="CLIPModel folder not found"):
        load_weights(model, f"hf:{tmp_path / 'nope'}")


def test_init_from_through_the_task(tiny_open_clip):
    """The task passes init_from to the model it builds; its weights are open_clip's."""
    from polyformer.tasks.contrastive import CLIP as CLIPTask

    ref, path = tiny_open_clip
    template = ours("quick_gelu", 32, 2, 24, 2).cfg
    task = CLIPTask(template.image, template.text, EMBED, vocab_size=VOCAB, eos_id=EOT,
                    init_from=f"open_clip:{TINY_NAME}@{path}")  # fmt: skip
    torch.testing.assert_close(task.model.text.embed.weight, ref.token_embedding.weight)
    images, tokens = inputs()
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(images, tokens)[0], ref.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
