"""Our plain `ViT` with weights converted by `convert_timm_vit` gives timm's logits (timm models built locally, random
weights: no hub); `init_from="timm:<name>@<file>"` loads through the task, and hub names fail clearly offline."""

from typing import Any

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from polyformer.backbone import TransformerConfig
from polyformer.models.vit import ViT, ViTConfig
from polyformer.tasks.image_classification import ImageClassifier
from polyformer.weights.timm_vit import convert_timm_vit, timm_vit_config


def vit_from(keys: dict[str, Any]) -> ViT:
    """Our ViT from the dotted `--model.` keys `timm_vit_config` reads off a timm model."""
    backbone = {k.removeprefix("backbone."): v for k, v in keys.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in keys.items() if not k.startswith("backbone.")}
    return ViT(ViTConfig(TransformerConfig(**backbone, dropout=0.0), **rest))


def ours_from(timm_model: VisionTransformer) -> ViT:
    keys = timm_vit_config(timm_model)
    ours = vit_from(keys)
    needs, state = convert_timm_vit(timm_model.state_dict())
    assert needs.items() <= keys.items()  # what the state dict says agrees with the model's own description
    ours.load_state_dict(state, strict=True)
    return ours.eval()


def randomize(model: torch.nn.Module) -> None:
    """timm zero-inits some tensors (biases, head, class token): make every weight count in the comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7),  # class token
        dict(img_size=24, patch_size=4, embed_dim=64, depth=3, num_heads=4, num_classes=5, in_chans=1, mlp_ratio=2.0),
        dict(  # average pooling with fc_norm, no class token, pre-norm (CLIP-style), QuickGELU
            img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, global_pool="avg",
            class_token=False, pre_norm=True, act_layer="quick_gelu",
        ),
    ],
)  # fmt: skip
def test_converted_timm_vit_gives_the_same_logits(kwargs):
    torch.manual_seed(0)
    theirs = VisionTransformer(**kwargs).eval()
    randomize(theirs)
    ours = ours_from(theirs)
    images = torch.randn(3, kwargs.get("in_chans", 3), kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-4, atol=1e-4)


def test_positions_resized_for_another_resolution_match_timm():
    """Loading at a new image size: our resize of converted positions equals timm's own resample."""
    torch.manual_seed(0)
    small = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3).eval()
    randomize(small)
    big = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn

    big.load_state_dict(checkpoint_filter_fn(small.state_dict(), big))
    ours = vit_from({**timm_vit_config(small), "image_size": 32})
    needs, state = convert_timm_vit(small.state_dict(), grid=8)
    assert needs["image_size"] == 32
    ours.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), big(images), rtol=1e-3, atol=1e-3)


def test_unsupported_timm_features_are_refused_by_name():
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, reg_tokens=2)
    with pytest.raises(ValueError, match="reg_token"):
        convert_timm_vit(model.state_dict())
    avg_without_fc_norm = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, global_pool="avg", class_token=False,
        fc_norm=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="without fc_norm"):
        convert_timm_vit(avg_without_fc_norm.state_dict())


def test_the_imagenet_preset_is_timms_deit_small():
    """configs/vit/imagenet-vit-s16.yaml builds timm's deit_small_patch16_224 (22,050,664 parameters), and that
    model's weights load into it without a missing or extra key."""
    import timm
    import yaml
    from helpers import ROOT

    preset = yaml.safe_load((ROOT / "configs" / "vit" / "imagenet-vit-s16.yaml").read_text())
    args = preset["model"]["init_args"]
    data = preset["data"]["init_args"]
    ours = ImageClassifier(
        TransformerConfig(**args["backbone"]), patch_size=args["patch_size"], pool=args["pool"], num_classes=1000,
        image_size=data["image_size"], channels=3, mean=tuple(data["mean"]), std=tuple(data["std"]),
    )  # fmt: skip
    theirs = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 22_050_664
    ours.model.load_state_dict(convert_timm_vit(theirs.state_dict())[1], strict=True)


# ---- init_from="timm:..." through the task ------------------------------------------------------------------------
# timm's registered `test_vit` (width 64, 6 blocks, 2 heads, MLP 192, patch 16): small enough to save in a test.
TEST_VIT = TransformerConfig(width=64, depth=6, heads=2, mlp_ratio=3.0, dropout=0.0, norm_eps=1e-6)


@pytest.fixture
def test_vit_file(tmp_path):
    """timm's `test_vit` with random weights and 1000 classes (its pretrained config's count), saved as a file."""
    import timm

    torch.manual_seed(0)
    theirs = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    randomize(theirs)
    path = tmp_path / "test_vit.pth"
    torch.save(theirs.state_dict(), path)
    return theirs, path


def test_init_from_a_local_timm_file_gives_timms_logits(test_vit_file):
    theirs, path = test_vit_file
    task = ImageClassifier(
        TEST_VIT, patch_size=16, num_classes=1000, image_size=32, channels=3, init_from=f"timm:test_vit@{path}"
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task(images), theirs(images), rtol=1e-4, atol=1e-4)


def test_init_from_timm_with_other_classes_keeps_our_initial_head(test_vit_file):
    theirs, path = test_vit_file
    torch.manual_seed(1)
    scratch = ImageClassifier(TEST_VIT, patch_size=16, num_classes=5, image_size=32, channels=3)
    torch.manual_seed(1)
    task = ImageClassifier(
        TEST_VIT, patch_size=16, num_classes=5, image_size=32, channels=3, init_from=f"timm:test_vit@{path}"
    )
    torch.testing.assert_close(task.model.head.weight, scratch.model.head.weight)  # ours: N(0, 0.02), not timm's
    torch.testing.assert_close(task.model.tower.pos_embed, theirs.pos_embed)
    torch.testing.assert_close(task.model.tower.encoder.blocks[5].mlp.fc2.weight, theirs.blocks[5].mlp.fc2.weight)


def test_init_from_timm_names_every_setting_the_weights_need(test_vit_file):
    _, path = test_vit_file
    wrong = TransformerConfig(width=64, depth=6, heads=4, mlp_ratio=3.0, dropout=0.0)  # heads and norm_eps differ
    with pytest.raises(ValueError, match=r"--model.backbone.heads=2 \(here 4\), --model.backbone.norm_eps=1e-06"):
        ImageClassifier(
            wrong, patch_size=16, num_classes=10, image_size=32, channels=3, init_from=f"timm:test_vit@{path}"
        )
    with pytest.raises(ValueError, match=r"--model.position='learned' \(here 'sincos2d'\)"):
        ImageClassifier(
            TEST_VIT, patch_size=16, position="sincos2d", num_classes=10, image_size=32, channels=3,
            init_from=f"timm:test_vit@{path}",
        )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no weights file"):
        ImageClassifier(
            TEST_VIT, patch_size=16, num_classes=10, image_size=32, channels=3, init_from="timm:test_vit@nope.pth"
        )


def test_timm_names_fail_clearly_offline_or_unknown():
    args = dict(patch_size=16, image_size=32, channels=3, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    backbone = TransformerConfig(width=192, depth=12, heads=3, norm_eps=1e-6)
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    with pytest.raises(ConnectionError, match=f"could not fetch timm weights '{name}'.*needs the network once"):
        ImageClassifier(backbone, **args, init_from=f"timm:{name}")  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ValueError, match="no_such_vit.*timm.list_models"):
        ImageClassifier(backbone, **args, init_from="timm:no_such_vit")
