"""T5 span corruption: T5's lengths, 15% noise in spans of mean length 3 over many samples, sentinels in order, and
input + target give the original back; the sentinel specials of the tokenizer."""

import random

import pytest

from polyformer.data.span_corruption import (
    corrupt_spans,
    corruption_lengths,
    noise_mask,
    restore,
    span_counts,
    tokens_for_input_length,
)
from polyformer.data.tokenizers import sentinel_ids, train_bpe, with_sentinels

SENTINELS = list(range(1000, 1100))


def test_lengths_are_t5s():
    # T5's random_spans_helper: 512-token inputs take 568 raw tokens, and their targets are 114 long (with eos).
    assert tokens_for_input_length(512) == 568
    assert corruption_lengths(568) == (512, 114)
    assert span_counts(568) == (85, 28)
    for n in (8, 20, 64, 200):
        raw = tokens_for_input_length(n)
        assert corruption_lengths(raw)[0] <= n < corruption_lengths(raw + 1)[0]


def test_noise_fraction_and_mean_span_over_many_samples():
    rng = random.Random(0)
    noise = total = 0
    spans: list[int] = []
    for _ in range(3000):
        mask = noise_mask(rng.randint(20, 300), rng)
        noise, total = noise + sum(mask), total + len(mask)
        run = 0
        for m in [*mask, False]:
            if m:
                run += 1
            elif run:
                spans.append(run)
                run = 0
        assert not mask[0] and mask[-1]  # non-noise first, noise last (T5's interleaving)
    assert noise / total == pytest.approx(0.15, abs=0.003)
    assert sum(spans) / len(spans) == pytest.approx(3.0, abs=0.1)
    assert min(spans) == 1 and max(spans) > 6  # lengths vary: a random composition, not fixed-size spans


def test_sentinels_in_order_and_the_pair_restores_the_original():
    rng = random.Random(1)
    for _ in range(500):
        tokens = [rng.randrange(900) for _ in range(rng.randint(2, 120))]
        inputs, targets = corrupt_spans(tokens, SENTINELS, rng)
        used_in = [t for t in inputs if t in SENTINELS]
        used_out = [t for t in targets if t in SENTINELS]
        assert used_in == used_out == SENTINELS[: len(used_in)]  # <extra_id_0>, <extra_id_1>, ... on both sides
        assert targets[0] == SENTINELS[0]
        assert restore(inputs, targets, SENTINELS) == tokens
        n_in, n_out = corruption_lengths(len(tokens))
        assert (len(inputs) + 1, len(targets) + 1) == (n_in, n_out)  # + eos, added by the caller


def test_seeded_corruption_repeats_and_too_few_sentinels_is_a_clear_error():
    tokens = list(range(60))
    assert corrupt_spans(tokens, SENTINELS, random.Random(5)) == corrupt_spans(tokens, SENTINELS, random.Random(5))
    assert corrupt_spans(tokens, SENTINELS, random.Random(5)) != corrupt_spans(tokens, SENTINELS, random.Random(6))
    with pytest.raises(ValueError, match="sentinel tokens"):
        corrupt_spans(list(range(100)), SENTINELS[:2], random.Random(0))


def test_tokenizer_sentinels_are_specials_in_order_and_added_once():
    tok = train_bpe(["the cat sat on the mat"] * 20, 300)
    t5 = with_sentinels(tok, 5)
    ids = sentinel_ids(t5)
    assert len(ids) == 5 and ids == sorted(ids) and set(ids) <= set(t5.special_ids)
    assert t5.vocab_size == tok.vocab_size + 5 and sentinel_ids(tok) == []
    assert with_sentinels(t5, 5).to_json() == t5.to_json()  # idempotent: ids stay stable
    assert t5.encode("a <extra_id_3> b").count(ids[3]) == 1
    assert (t5.eos_id, t5.pad_id, t5.bos_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
