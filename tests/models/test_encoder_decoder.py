"""The plain encoder-decoder (`polyformer.models.encoder_decoder`) without Lightning: builds from its config, runs
forward and backward, draws the RNG as the translation task used to (encoder, decoder, target embedding, source
embedding), decodes with its KV cache as it computes in one pass, counts its FLOPs, and refuses bad configs by key."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyformer.backbone import TokenEmbedding, Transformer, TransformerConfig
from polyformer.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

TINY = TransformerConfig(width=32, depth=2, heads=4, dropout=0.0)
PAD = 0


def padded(rows: int, length: int, vocab: int, lengths: list[int]) -> torch.Tensor:
    """Random ids in [1, vocab), right-padded with PAD to each row's length."""
    ids = torch.randint(1, vocab, (rows, length))
    for i, n in enumerate(lengths):
        ids[i, n:] = PAD
    return ids


@pytest.mark.parametrize("tie", [True, False])
def test_a_training_step_reaches_every_parameter_and_lowers_the_loss(tie):
    torch.manual_seed(0)
    vocab, source_vocab = 50, 50 if tie else 30
    model = EncoderDecoder(EncoderDecoderConfig(TINY, vocab, source_vocab, tie_encoder_embedding=tie))
    source = padded(3, 7, source_vocab, [7, 5, 2])
    target = padded(3, 6, vocab, [6, 6, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        logits = model(source, source != PAD, target[:, :-1])
        assert logits.shape == (3, 5, vocab) and torch.isfinite(logits).all()
        loss = F.cross_entropy(logits.flatten(0, 1), target[:, 1:].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert (model.source_embed is model.target_embed) == tie
    assert model.source_embed.weight.shape == (source_vocab, 32)


@pytest.mark.parametrize("tie", [True, False])
def test_built_as_the_task_built_it_encoder_decoder_embeddings(tie):
    """Same keys and the same draws from the RNG as the translation task's old `build()`, so seeded runs and the
    golden curve are unchanged and format-3 checkpoints are the old keys under `model.`."""
    cfg = EncoderDecoderConfig(TINY, vocab_size=60, source_vocab_size=60 if tie else 45, decoder_depth=3,
                               tie_encoder_embedding=tie)  # fmt: skip
    torch.manual_seed(0)
    model = EncoderDecoder(cfg)
    torch.manual_seed(0)
    encoder = Transformer(dataclasses.replace(TINY, causal=False, cross_attention=False))
    decoder = Transformer(dataclasses.replace(TINY, depth=3, causal=True, cross_attention=True))
    target_embed = TokenEmbedding(60, 32, scale=True)
    nn.init.normal_(target_embed.weight, std=32**-0.5)
    source_embed = target_embed
    if not tie:
        source_embed = TokenEmbedding(45, 32, scale=True)
        nn.init.normal_(source_embed.weight, std=32**-0.5)
    expected = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                **{f"decoder.{k}": v for k, v in decoder.state_dict().items()},
                "target_embed.weight": target_embed.weight, "source_embed.weight": source_embed.weight}  # fmt: skip
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=key)
    assert model.cfg is cfg and len(model.decoder.blocks) == 3 and len(model.encoder.blocks) == 2
    assert not model.encoder.cfg.causal and model.decoder.cfg.causal and model.decoder.cfg.cross_attention


def test_decoder_depth_defaults_to_the_backbones():
    assert EncoderDecoderConfig(TINY, 10, 10).decoder_depth == TINY.depth


def test_cached_decoding_equals_one_pass():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(TINY, 50, 50)).eval()
    source = padded(2, 6, 50, [6, 3])
    tokens = torch.randint(1, 50, (2, 9))
    with torch.no_grad():
        mask = source != PAD
        memory = model.encode(source, mask)
        full = model.decode(tokens, memory, mask)
        torch.testing.assert_close(full, model(source, mask, tokens))
        cache = model.new_cache()
        steps = [model.decode(tokens[:, :3], memory, mask, cache=cache)]
        steps += [model.decode(tokens[:, i : i + 1], memory, mask, cache=cache) for i in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_source_padding_is_masked():
    """Padding and what it holds change nothing: the encoder and cross-attention never see masked positions."""
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(TINY, 50, 50)).eval()
    short = torch.randint(1, 50, (1, 4))
    longer = torch.cat([short, torch.tensor([[PAD, 7, 9]])], dim=1)  # junk after the mask's end
    mask = torch.tensor([[True] * 4 + [False] * 3])
    target = torch.randint(1, 50, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(longer, mask, target), model(short, short != PAD, target))


def test_training_flops_are_both_stacks_and_the_tied_projection():
    model = EncoderDecoder(EncoderDecoderConfig(TINY, 50, 50, decoder_depth=3))
    B, S, T = 3, 11, 7
    expected = (model.encoder.training_flops(B, S) + model.decoder.training_flops(B, T, memory=S)
                + 6.0 * 50 * 32 * B * T)  # fmt: skip
    assert model.training_flops(B, S, T) == expected


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(vocab_size=0, source_vocab_size=0), "model.vocab_size"),
        (dict(source_vocab_size=0, tie_encoder_embedding=False), "model.source_vocab_size"),
        (dict(decoder_depth=0), "model.decoder_depth"),
        (dict(source_vocab_size=40), "set model.tie_encoder_embedding=false or data.shared_vocab=true"),
    ],
)
def test_bad_configs_name_the_key(change, key):
    args = dict(backbone=TINY, vocab_size=50, source_vocab_size=50)
    with pytest.raises(ValueError, match=key):
        EncoderDecoderConfig(**{**args, **change})
