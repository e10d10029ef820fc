"""The plain CLIP (`polyformer.models.clip`) without Lightning: builds from its config, trains a contrastive step, draws
the RNG as the task used to (image tower, text tower, projections, CLIP's init, logit scale), caps the logit scale
with a straight-through gradient, counts its FLOPs, and refuses bad configs by key."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyformer.backbone import TransformerConfig, weight_count
from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig, TextTower
from polyformer.models.image_tower import ImageTower

IMAGE = ImageEncoderConfig(TransformerConfig(width=32, depth=2, heads=2, dropout=0.0, position="none"), 8, 4, 1)
TEXT = TextEncoderConfig(
    TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="learned", max_len=12, causal=True)
)
VOCAB, EOS = 40, 39


def tiny(**kw) -> CLIPConfig:
    return CLIPConfig(**{**dict(image=IMAGE, text=TEXT, embed_dim=8, vocab_size=VOCAB, eos_id=EOS), **kw})


def tokens(n: int) -> torch.Tensor:
    """Rows of [bos] words [eos] then 0-padding, of different lengths."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        length = 2 + i % 8
        out[i, 0] = EOS - 1
        out[i, 1:length] = torch.randint(1, EOS - 1, (length - 1,), generator=g)
        out[i, length] = EOS
    return out


def test_a_contrastive_step_reaches_every_parameter_and_lowers_the_loss():
    torch.manual_seed(0)
    model = CLIP(tiny())
    images, text = torch.randn(6, 1, 8, 8), tokens(6)
    image_emb, text_emb, scale = model(images, text)
    assert image_emb.shape == text_emb.shape == (6, 8) and scale.shape == ()
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    labels = torch.arange(6)

    def loss() -> torch.Tensor:
        logits = model.similarity(images, text)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    first = loss()
    first.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    optimizer.step()
    assert loss().item() < first.item()


def test_text_pools_at_the_last_end_of_text_and_ignores_padding():
    model = CLIP(tiny()).eval()
    text = tokens(3)
    padded = text.clone()
    padded[0, 4:] = 7  # after the first row's end-of-text (position 2): invisible under the causal mask
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(text))
        full = model.text.encoder(model.text.embed(text))
        torch.testing.assert_close(model.text(text)[1], full[1, 3])  # [bos] w w [eos]: position 3
        bos_is_eos = text.clone()
        bos_is_eos[:, 0] = EOS  # GPT-2 style tokenizers start with the end-of-text token too: pool at the last
        torch.testing.assert_close(model.text(bos_is_eos)[1], model.text.encoder(model.text.embed(bos_is_eos))[1, 3])


def test_built_as_the_task_built_it():
    """Same keys and the same draws from the RNG as the task's old `build()` (image tower, text tower, projections,
    CLIP's init in this order, then the logit scale), so seeded runs and the golden curve are unchanged."""
    cfg = tiny()
    torch.manual_seed(0)
    model = CLIP(cfg)
    torch.manual_seed(0)
    image = ImageTower(IMAGE.backbone, 8, 4, 1, "cls", norm_pre=True)
    text = TextTower(TEXT, VOCAB, EOS)
    image_proj, text_proj = nn.Linear(32, 8, bias=False), nn.Linear(16, 8, bias=False)
    for tower, width, depth in ((image.encoder, 32, 2), (text.encoder, 16, 1)):
        for block in tower.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(block.attn.proj.weight, std=width**-0.5 * (2 * depth) ** -0.5)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=width**-0.5 * (2 * depth) ** -0.5)
    nn.init.normal_(image.patch.cls_token, std=32**-0.5)
    nn.init.normal_(image.pos_embed, std=32**-0.5)
    nn.init.normal_(text.embed.weight, std=0.02)
    nn.init.normal_(text.encoder.positions.weight, std=0.01)
    nn.init.normal_(image_proj.weight, std=32**-0.5)
    nn.init.normal_(text_proj.weight, std=16**-0.5)
    expected = {"logit_scale": torch.full((1,), math.log(1 / 0.07))}
    for prefix, module in (("image", image), ("text", text), ("image_proj", image_proj), ("text_proj", text_proj)):
        expected.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=key)
    assert model.cfg is cfg
    after_by_hand = torch.rand(1)  # the logit scale draws nothing: the RNG is where the hand-built parts left it
    torch.manual_seed(0)
    CLIP(cfg)
    assert torch.equal(torch.rand(1), after_by_hand)


def test_the_logit_scale_is_capped_in_value_but_not_in_gradient():
    model = CLIP(tiny(init_logit_scale=10.0, max_logit_scale=50.0))
    assert model.scale().item() == pytest.approx(10.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    scale = model.scale()
    assert scale.item() == pytest.approx(50.0)
    scale.backward()
    assert model.logit_scale.grad.item() == pytest.approx(50.0)  # d exp(x)/dx at the capped value, not 0


def test_training_flops_are_the_towers_and_the_projections():
    model = CLIP(tiny())
    images, text = torch.randn(3, 1, 8, 8), tokens(5)
    projections = 6.0 * (weight_count(model.image_proj) * 3 + weight_count(model.text_proj) * 5)
    expected = model.image.training_flops(images) + model.text.encoder.training_flops(5, 12) + projections
    assert model.training_flops(images, text) == expected


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(embed_dim=0), "model.embed_dim"),
        (dict(vocab_size=0), "model.vocab_size"),
        (dict(eos_id=VOCAB), "model.eos_id"),
        (dict(init_logit_scale=200.0), "model.init_logit_scale"),
        (dict(init_logit_scale=0.0), "model.init_logit_scale"),
    ],
)
def test_bad_configs_name_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        tiny(**change)


def test_bad_tower_configs_name_the_key():
    with pytest.raises(ValueError, match="model.text.backbone.causal"):
        TextEncoderConfig(TransformerConfig(width=16, depth=1, heads=2, causal=False))
    with pytest.raises(ValueError, match="model.image.patch_size"):
        ImageEncoderConfig(patch_size=0)
    with pytest.raises(ValueError, match="model.image.pool"):
        ImageEncoderConfig(pool="max")
