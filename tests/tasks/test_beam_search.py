"""Beam search and greedy decoding (polyformer.decoding) as the translation task uses them."""

import math

import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.data.tokenizers import byte_level
from polyformer.decoding import Decoder, beam_search, sample
from polyformer.tasks.translation import Translation

BOS, EOS, A, B, C, X, Y = 0, 1, 2, 3, 4, 5, 6


def markov_decoder(table: dict[int, dict[int, float]], vocab: int = 7) -> Decoder:
    """A hand-built "model": next-token probabilities depend only on the last token (unlisted rows end the
    sentence; impossible tokens get -inf, so no filler hypothesis can ever finish)."""
    logp = torch.full((vocab, vocab), float("-inf"))
    logp[:, EOS] = 0.0
    for prev, nxt in table.items():
        logp[prev, EOS] = float("-inf")
        for tok, p in nxt.items():
            logp[prev, tok] = math.log(p)

    def forward(tokens, mask, positions, cache):  # (N, t) -> (N, t, V); uncached: it sees the whole prefix
        return logp[tokens]

    return Decoder(forward, list, use_cache=False)


# Greedy takes A (0.6) and then can only reach 0.6 * 0.4 = 0.24; B (0.4) then C (0.9) is 0.36.
TABLE = {BOS: {A: 0.6, B: 0.4}, A: {X: 0.4, Y: 0.3, C: 0.3}, B: {C: 0.9, X: 0.1}, X: {EOS: 1.0}, Y: {EOS: 1.0},
         C: {EOS: 1.0}}  # fmt: skip


def test_beam_search_finds_the_sequence_greedy_misses():
    decoder = markov_decoder(TABLE)
    greedy = sample(decoder, [[BOS]], max_new_tokens=5, temperature=0.0, eos_id=EOS)
    assert greedy == [[A, X]]
    beam = beam_search(decoder, 1, BOS, EOS, beam_size=2, max_len=5, length_penalty=0.0)
    assert beam == [[B, C]]  # log 0.36 > log 0.24
    assert beam_search(decoder, 1, BOS, EOS, beam_size=1, max_len=5, length_penalty=0.0) == greedy


def test_unlikely_early_ends_do_not_stop_the_search():
    # t=2 candidates: A C 0.54, B D 0.36, A eos 0.06, B eos 0.04: the two ends rank below both live beams.
    table = {BOS: {A: 0.6, B: 0.4}, A: {C: 0.9, EOS: 0.1}, B: {X: 0.9, EOS: 0.1}}
    decoder = markov_decoder(table)
    assert beam_search(decoder, 1, BOS, EOS, beam_size=2, max_len=6, length_penalty=0.0) == [[A, C]]


def test_length_penalty_prefers_longer_hypotheses():
    # Stop now with 0.55, or go on with 0.45 * 1.0: alpha = 0 keeps the short one, a large alpha the long one.
    table = {BOS: {A: 1.0}, A: {EOS: 0.55, B: 0.45}, B: {C: 1.0}, C: {EOS: 1.0}}
    decoder = markov_decoder(table)
    assert beam_search(decoder, 1, BOS, EOS, beam_size=2, max_len=6, length_penalty=0.0) == [[A]]
    assert beam_search(decoder, 1, BOS, EOS, beam_size=2, max_len=6, length_penalty=2.0) == [[A, B, C]]


@pytest.fixture(scope="module")
def model() -> Translation:
    torch.manual_seed(0)
    tok = byte_level()
    task = Translation(TransformerConfig(width=32, depth=2, heads=4, dropout=0.0), vocab_size=tok.vocab_size,
                       source_vocab_size=tok.vocab_size)  # fmt: skip
    task.set_tokenizers(tok)  # every size given: the model exists already, no data module needed
    with torch.no_grad():  # a peaked random model whose eos logit is 0: decodes run long, ties are unlikely
        task.model.target_embed.weight.mul_(8)[tok.eos_id] = 0.0
    return task.eval()


def padded_sources(task: Translation, lines: list[str]) -> torch.Tensor:
    tok = task.source_tokenizer
    ids = [[*tok.encode(s), tok.eos_id] for s in lines]
    out = torch.full((len(ids), max(map(len, ids))), tok.pad_id)
    for i, r in enumerate(ids):
        out[i, : len(r)] = torch.tensor(r)
    return out


LINES = ["one hundred", "seven", "twenty-two thousand and three"]


@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_equals_uncached(model, beam):
    src = padded_sources(model, LINES)
    cached = model.generate(src, beam_size=beam, use_cache=True)
    assert cached == model.generate(src, beam_size=beam, use_cache=False)
    assert max(map(len, cached)) > 3  # not a trivial immediate end of sentence


def test_beam_one_equals_greedy_on_a_model(model):
    src = padded_sources(model, LINES)
    greedy = model.generate(src, beam_size=1)
    assert greedy == model.generate(src, beam_size=1, length_penalty=0.0)
    memory, mask = model.encode(src)
    max_len = (mask.sum(-1) * model.decoding.max_len_a + model.decoding.max_len_b).long()
    tok = model.tokenizer
    beam = beam_search(model._decoder(memory, mask, True), len(LINES), tok.bos_id, tok.eos_id, 1, max_len, 0.6)
    assert beam == greedy


@pytest.mark.parametrize("beam", [1, 2])
def test_padding_does_not_change_a_translation(model, beam):
    alone = [model.generate(padded_sources(model, [line]), beam_size=beam)[0] for line in LINES]
    assert model.generate(padded_sources(model, LINES), beam_size=beam) == alone


def test_max_length_follows_the_source(model):
    model.decoding.max_len_a, model.decoding.max_len_b = 0.0, 2
    try:
        out = model.generate(padded_sources(model, LINES), beam_size=2)
    finally:
        model.decoding.max_len_a, model.decoding.max_len_b = 1.5, 10
    assert all(len(o) <= 2 for o in out)
