"""The plain GPT (`polyformer.models.gpt`) without Lightning: builds from its config, runs forward and backward, draws
the RNG as the task used to (embedding, backbone, head), decodes with its KV cache as it computes in one pass, counts
its FLOPs, and refuses bad configs by key. That it runs without Lightning in a fresh interpreter is
tests/test_package_boundaries.py::test_backbone_and_models_run_without_lightning, for every model at once."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyformer.backbone import TokenEmbedding, Transformer, TransformerConfig, weight_count
from polyformer.models.gpt import GPT, GPTConfig

TINY = TransformerConfig(width=32, depth=2, heads=4, position="learned", max_len=16, causal=True, dropout=0.0)


@pytest.mark.parametrize("tie", [True, False])
def test_forward_and_backward_reach_every_parameter(tie):
    torch.manual_seed(0)
    model = GPT(GPTConfig(TINY, vocab_size=50, tie_embeddings=tie))
    tokens = torch.randint(0, 50, (3, 9))
    logits = model(tokens[:, :-1])
    assert logits.shape == (3, 8, 50) and torch.isfinite(logits).all()  # the padded rows' logits are cut off
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert (model.head.weight is model.embed.weight) == tie
    assert model.embed.weight.shape == (64, 32)  # 50 rows padded to a multiple of 64


@pytest.mark.parametrize("tie", [True, False])
def test_built_as_the_task_built_it_embed_backbone_head(tie):
    """Same keys and the same draws from the RNG as the task's old `build()`, so seeded runs are unchanged."""
    cfg = GPTConfig(TINY, vocab_size=100, tie_embeddings=tie)
    torch.manual_seed(0)
    model = GPT(cfg)
    torch.manual_seed(0)
    embed, backbone = TokenEmbedding(128, 32), Transformer(TINY)
    head = nn.Linear(32, 128, bias=False)
    if tie:
        head.weight = embed.weight
    else:
        nn.init.normal_(head.weight, std=0.02)
    expected = {"embed.weight": embed.weight, **{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "head.weight": head.weight}  # fmt: skip
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=key)
    assert model.cfg is cfg and cfg.padded_vocab_size == 128


def test_cached_decoding_equals_one_pass():
    torch.manual_seed(0)
    model = GPT(GPTConfig(TINY, vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_training_flops_are_the_backbones_and_the_heads():
    model = GPT(GPTConfig(TINY, vocab_size=50))
    assert model.training_flops(3, 8) == model.backbone.training_flops(3, 8) + 6.0 * weight_count(model.head) * 3 * 8


@pytest.mark.parametrize(
    "backbone, vocab, key",
    [
        (TransformerConfig(width=32, depth=1, heads=4), 50, "model.backbone.causal"),
        (TransformerConfig(width=32, depth=1, heads=4, causal=True, cross_attention=True), 50,
         "model.backbone.cross_attention"),
        (TINY, 0, "model.vocab_size"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_key(backbone, vocab, key):
    with pytest.raises(ValueError, match=key):
        GPTConfig(backbone, vocab_size=vocab)
