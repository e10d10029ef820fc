"""The built-in number corpus: deterministic, several languages, and a test split of genuinely unseen sentences."""

import pytest

from polyformer.data.number_corpus import LANGUAGES, number_corpus, split_of


@pytest.mark.parametrize("lang", LANGUAGES)
def test_splits_are_disjoint_and_deterministic(lang):
    train = number_corpus(lang, "train", 2000, seed=3)
    val = number_corpus(lang, "validation", 200, seed=3)
    test = number_corpus(lang, "test", 200, seed=3)
    assert (len(train), len(val), len(test)) == (2000, 200, 200)
    sources = [{p.source for p in s} for s in (train, val, test)]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    targets = [{p.target for p in s} for s in (train, test)]
    assert not targets[0] & targets[1]  # the test targets are unseen too, not only the sources
    number_corpus.cache_clear()
    assert number_corpus(lang, "test", 200, seed=3) == test  # a fixed seed, not process state


def test_known_translations():
    pairs = {p.source: p.target for p in number_corpus("fr", "train", 5000, seed=0)}
    # French's irregular tens and its "et un" are in the data, written by num2words
    assert any("quatre-vingt" in t for t in pairs.values())
    assert any(" et un " in t for t in pairs.values())
    assert any("janvier" in t for t in pairs.values()) and any("January" in s for s in pairs)
    de = number_corpus("de", "train", 500, seed=0)
    assert any("Vögel" in p.target or "März" in p.target or "Bücher" in p.target for p in de)


def test_held_out_values_never_reach_training():
    # A value's split is a function of the value alone: every sentence about it lands in the same split.
    assert {split_of("n1234", 0, 0.1) for _ in range(3)} == {split_of("n1234", 0, 0.1)}
    splits = [split_of(f"n{n}", 0, 0.1) for n in range(5000)]
    assert 0.07 < splits.count("test") / 5000 < 0.13


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"target_lang": "it"}, "target_lang='it'"), ({"held_out": 0.6}, "held_out"), ({"size": 0}, "size")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        number_corpus(**{"target_lang": "fr", **kwargs})
