"""LayerScale (TransformerConfig.layer_scale): each residual branch scaled per channel, x + gamma * f(x), checked
against that formula written out; off by default (no parameters); gamma gets gradients; a deep copy uses its own."""

import copy

import pytest
import torch

from polyformer.backbone import Transformer, TransformerConfig


def cfg(**kw) -> TransformerConfig:
    return TransformerConfig(width=16, depth=2, heads=2, dropout=0.0, position="none", **kw)


def test_block_is_residual_plus_scaled_branch():
    torch.manual_seed(0)
    model = Transformer(cfg(layer_scale=0.1)).eval()
    for block in model.blocks:  # distinct per-channel values, so a swapped or missing gamma shows
        block.ls1.gamma.data.uniform_(-1, 1)
        block.ls2.gamma.data.uniform_(-1, 1)
    x = torch.randn(3, 5, 16)
    h = x
    with torch.no_grad():
        for b in model.blocks:
            h = h + b.ls1.gamma * b.attn.forward(b.norm1(h))  # forward(): the branch without its hook
            h = h + b.ls2.gamma * b.mlp.forward(b.norm2(h))
        torch.testing.assert_close(model(x), model.norm(h))
    keys = {k for k in model.state_dict() if ".ls" in k}
    assert keys == {f"blocks.{i}.{n}.gamma" for i in range(2) for n in ("ls1", "ls2")}
    torch.testing.assert_close(Transformer(cfg(layer_scale=1e-4)).blocks[0].ls2.gamma, torch.full((16,), 1e-4))


def test_off_by_default_and_cross_attention_gets_its_own_scale():
    assert not any(".ls" in k for k in Transformer(cfg()).state_dict())
    model = Transformer(cfg(layer_scale=0.1, cross_attention=True, causal=True))
    assert {"ls1", "ls_cross", "ls2"} <= {n for n, _ in model.blocks[0].named_children()}


def test_gamma_gets_gradients_and_a_deep_copy_scales_with_its_own_gamma():
    torch.manual_seed(0)
    model = Transformer(cfg(layer_scale=0.1))
    x = torch.randn(2, 4, 16)
    model(x).square().sum().backward()
    assert all(b.ls1.gamma.grad.abs().max() > 0 and b.ls2.gamma.grad.abs().max() > 0 for b in model.blocks)
    twin = copy.deepcopy(model).eval()
    model.eval()
    for block in twin.blocks:
        block.ls1.gamma.data.zero_()
        block.ls2.gamma.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), twin.norm(x))  # every branch off: the identity, then the final norm
        assert not torch.allclose(model(x), model.norm(x))  # the original keeps its gamma


@pytest.mark.parametrize("bad", [0.0, -1e-4])
def test_layer_scale_must_be_positive(bad):
    with pytest.raises(ValueError, match="layer_scale"):
        cfg(layer_scale=bad)
