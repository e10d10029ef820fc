"""timm `VisionTransformer` weights (Wightman, pytorch-image-models; the ViT of Dosovitskiy et al. 2020, DeiT of
Touvron et al. 2021 and AugReg of Steiner et al. 2021) into `ImageClassifier`.

`convert_timm_vit` maps one state dict to ours; `timm_vit_hparams` reads the matching architecture off a timm
model; `load_timm_vit` fetches a named timm model (Hugging Face hub, or timm's local cache offline) into a task.
Covered: every plain ViT size, class-token or average pooling (fc_norm), pre-norm (CLIP-style), GELU/QuickGELU.
Refused with a message: layer scale, register tokens, q/k norms, attention-pool heads, positions without the class
token (these architectures need blocks our backbone does not have).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from polyformer.backbone import TransformerConfig
from polyformer.tasks.vision import resize_pos_embed

if TYPE_CHECKING:
    from polyformer.tasks.image_classification import ImageClassifier

# timm name -> ours; block keys keep their names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).
_RENAMES = {
    "cls_token": "tower.patch.cls_token",
    "pos_embed": "tower.pos_embed",
    "patch_embed.proj.weight": "tower.patch.proj.weight",
    "patch_embed.proj.bias": "tower.patch.proj.bias",
    "norm_pre.weight": "tower.norm_pre.weight",
    "norm_pre.bias": "tower.norm_pre.bias",
    "norm.weight": "tower.encoder.norm.weight",
    "norm.bias": "tower.encoder.norm.bias",
    "fc_norm.weight": "tower.norm_post.weight",  # average pooling: the final norm after pooling
    "fc_norm.bias": "tower.norm_post.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")


def convert_timm_vit(state_dict: dict[str, Tensor], grid: int | None = None) -> dict[str, Tensor]:
    """timm VisionTransformer state dict -> ImageClassifier state dict. `grid`: resize the positions to grid x grid
    patches (another image size than the weights were trained at)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif m := _BLOCK.fullmatch(key):
            out[f"tower.encoder.blocks.{m[1]}.{m[2]}.{m[3]}"] = value
        else:
            raise ValueError(
                f"timm ViT weight {key!r} has no counterpart in polyformer's ViT (layer scale, register tokens, "
                f"q/k norm and attention pooling are not supported); choose a plain ViT"
            )
    if "tower.patch.proj.weight" in out and "tower.patch.proj.bias" not in out:
        # Pre-norm (CLIP-style) timm ViTs have a patch projection without bias; ours always has one: zero is exact.
        out["tower.patch.proj.bias"] = out["tower.patch.proj.weight"].new_zeros(out["tower.patch.proj.weight"].shape[0])
    if "tower.pos_embed" in out:
        prefix = int("tower.patch.cls_token" in out)
        n_patches = out["tower.pos_embed"].shape[1] - prefix
        if n_patches != round(n_patches**0.5) ** 2:
            raise ValueError("timm ViT positions do not cover the class token (no_embed_class); not supported")
        if grid is not None:
            out["tower.pos_embed"] = resize_pos_embed(out["tower.pos_embed"], grid, prefix)
    return out


def timm_vit_hparams(model: nn.Module) -> dict[str, Any]:
    """The ImageClassifier arguments that reproduce a timm VisionTransformer."""
    block = model.blocks[0]
    act = block.mlp.act
    if isinstance(act, nn.GELU):
        activation = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    elif type(act).__name__ == "QuickGELU":
        activation = "quick_gelu"
    else:
        raise ValueError(f"timm ViT activation {type(act).__name__} is not supported (gelu, gelu_tanh, quick_gelu)")
    pool = {"token": "cls", "avg": "avg"}.get(model.global_pool)
    if pool is None or (pool == "avg") == (model.cls_token is not None):
        raise ValueError(
            f"timm ViT pooling {model.global_pool!r} with class_token={model.cls_token is not None} is not supported; "
            f"polyformer has class-token pooling, or average pooling without a class token"
        )
    width = model.embed_dim
    patch = model.patch_embed.patch_size[0]
    return {
        "backbone": TransformerConfig(
            width=width,
            depth=len(model.blocks),
            heads=block.attn.num_heads,
            mlp_ratio=block.mlp.fc1.out_features / width,
            activation=activation,
            norm_eps=block.norm1.eps,
            dropout=0.0,
            bias=block.attn.qkv.bias is not None,
            position="none",
        ),
        "patch_size": patch,
        "image_size": model.patch_embed.img_size[0],
        "channels": model.patch_embed.proj.in_channels,
        "pool": pool,
        "norm_pre": not isinstance(model.norm_pre, nn.Identity),
        "num_classes": model.num_classes,
    }


def load_timm_vit(task: ImageClassifier, name: str) -> None:
    """Load the pretrained timm model `name` into a built task: the head is kept when the class count matches the
    weights', the input channels and position grid are adapted to the task's (timm's own adaptation)."""
    import timm

    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=task.num_classes, in_chans=task.channels, img_size=task.image_size
        )
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ValueError(f"--model.pretrained={name!r}: {e}; see timm.list_models('vit_*')") from None
    except OSError as e:  # the hub unreachable and the weights not in the local cache
        raise ConnectionError(f"could not fetch timm weights {name!r} ({e}); run once online to cache them") from None
    if task.position != "learned":
        raise ValueError(f"--model.pretrained={name!r} has learned positions: set --model.position=learned")
    theirs = timm_vit_hparams(model)
    ours = {"backbone": task.backbone_cfg, "patch_size": task.patch_size, "pool": task.pool, "norm_pre": task.norm_pre}
    wrong = [f"{k}: {ours[k]} here, {theirs[k]} in {name}" for k in ours if k != "backbone" and ours[k] != theirs[k]]
    for field in ("width", "depth", "heads", "mlp_ratio", "activation", "norm_eps", "bias"):
        mine, need = getattr(task.backbone_cfg, field), getattr(theirs["backbone"], field)
        if mine != need:
            wrong.append(f"backbone.{field}: {mine} here, {need} in {name}")
    if wrong:
        raise ValueError(f"--model.pretrained={name!r} does not fit this model; set " + "; ".join(wrong))
    state = convert_timm_vit(model.state_dict(), grid=task.tower.patch.grid)
    if model.pretrained_cfg.get("num_classes") != task.num_classes:  # a new head for new classes: keep our zero init
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = task.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "metrics.", "val_confusion"))]
    assert not missing and not unexpected, (missing, unexpected)
