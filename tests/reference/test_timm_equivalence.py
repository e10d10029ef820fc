"""Our ViT with weights converted by `convert_timm_vit` gives timm's logits (timm models built locally, random
weights: no hub)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from polyformer.tasks.image_classification import ImageClassifier
from polyformer.weights.timm_vit import convert_timm_vit, timm_vit_hparams


def ours_from(timm_model: VisionTransformer) -> ImageClassifier:
    hp = timm_vit_hparams(timm_model)
    task = ImageClassifier(**hp, class_names=None, mean=(0.5,) * hp["channels"], std=(0.5,) * hp["channels"])
    task.configure_model()
    missing, unexpected = task.load_state_dict(convert_timm_vit(timm_model.state_dict()), strict=False)
    assert not unexpected
    assert all(k.startswith(("metrics.", "val_confusion")) for k in missing), missing
    return task.eval()


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
    hp = {**timm_vit_hparams(small), "image_size": 32}
    ours = ImageClassifier(**hp, class_names=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    ours.configure_model()
    ours.load_state_dict(convert_timm_vit(small.state_dict(), grid=8), strict=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(images), big(images), rtol=1e-3, atol=1e-3)


def test_unsupported_timm_features_are_refused_by_name():
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, init_values=1e-5)
    with pytest.raises(ValueError, match="ls1.gamma"):
        convert_timm_vit(model.state_dict())


def test_the_imagenet_preset_is_timms_deit_small():
    """configs/vit/imagenet-vit-s16.yaml builds timm's deit_small_patch16_224 (22,050,664 parameters), and that
    model's weights load into it without a missing or extra key."""
    import timm
    import yaml
    from helpers import ROOT

    from polyformer.backbone import TransformerConfig

    preset = yaml.safe_load((ROOT / "configs" / "vit" / "imagenet-vit-s16.yaml").read_text())
    args = preset["model"]["init_args"]
    data = preset["data"]["init_args"]
    ours = ImageClassifier(
        TransformerConfig(**args["backbone"]), patch_size=args["patch_size"], pool=args["pool"], num_classes=1000,
        image_size=data["image_size"], channels=3, mean=tuple(data["mean"]), std=tuple(data["std"]),
    )  # fmt: skip
    ours.configure_model()
    theirs = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 22_050_664
    missing, unexpected = ours.load_state_dict(convert_timm_vit(theirs.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith(("metrics.", "val_confusion"))]


def test_pretrained_names_fail_clearly_offline_or_unknown():
    from polyformer.backbone import TransformerConfig
    from polyformer.weights.timm_vit import load_timm_vit

    task = ImageClassifier(
        TransformerConfig(width=192, depth=12, heads=3, norm_eps=1e-6), patch_size=16, image_size=32, channels=3,
        num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3,
    )  # fmt: skip
    task.configure_model()
    with pytest.raises(ConnectionError, match="could not fetch timm weights 'vit_tiny_patch16_224.augreg"):
        load_timm_vit(task, "vit_tiny_patch16_224.augreg_in21k_ft_in1k")  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ValueError, match="no_such_vit"):
        load_timm_vit(task, "no_such_vit")
