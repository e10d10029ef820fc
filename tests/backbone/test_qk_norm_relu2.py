"""QK-norm (RMSNorm of each head's queries and keys before rotary and the dot product) and the ReLU^2 activation,
against their formulas: in self and cross attention, with GQA, rotary positions, the KV cache and the attention maps
recomputed outside the module. Both off by default and then absent from the module tree."""

import math

import pytest
import torch

from polyformer.backbone import Attention, FeedForward, Transformer, TransformerConfig
from polyformer.backbone.positional import RotaryPositions, apply_rotary
from polyformer.callbacks.attention_maps import attention_weights


def cfg(**kw) -> TransformerConfig:
    return TransformerConfig(**{"width": 32, "heads": 4, "depth": 2, "dropout": 0.0, **kw})


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * g over the last (head) dim."""
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def randomise_norms(module: torch.nn.Module) -> None:
    """Scales away from 1, so a norm applied twice (or not at all) cannot pass for one applied once."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 2.0)


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


@pytest.mark.parametrize("case", ["self", "gqa-rotary", "cross"])
def test_qk_norm_attention_equals_formula(case):
    torch.manual_seed(0)
    kv_heads = 2 if case == "gqa-rotary" else 4
    attn = Attention(cfg(qk_norm=True, kv_heads=kv_heads, norm_eps=1e-6), cross=case == "cross").eval()
    randomise_norms(attn)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    rope = RotaryPositions(8, 10000.0)(torch.arange(5)[None]) if case == "gqa-rotary" else None
    if case == "cross":
        (q,), (k, v) = [attn.q(x)], attn.kv(context).chunk(2, dim=-1)
    else:
        q, k, v = attn.qkv(x).split([32, 8 * kv_heads, 8 * kv_heads], dim=-1)
    q, k, v = heads(q, 4), heads(k, kv_heads), heads(v, kv_heads)
    q, k = rms(q, attn.q_norm.weight, 1e-6), rms(k, attn.k_norm.weight, 1e-6)  # per head, before rotary
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x, context if case == "cross" else None, rope=rope), expected)
    # The maps the media callback recomputes outside the module apply the same norms.
    maps = attention_weights(attn, x, context if case == "cross" else None, rope=rope)
    torch.testing.assert_close(maps, weights)


def test_qk_norm_makes_logits_independent_of_the_query_key_scale():
    """The point of QK-norm: scaling W_q and W_k (what a high lr does to them) no longer scales the logits."""
    torch.manual_seed(0)
    attn = Attention(cfg(qk_norm=True, bias=False)).eval()
    x = torch.randn(2, 5, 32)
    before = attn(x, is_causal=True)
    with torch.no_grad():
        attn.qkv.weight[:64] *= 10.0  # the query and key rows
    torch.testing.assert_close(attn(x, is_causal=True), before, atol=1e-5, rtol=1e-5)


def test_qk_norm_off_adds_no_parameters_and_on_adds_one_scale_per_head_dim():
    off, on = Attention(cfg()), Attention(cfg(qk_norm=True, kv_heads=2))
    assert not [n for n, _ in off.named_parameters() if "norm" in n]
    shapes = {n: tuple(p.shape) for n, p in on.named_parameters() if "norm" in n}
    assert shapes == {"q_norm.weight": (8,), "k_norm.weight": (8,)}


def incremental(model: Transformer, x: torch.Tensor, **kw) -> torch.Tensor:
    cache = model.new_cache()
    return torch.cat([model(x[:, t : t + 1], cache=cache, **kw) for t in range(x.shape[1])], dim=1)


@pytest.mark.parametrize("options", [{}, {"position": "rotary", "kv_heads": 2}, {"cross_attention": True}])
def test_qk_norm_kv_cache_decoding_equals_full_forward(options):
    """Cached keys are normed once, when they are computed (a second norm with scales != 1 would change them)."""
    torch.manual_seed(0)
    model = Transformer(cfg(causal=True, qk_norm=True, **options)).eval()
    randomise_norms(model)
    x = torch.randn(2, 7, 32)
    kw = {"memory": torch.randn(2, 4, 32)} if options.get("cross_attention") else {}
    torch.testing.assert_close(incremental(model, x, **kw), model(x, **kw), atol=1e-5, rtol=1e-5)


def test_qk_norm_scales_receive_gradients():
    torch.manual_seed(0)
    model = Transformer(cfg(causal=True, qk_norm=True, cross_attention=True)).train()
    model(torch.randn(2, 5, 32), memory=torch.randn(2, 3, 32)).square().mean().backward()
    norms = {n: p.grad for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    assert len(norms) == 2 * 2 * 2 and all(g is not None and g.abs().sum() > 0 for g in norms.values())


def test_relu2_feed_forward_equals_formula():
    """FFN(x) = relu(x W1 + b1)^2 W2 + b2."""
    torch.manual_seed(0)
    ffn = FeedForward(cfg(activation="relu2"))
    x = torch.randn(2, 5, 32)
    expected = ffn.fc2(torch.relu(ffn.fc1(x)) ** 2)
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.fc1.out_features == 128  # not gated: the hidden width is mlp_ratio * width


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "relu3"}, "TransformerConfig.activation must be one of"),
        ({"norm": "batchnorm"}, "TransformerConfig.norm must be one of"),
        ({"position": "alibi"}, "TransformerConfig.position must be one of"),
    ],
)
def test_unknown_choices_are_value_errors_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        TransformerConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
