"""A SigLIP model (loss="siglip") exports to open_clip faithfully: open_clip's CLIP built from the exported config
holds the same logit bias and scale and gives our embeddings; the importer reads the bias back as a SigLIP model, a
plain CLIP model is told to set model.loss, and layer scale is refused by name."""

import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig
from polyformer.weights import check_fits
from polyformer.weights.open_clip import convert_open_clip, export_open_clip, model_config


def siglip(**image_backbone) -> CLIP:
    torch.manual_seed(0)
    i = TransformerConfig(width=32, depth=1, heads=2, dropout=0.0, position="none", **image_backbone)
    t = TransformerConfig(width=24, depth=1, heads=2, dropout=0.0, position="learned", max_len=16, causal=True)
    cfg = CLIPConfig(ImageEncoderConfig(i, 32, 8, 3), TextEncoderConfig(t), 16, 100, 99, 10.0, loss="siglip")
    model = CLIP(cfg).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)
    return model


def test_siglip_exports_to_open_clip_and_back(tmp_path):
    import open_clip

    model = siglip()
    out = export_open_clip(model, tmp_path / "siglip", name="test-siglip")
    open_clip.add_model_config(out / "test-siglip.json")
    theirs = open_clip.create_model(
        "test-siglip", pretrained=str(out / "open_clip_model.safetensors"), require_pretrained=True
    ).eval()
    torch.testing.assert_close(theirs.logit_bias, torch.tensor(-7.5))
    torch.testing.assert_close(theirs.logit_scale.exp(), model.scale())
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 99, (3, 16))
    tokens[:, -1] = 99
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images, normalize=True), model.encode_image(images),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(theirs.encode_text(tokens, normalize=True), model.encode_text(tokens),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    needs, state = convert_open_clip(theirs.state_dict())
    assert needs["loss"] == "siglip"
    again = siglip()
    with torch.no_grad():
        again.logit_bias.zero_()
    again.load_state_dict(state, strict=True)
    torch.testing.assert_close(again.logit_bias, model.logit_bias)
    plain = CLIP(CLIPConfig(model.cfg.image, model.cfg.text, 16, 100, 99))
    with pytest.raises(ValueError, match="model.loss='siglip'"):
        check_fits(model_config(plain), needs, "open_clip:test-siglip")


def test_layer_scale_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="layer_scale"):
        export_open_clip(siglip(layer_scale=0.1), tmp_path / "out")
