"""CLIP weights from open_clip (Ilharco et al. 2021, github.com/mlfoundations/open_clip: `open_clip.model.CLIP`, the
OpenAI layout) or from Hugging Face `transformers.CLIPModel`, converted to `polyformer.tasks.contrastive.CLIP`.

Both references are pre-LN ViT + causal text transformers like ours; the differences are names and layouts:
open_clip keeps fused `in_proj` (rows q, k, v, as our `qkv`), projections as (width, embed) matrices applied as
x @ proj (our Linear weight is the transpose), a bias-free patch convolution (ours has a bias: zero) and the class
token as a (D,) vector. transformers splits q/k/v. Activation (GELU or QuickGELU for OpenAI's weights) and heads
are not in the weights: set them in the config. Legend: D width, E embed dim, N patches.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_BLOCK = {  # open_clip residual block -> our Block
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_HF_BLOCK = {
    "layer_norm1": "norm1",
    "self_attn.out_proj": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_OPEN_CLIP = {
    "visual.conv1.weight": "image.patch.proj.weight",
    "visual.ln_pre": "image.norm_pre",
    "visual.ln_post": "image.encoder.norm",
    "token_embedding.weight": "text.embed.weight",
    "positional_embedding": "text.encoder.positions.weight",
    "ln_final": "text.encoder.norm",
    "logit_scale": "logit_scale",
}
_HF = {
    "vision_model.embeddings.patch_embedding.weight": "image.patch.proj.weight",
    "vision_model.pre_layrnorm": "image.norm_pre",
    "vision_model.post_layernorm": "image.encoder.norm",
    "visual_projection.weight": "image_proj.weight",
    "text_model.embeddings.token_embedding.weight": "text.embed.weight",
    "text_model.embeddings.position_embedding.weight": "text.encoder.positions.weight",
    "text_model.final_layer_norm": "text.encoder.norm",
    "text_projection.weight": "text_proj.weight",
    "logit_scale": "logit_scale",
}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def convert_open_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip `CLIP` or a transformers `CLIPModel` state dict -> our CLIP task's state dict (ViT towers only)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}  # open_clip training checkpoints: DDP prefix
    if "text_model.embeddings.token_embedding.weight" in sd:
        return _convert_hf(sd)
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        raise ValueError(
            "not an open_clip CLIP (ViT) or transformers CLIPModel state dict: expected 'visual.conv1.weight' and "
            f"'token_embedding.weight' (or 'text_model.*'), got keys like {sorted(sd)[:5]}"
        )
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if m := re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key):
            tower = "image" if m[1] else "text"
            out[f"{tower}.encoder.blocks.{m[2]}.{_rename(m[3], _BLOCK)}"] = value
        elif key == "visual.class_embedding":
            out["image.patch.cls_token"] = value.reshape(1, 1, -1)  # (D,) -> (1, 1, D)
        elif key == "visual.positional_embedding":
            out["image.pos_embed"] = value.unsqueeze(0)  # (1 + N, D) -> (1, 1 + N, D)
        elif key == "visual.proj":
            out["image_proj.weight"] = value.T  # x @ (D, E) == Linear with weight (E, D)
        elif key == "text_projection":
            out["text_proj.weight"] = value.T
        elif key in ("attn_mask", "logit_bias") or key.startswith("visual.attn_pool"):
            if key != "attn_mask":
                raise ValueError(f"{key!r} (SigLIP bias / attentional pooling) has no counterpart in our CLIP")
        elif (new := _rename(key, _OPEN_CLIP)) is not None:
            out[new] = value
        else:
            raise ValueError(f"open_clip key {key!r} has no counterpart in our CLIP (a non-ViT or custom model?)")
    out["image.patch.proj.bias"] = torch.zeros(out["image.patch.proj.weight"].shape[0])  # CLIP's conv has no bias
    out["logit_scale"] = out["logit_scale"].reshape(1)  # ours is (1,): FSDP shards no 0-d parameters
    return out


def _convert_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # our prefix -> {"q.weight": ..., ...}, fused once all three are seen
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if m := re.match(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)", key):
            prefix = f"{'image' if m[1] == 'vision' else 'text'}.encoder.blocks.{m[2]}"
            if pm := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", m[3]):
                qkv.setdefault(f"{prefix}.attn.qkv.{pm[2]}", {})[pm[1]] = value
            else:
                out[f"{prefix}.{_rename(m[3], _HF_BLOCK)}"] = value
        elif key == "vision_model.embeddings.class_embedding":
            out["image.patch.cls_token"] = value.reshape(1, 1, -1)
        elif key == "vision_model.embeddings.position_embedding.weight":
            out["image.pos_embed"] = value.unsqueeze(0)
        elif (new := _rename(key, _HF)) is not None:
            out[new] = value
        else:
            raise ValueError(f"transformers CLIPModel key {key!r} has no counterpart in our CLIP")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])  # rows q, k, v as our fused projection
    out["image.patch.proj.bias"] = torch.zeros(out["image.patch.proj.weight"].shape[0])
    out["logit_scale"] = out["logit_scale"].reshape(1)
    return out
