"""T5's span-corruption objective (Raffel et al. 2020, section 3.1.4; `random_spans_noise_mask` and
`random_spans_helper` in the T5 code): a fraction `noise_density` of a sequence's tokens, in spans of mean length
`mean_span`, is dropped; the input keeps the rest with each dropped span replaced by one sentinel, the target is the
sentinels each followed by the span it stands for. T5's defaults: 15% noise, mean span 3.

Example (spans "for inviting" and "last"):
    original  Thank you for inviting me to your party last week .
    input     Thank you <extra_id_0> me to your party <extra_id_1> week .
    target    <extra_id_0> for inviting <extra_id_1> last

The mask alternates non-noise and noise spans, starting with non-noise and ending with noise, as T5's does: k noise
spans and k non-noise spans, each a uniformly random composition of its token count into k positive parts. The
caller appends eos to both sides (the lengths below count it).
"""

from __future__ import annotations

import random


def span_counts(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens, rounded as T5 rounds them: at least one noise
    token and one kept token, at least one span."""
    if length < 2:
        raise ValueError(f"span corruption needs sequences of >= 2 tokens, got {length}")
    noise = min(max(round(length * noise_density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def corruption_lengths(tokens: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(input length, target length) after corrupting `tokens` tokens, each with its eos: the input keeps the
    non-noise tokens plus a sentinel per span, the target holds the noise tokens plus a sentinel per span."""
    noise, spans = span_counts(tokens, noise_density, mean_span)
    return tokens - noise + spans + 1, noise + spans + 1


def tokens_for_input_length(input_length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> int:
    """The longest raw sequence whose corrupted input (with eos) fits in `input_length` tokens (T5's
    `random_spans_helper`: 512 inputs take 568 raw tokens, and their targets are 114 long). The search starts at 2,
    not at `input_length` as T5's does, so that short inputs (where one span's sentinel and eos outweigh the dropped
    tokens) fit too; the corrupted length never falls as the raw length grows, so the answer is the same otherwise."""
    if corruption_lengths(2, noise_density, mean_span)[0] > input_length:
        raise ValueError(f"span corruption inputs must hold >= 3 tokens, got span_input_length={input_length}")
    tokens = 2
    while corruption_lengths(tokens + 1, noise_density, mean_span)[0] <= input_length:
        tokens += 1
    return tokens


def _composition(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` split into `parts` positive integers, uniformly over all such splits."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def noise_mask(length: int, rng: random.Random, noise_density: float = 0.15, mean_span: float = 3.0) -> list[bool]:
    """True where a token is dropped: non-noise and noise spans alternating, non-noise first."""
    noise, spans = span_counts(length, noise_density, mean_span)
    mask: list[bool] = []
    for keep, drop in zip(_composition(length - noise, spans, rng), _composition(noise, spans, rng)):
        mask += [False] * keep + [True] * drop
    return mask


def corrupt_spans(
    tokens: list[int],
    sentinels: list[int],
    rng: random.Random,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one sequence, without eos. `sentinels` are the ids of <extra_id_0>, ... in order;
    there must be one per span."""
    mask = noise_mask(len(tokens), rng, noise_density, mean_span)
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (token, dropped) in enumerate(zip(tokens, mask)):
        if dropped and (i == 0 or not mask[i - 1]):  # a new span starts: its sentinel goes on both sides
            span += 1
            if span >= len(sentinels):
                raise ValueError(
                    f"span corruption of {len(tokens)} tokens needs more than the {len(sentinels)} sentinel tokens "
                    f"of the tokenizer; add more (data.num_sentinels) or use shorter sequences"
                )
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        (targets if dropped else inputs).append(token)
    return inputs, targets


def restore(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """The original sequence from an (input, target) pair: each sentinel in the input replaced by its span."""
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    is_sentinel = set(sentinels)
    for token in targets:
        if token in is_sentinel:
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    out: list[int] = []
    for token in inputs:
        out += spans.get(token, []) if token in is_sentinel else [token]
    return out
