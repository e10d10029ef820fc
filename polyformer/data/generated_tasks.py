"""Built-in text-to-text tasks that need no network, for the T5-style mixture (`polyformer.data.text_to_text`):

    numbers-fr / numbers-de / numbers-es   the number corpus (`number_corpus.py`), English -> French/German/Spanish
    words-to-digits                        "seven hundred two" -> "702"
    dates                                  "the 5th of March, 1999", "3/5/1999", ... -> "1999-03-05"
    sort-words                             "pear apple fig" -> "apple fig pear"
    reverse-words                          "pear apple fig" -> "fig apple pear"

As in the number corpus, values are held out, not sentences: each number, date or word set belongs to one split by
a seeded hash (`split_of`), so every test example is unseen in training, though its parts are not.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import lru_cache

from babel.dates import get_month_names
from num2words import num2words

from polyformer.data.number_corpus import DAYS_IN_MONTH, Pair, Split, _count, number_corpus, split_of

# Common short nouns: a closed vocabulary, so sorting and reversing test order, not spelling.
WORDS = (  # noqa: SIM905 (one string reads better than 60 quoted words)
    "apple bird boat book bread cake car cat chair cloud coat cup desk dog door egg fig fish flag frog glass "
    "goat hat horse house key kite lamp leaf lemon lion moon mouse nest owl pear pen pig plate rain ring river "
    "road rose salt sheep ship shoe snow sock star stone sun table tent tiger tree wall whale wolf"
).split()


def _words_to_digits(rng: random.Random) -> tuple[str, Pair]:
    n = _count(rng, 999_999)
    return f"n{n}", Pair(num2words(n, lang="en").replace(",", ""), str(n))


def _dates(rng: random.Random) -> tuple[str, Pair]:
    year, month = rng.randint(1900, 2099), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    name = get_month_names("wide", locale="en")[month]
    ordinal = num2words(day, lang="en", to="ordinal_num")
    formats = (
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"the {ordinal} of {name}, {year}",
        f"{name[:3]} {ordinal} {year}",
        f"{month}/{day}/{year}",  # US order, month first
    )
    return f"d{year}-{month}-{day}", Pair(rng.choice(formats), f"{year:04d}-{month:02d}-{day:02d}")


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 6))


def _sort_words(rng: random.Random) -> tuple[str, Pair]:
    words = _word_list(rng)
    return "s" + " ".join(sorted(words)), Pair(" ".join(words), " ".join(sorted(words)))


def _reverse_words(rng: random.Random) -> tuple[str, Pair]:
    words = _word_list(rng)
    return "r" + " ".join(words), Pair(" ".join(words), " ".join(reversed(words)))


GENERATORS: dict[str, Callable[[random.Random], tuple[str, Pair]]] = {
    "words-to-digits": _words_to_digits,
    "dates": _dates,
    "sort-words": _sort_words,
    "reverse-words": _reverse_words,
}
NAMES = (*(f"numbers-{lang}" for lang in ("fr", "de", "es")), *GENERATORS)


@lru_cache(maxsize=32)
def generated_task(name: str, split: Split, size: int, seed: int = 0, held_out: float = 0.1) -> tuple[Pair, ...]:
    """`size` distinct pairs of built-in task `name` (one of NAMES) in `split`; values of different splits are
    disjoint."""
    if name.startswith("numbers-") and name in NAMES:
        return number_corpus(name.removeprefix("numbers-"), split, size, seed)  # type: ignore[arg-type]
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in text-to-text task {name!r}; built-in tasks: {', '.join(NAMES)}")
    rng = random.Random(f"{seed}:{split}:{name}")  # its own stream per split: test does not move with train size
    pairs: dict[str, Pair] = {}
    for _ in range(50 * size):  # bounded: a small value space may not have `size` distinct examples in a split
        key, pair = GENERATORS[name](rng)
        if split_of(key, seed, held_out) == split:
            pairs.setdefault(pair.source, pair)
            if len(pairs) == size:
                break
    return tuple(pairs.values())
