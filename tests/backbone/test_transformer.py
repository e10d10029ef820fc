"""The Transformer stack: causality, padding invariance, KV-cache decoding equals the full pass, every parameter
learns, pre-LN and post-LN both learn a copy task, bf16 autocast on CPU, config validation."""

import pytest
import torch
from torch import nn

from polyformer.backbone import TokenEmbedding, Transformer, TransformerConfig
from polyformer.backbone.layers import DropPath


def make(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**{"width": 32, "heads": 4, "depth": 2, "dropout": 0.0, **kw})).eval()


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rotary", "none"])
def test_causal_outputs_ignore_the_future(position):
    model = make(causal=True, position=position)
    x = torch.randn(2, 8, 32)
    y = model(x)
    for t in range(8):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        torch.testing.assert_close(model(x2)[:, : t + 1], y[:, : t + 1])
    x3 = x.clone()
    x3[:, 5] += torch.randn(32)  # (a constant shift would vanish in the final LayerNorm)
    assert not torch.allclose(model(x3)[:, 5:], y[:, 5:])  # but the present and future do change


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_change_nothing(causal):
    model = make(causal=causal)
    x = torch.randn(1, 5, 32)
    alone = model(x)
    padded = torch.cat([x, torch.randn(1, 3, 32)], dim=1)  # three junk pad positions on the right
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(model(padded, padding_mask=mask)[:, :5], alone)


def test_memory_padding_changes_nothing():
    model = make(causal=True, cross_attention=True)
    x, memory = torch.randn(1, 4, 32), torch.randn(1, 6, 32)
    alone = model(x, memory=memory)
    padded_memory = torch.cat([memory, torch.randn(1, 2, 32)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 2])
    torch.testing.assert_close(model(x, memory=padded_memory, memory_padding_mask=mask), alone)


def incremental(model: Transformer, x: torch.Tensor, **kw) -> torch.Tensor:
    cache = model.new_cache()
    return torch.cat([model(x[:, t : t + 1], cache=cache, **kw) for t in range(x.shape[1])], dim=1)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"position": "rotary"},
        {"position": "learned"},
        {"window": 3},
        {"kv_heads": 2},
        {"kv_heads": 1, "window": 2, "position": "rotary"},
        {"prenorm": False},
    ],
)
def test_kv_cache_decoding_equals_full_forward_decoder_only(options):
    model = make(causal=True, **options)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(incremental(model, x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"kv_heads": 2}, {"window": 2}])
def test_kv_cache_decoding_equals_full_forward_encoder_decoder(options):
    encoder = make()
    decoder = make(causal=True, cross_attention=True, **options)
    src = torch.randn(2, 6, 32)
    src_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    memory = encoder(src, padding_mask=src_mask)
    x = torch.randn(2, 7, 32)
    full = decoder(x, memory=memory, memory_padding_mask=src_mask)
    torch.testing.assert_close(
        incremental(decoder, x, memory=memory, memory_padding_mask=src_mask), full, atol=1e-5, rtol=1e-5
    )


def test_chunked_prefill_then_single_steps():
    model = make(causal=True, position="rotary")
    x = torch.randn(1, 10, 32)
    cache = model.new_cache()
    out = [model(x[:, :6], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(out, 1), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"cross_attention": True}, {"activation": "swiglu", "norm": "rmsnorm"}])
def test_every_parameter_receives_a_gradient(options):
    model = make(causal=True, position="learned", **options).train()
    x = torch.randn(2, 5, 32)
    memory = torch.randn(2, 3, 32) if options.get("cross_attention") else None
    model(x, memory=memory).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("activation", ["relu", "relu2", "gelu", "gelu_tanh", "quick_gelu", "swiglu"])
def test_activations_build_and_run(activation):
    model = make(activation=activation)
    assert torch.isfinite(model(torch.randn(2, 3, 32))).all()


