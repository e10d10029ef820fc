"""Our CLIP with weights converted by `convert_open_clip` reproduces open_clip's and transformers' image and text
embeddings and logits: small models of the reference architectures built locally with random weights."""

import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig
from polyformer.weights.open_clip import convert_open_clip

IMAGE, PATCH, CTX, VOCAB, EMBED = 32, 8, 16, 100, 24
EOT = VOCAB - 1  # OpenAI's tokenizer puts end-of-text at the highest id


def ours(activation: str, image_width: int, image_heads: int, text_width: int, text_heads: int) -> CLIP:
    image = TransformerConfig(width=image_width, depth=2, heads=image_heads, dropout=0.0, activation=activation)
    text = TransformerConfig(
        width=text_width, depth=2, heads=text_heads, dropout=0.0, activation=activation, position="learned",
        max_len=CTX, causal=True,
    )  # fmt: skip
    model = CLIP(
        image=ImageEncoderConfig(image, IMAGE, PATCH, 3, norm_pre=True),
        text=TextEncoderConfig(text),
        embed_dim=EMBED,
        vocab_size=VOCAB,
        eos_id=EOT,
    )
    model.configure_model()
    return model.eval()


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


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_vit_embeddings_match(quick_gelu):
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, image_size=IMAGE, patch_size=PATCH)
    text = CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=24, heads=2, layers=2)
    ref = OpenCLIP(EMBED, vision, text, quick_gelu=quick_gelu).eval()
    randomize(ref)
    model = ours("quick_gelu" if quick_gelu else "gelu", 32, 2, 24, 2)
    model.load_state_dict(convert_open_clip(ref.state_dict()))

    images, tokens = inputs()
    with torch.no_grad():
        ref_image, ref_text = ref.encode_image(images, normalize=True), ref.encode_text(tokens, normalize=True)
        torch.testing.assert_close(model.encode_image(images), ref_image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(tokens), ref_text, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.scale(), ref.logit_scale.exp())
        ref_logits = ref.logit_scale.exp() * ref_image @ ref_text.T
        torch.testing.assert_close(model.similarity(images, tokens), ref_logits, atol=1e-4, rtol=1e-4)


def features(out) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output object holding them as pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_transformers_clip_model_embeddings_match():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
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
    model = ours("quick_gelu", 32, 2, 24, 2)
    model.load_state_dict(convert_open_clip(ref.state_dict()))

    images, tokens = inputs()
    with torch.no_grad():
        ref_image = F.normalize(features(ref.get_image_features(pixel_values=images)), dim=-1)
        ref_text = F.normalize(features(ref.get_text_features(input_ids=tokens)), dim=-1)
        torch.testing.assert_close(model.encode_image(images), ref_image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(tokens), ref_text, atol=1e-5, rtol=1e-4)


def test_converter_refuses_foreign_state_dicts():
    with pytest.raises(ValueError, match="not an open_clip CLIP"):
        convert_open_clip({"transformer.h.0.attn.c_attn.weight": torch.zeros(3, 3)})
