"""Attention against the paper's formula and against torch.nn.MultiheadAttention with copied weights; the attention
maps computed outside the module against the formula."""

import math

import pytest
import torch
from torch import nn

from polyformer.backbone import Attention, TransformerConfig, build_mask
from polyformer.backbone.positional import RotaryPositions, apply_rotary
from polyformer.callbacks.attention_maps import attention_weights


def cfg(**kw) -> TransformerConfig:
    return TransformerConfig(**{"width": 32, "heads": 4, "depth": 2, "dropout": 0.0, **kw})


def formula(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d_k)) V, written out."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def split_heads(x, h):
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_equals_formula(use_mask):
    torch.manual_seed(0)
    attn = Attention(cfg()).eval()
    x = torch.randn(2, 5, 32)
    mask = None
    if use_mask:
        pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
        mask = build_mask(5, 5, causal=True, window=None, padding_mask=pad, device=x.device)
    q, k, v = attn.qkv(x).split(32, dim=-1)
    expected = formula(split_heads(q, 4), split_heads(k, 4), split_heads(v, 4), mask)
    expected = attn.proj(expected.transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x, mask=mask), expected)


@pytest.mark.parametrize("case", ["causal", "padding", "gqa", "rotary", "cross"])
def test_attention_maps_are_the_weights_the_module_applies(case):
    """The maps the media callback draws (`attention_weights`, outside the backbone) are the formula's weights,
    and the SDPA path's output is exactly those weights applied to V through the module's projection."""
    torch.manual_seed(0)
    heads, kv_heads = 4, 2 if case == "gqa" else 4
    attn = Attention(cfg(kv_heads=kv_heads), cross=case == "cross").eval()
    x = torch.randn(2, 5, 32, requires_grad=True)
    context, mask, is_causal, rope = None, None, False, None
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    if case in ("causal", "gqa"):
        is_causal = True
    elif case == "padding":
        mask = build_mask(5, 5, causal=True, window=None, padding_mask=pad, device=x.device)
    elif case == "rotary":
        is_causal, rope = True, RotaryPositions(8, 10000.0)(torch.arange(3, 8)[None])  # positions after a prefix
    else:
        context = torch.randn(2, 7, 32)
        mem_pad = torch.ones(2, 7, dtype=torch.bool)
        mem_pad[0, 5:] = False
        mask = mem_pad[:, None, None, :]

    # By hand, from the module's weights.
    if context is None:
        q, k, v = attn.qkv(x).split([32, 8 * kv_heads, 8 * kv_heads], dim=-1)
    else:
        (q,), (k, v) = [attn.q(x)], attn.kv(context).chunk(2, dim=-1)
    q, k, v = split_heads(q, heads), split_heads(k, kv_heads), split_heads(v, kv_heads)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril() if is_causal else mask
    expected = torch.softmax(scores if allowed is None else scores.masked_fill(~allowed, float("-inf")), dim=-1)

    weights = attention_weights(attn, x, context, mask=mask, is_causal=is_causal, rope=rope)
    assert weights.shape == (2, heads, 5, 7 if case == "cross" else 5) and not weights.requires_grad
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, 5))
    y = attn(x, context, mask=mask, is_causal=is_causal, rope=rope)
    torch.testing.assert_close(y, attn.proj((weights @ v).transpose(1, 2).flatten(2)))


def copy_to_mha(attn: Attention, mha: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        if attn.cross:
            mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
            mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        else:
            mha.in_proj_weight.copy_(attn.qkv.weight)
            mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)


def test_self_attention_equals_torch_mha_with_causal_and_padding_masks():
    torch.manual_seed(0)
    attn = Attention(cfg()).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    copy_to_mha(attn, mha)
    x = torch.randn(3, 6, 32)
    pad = torch.ones(3, 6, dtype=torch.bool)
    pad[1, 4:] = False
    pad[2, 2:] = False
    ours = attn(x, mask=build_mask(6, 6, causal=True, window=None, padding_mask=pad, device=x.device))
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)  # torch: True = not allowed
    theirs, _ = mha(x, x, x, attn_mask=causal, key_padding_mask=~pad, need_weights=False)
    torch.testing.assert_close(ours[pad], theirs[pad])  # padded query rows are undefined in both


def test_cross_attention_equals_torch_mha():
    torch.manual_seed(0)
    attn = Attention(cfg(), cross=True).eval()
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    copy_to_mha(attn, mha)
    x, memory = torch.randn(2, 4, 32), torch.randn(2, 7, 32)
    mem_pad = torch.ones(2, 7, dtype=torch.bool)
    mem_pad[0, 5:] = False
    ours = attn(x, memory, mask=mem_pad[:, None, None, :])
    theirs, _ = mha(x, memory, memory, key_padding_mask=~mem_pad, need_weights=False)
    torch.testing.assert_close(ours, theirs)


def test_grouped_query_attention_shares_kv_heads():
    torch.manual_seed(0)
    attn = Attention(cfg(kv_heads=2)).eval()
    assert attn.qkv.out_features == 32 + 2 * 2 * 8
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).split([32, 16, 16], dim=-1)
    k, v = (split_heads(t, 2).repeat_interleave(2, dim=1) for t in (k, v))
    expected = attn.proj(formula(split_heads(q, 4), k, v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x), expected)


def test_sliding_window_mask():
    mask = build_mask(5, 5, causal=True, window=2, padding_mask=None, device=torch.device("cpu"))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    # the last query of a cached decode step sees the same window
    step = build_mask(1, 5, causal=True, window=2, padding_mask=None, device=torch.device("cpu"))[0, 0]
    assert torch.equal(step, expected[-1:])


def test_fully_padded_rows_stay_finite():
    pad = torch.tensor([[False, True, True]])
    mask = build_mask(3, 3, causal=True, window=None, padding_mask=pad, device=torch.device("cpu"))
    assert mask[0, 0, 0].all()  # a pad query that sees nothing is allowed to see everything instead of NaN
    attn = Attention(cfg()).eval()
    assert torch.isfinite(attn(torch.randn(1, 3, 32), mask=mask)).all()