class CopyModel(nn.Module):
    """Encoder-only copy: predict the input token at each position."""

    def __init__(self, prenorm: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = TokenEmbedding(12, 32)
        self.body = Transformer(TransformerConfig(width=32, heads=4, depth=2, dropout=0.0, prenorm=prenorm))

    def forward(self, tokens):
        return self.body(self.emb(tokens)) @ self.emb.weight.T


@pytest.mark.parametrize("prenorm", [True, False])
def test_pre_and_post_ln_learn_a_copy_task(prenorm):
    model = CopyModel(prenorm)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        tokens = torch.randint(0, 12, (16, 8), generator=g)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens = torch.randint(0, 12, (64, 8), generator=g)
    accuracy = (model(tokens).argmax(-1) == tokens).float().mean().item()
    assert loss.item() < 0.2 and accuracy > 0.98, (loss.item(), accuracy)


def test_post_ln_has_no_final_norm_and_pre_ln_does():
    assert isinstance(make(prenorm=False).norm, nn.Identity)
    assert isinstance(make(prenorm=True).norm, nn.LayerNorm)


def test_bf16_autocast_forward_on_cpu():
    model = make(causal=True)
    x = torch.randn(2, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), model(x), atol=0.1, rtol=0.1)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(width=256, heads=4, depth=8))
    std = 0.02 / (2 * 8) ** 0.5
    assert abs(model.blocks[0].attn.proj.weight.std().item() - std) < 0.2 * std
    assert abs(model.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0


def test_parameter_count_and_flops():
    model = make()
    d, L = 32, 2
    per_block = 4 * d * d + 4 * d + 2 * (4 * d * d) + 4 * d + d + 2 * 2 * d  # attention, ffn, norms
    assert model.num_parameters() == L * per_block + 2 * d
    matrices = L * (4 * d * d + 2 * (4 * d * d))  # the weights of qkv, proj, fc1, fc2: what multiplies activations
    assert model.training_flops(3, 10) == 3 * 10 * (6 * matrices + 12 * L * 10 * d)  # 6N + 12LTD per token


def test_cross_attention_flops_count_memory_positions():
    model = Transformer(TransformerConfig(width=32, depth=2, heads=4, cross_attention=True, causal=True))
    d, L, B, T, S = 32, 2, 3, 5, 7
    queries = L * (4 * d * d + 2 * d * d + 2 * (4 * d * d))  # self qkv + proj, cross q + proj, ffn
    keys = L * 2 * d * d  # cross-attention k, v: applied to the memory
    expected = 6 * (queries * B * T + keys * B * S) + 12 * L * d * B * T * (T + S)
    assert model.training_flops(B, T, memory=S) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 30, "heads": 4}, "width (30) must be divisible by heads (4)"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"heads": 4, "kv_heads": 3}, "kv_heads (3) must divide heads (4)"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"width": 12, "heads": 4, "position": "rotary"}, "even head dim"),
    ],
)
def test_config_errors_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TransformerConfig(**kwargs)


def test_stochastic_depth_drops_whole_residual_branches_only_in_training():
    plain = make(drop_path=0.0)
    model = make(drop_path=0.5)  # same seed: same weights
    assert [block.drop_path.p for block in model.blocks] == [0.0, 0.5]  # linear over depth, as in DeiT
    x = torch.randn(8, 3, 32)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))  # evaluation: nothing dropped
    assert not torch.allclose(model.train()(x), plain.train()(x))

    drop = DropPath(0.25).train()
    branch = torch.ones(4000, 3, 2)
    out = drop(branch)
    per_sample = out.flatten(1)
    torch.testing.assert_close(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))  # dropped whole, or scaled
    assert (per_sample == per_sample[:, :1]).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert abs(out.mean().item() - 1.0) < 0.05  # unbiased in expectation


def test_init_and_flops_follow_the_modules_not_their_names():
    # Residual projections are tagged where they are built: init scales them however the model names them, and the
    # FLOP count finds cross-attention keys/values by the layer, not by a ".kv" suffix.
    from torch import nn

    from polyformer.backbone import init_weights
    from polyformer.backbone.attention import Attention

    torch.manual_seed(0)
    cfg = TransformerConfig(width=256, depth=8, heads=4)
    renamed = nn.ModuleDict({"mixer": Attention(cfg)})
    init_weights(renamed, depth=8)
    assert abs(renamed["mixer"].proj.weight.std().item() - 0.02 / 4) < 5e-4  # 0.02 / sqrt(2 * 8)
    assert abs(renamed["mixer"].qkv.weight.std().item() - 0.02) < 5e-4
    decoder = Transformer(TransformerConfig(width=32, depth=2, heads=2, causal=True, cross_attention=True))
    with_memory = decoder.training_flops(2, 5, memory=7) - decoder.training_flops(2, 5, memory=0)
    kv = sum(b.cross_attn.kv.weight.numel() for b in decoder.blocks)
    assert with_memory == 6.0 * kv * 2 * 7 + 12.0 * 2 * 32 * (2 * 5 * 7)
