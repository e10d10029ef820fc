"""LayerScale to and from timm: a timm ViT with `init_values` (ls1/ls2 gammas) converted into ours gives timm's
logits; ours with `backbone.layer_scale` exported loads in timm with our logits and comes back in; a model without
layer scale is told to set it."""

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from polyformer.backbone import TransformerConfig
from polyformer.models.vit import ViT, ViTConfig
from polyformer.weights import check_fits
from polyformer.weights.timm_vit import convert_timm_vit, export_timm_vit, model_config, timm_vit_config


def test_timm_layer_scale_converts_with_the_same_logits():
    torch.manual_seed(0)
    theirs = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                               init_values=1e-5).eval()  # fmt: skip
    with torch.no_grad():
        for p in theirs.parameters():  # gammas far from their start too, so a dropped or swapped one shows
            p.normal_(0, 0.2)
    keys = timm_vit_config(theirs)
    assert keys["backbone.layer_scale"] is not None
    needs, state = convert_timm_vit(theirs.state_dict())
    assert needs.items() <= keys.items()
    backbone = {k.removeprefix("backbone."): v for k, v in keys.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in keys.items() if not k.startswith("backbone.")}
    ours = ViT(ViTConfig(TransformerConfig(**backbone, dropout=0.0), **rest))
    ours.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), theirs(images), rtol=1e-4, atol=1e-4)
    # A model built without layer scale is told which setting the weights need.
    plain = ViT(ViTConfig(TransformerConfig(**{**backbone, "layer_scale": None}, dropout=0.0), **rest))
    with pytest.raises(ValueError, match="layer_scale"):
        check_fits(model_config(plain), needs, "timm:test")


def test_our_layer_scale_exports_to_timm_and_back(tmp_path):
    import timm

    torch.manual_seed(0)
    cfg = ViTConfig(TransformerConfig(width=32, depth=2, heads=2, dropout=0.0, norm_eps=1e-6, layer_scale=0.1), 16, 4,
                    3, 5)  # fmt: skip
    model = ViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    out = export_timm_vit(model, tmp_path / "vit")
    spec = json.loads((out / "timm_kwargs.json").read_text())
    assert spec["kwargs"]["init_values"] == 0.1
    overlay = dict(file=str(out / "model.safetensors"))
    theirs = timm.create_model(spec["model_name"], pretrained=True, pretrained_cfg_overlay=overlay, **spec["kwargs"])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(theirs.eval()(images), expected, rtol=1e-5, atol=1e-5)
    needs, state = convert_timm_vit(theirs.state_dict())
    again = ViT(cfg)
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images), expected, rtol=1e-5, atol=1e-5)
