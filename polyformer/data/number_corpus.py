"""The built-in parallel corpus: English sentences about counts and dates with every number written out in words,
and their French, German or Spanish translations, generated from `num2words` (numbers, ordinals) and `babel`'s
CLDR data (month names). No network, a fixed seed, and a test split of sentences never seen in training.

Held-out values, not held-out sentences: each number and each date belongs to one split (by a seeded hash), and a
sentence takes its split from the value it mentions. So every test sentence is new, yet its parts ("quatre-vingt",
"mille", "mars") are seen in training under other numbers: the model must compose, not memorise.

The target side is num2words' output as is (e.g. German "einhunderteins Vögel", Spanish "veintiuno pájaros"): a
consistent mapping matters more here than textbook agreement.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from babel.dates import get_month_names
from num2words import num2words

Language = Literal["fr", "de", "es"]
Split = Literal["train", "validation", "test"]
LANGUAGES: tuple[str, ...] = ("fr", "de", "es")

# (English, French, German, Spanish); nouns are masculine in French and Spanish, so numbers need no agreement.
COUNT_TEMPLATES: list[tuple[str, str, str, str]] = [
    ("I counted {n} birds.", "j'ai compté {n} oiseaux.", "ich habe {n} Vögel gezählt.", "he contado {n} pájaros."),
    (
        "the library owns {n} books.",
        "la bibliothèque possède {n} livres.",
        "die Bibliothek besitzt {n} Bücher.",
        "la biblioteca tiene {n} libros.",
    ),
    (
        "the ticket costs {n} euros.",
        "le billet coûte {n} euros.",
        "die Karte kostet {n} Euro.",
        "el billete cuesta {n} euros.",
    ),
    (
        "there are {n} trees in the park.",
        "il y a {n} arbres dans le parc.",
        "im Park stehen {n} Bäume.",
        "hay {n} árboles en el parque.",
    ),
    ("{n}", "{n}", "{n}", "{n}"),
]
DATE_TEMPLATES: list[tuple[str, str, str, str]] = [
    ("on {month} {day}, {year}", "le {day} {month} {year}", "am {day} {month} {year}", "el {day} de {month} de {year}"),
    (
        "she was born on {month} {day}, {year}.",
        "elle est née le {day} {month} {year}.",
        "sie wurde am {day} {month} {year} geboren.",
        "ella nació el {day} de {month} de {year}.",
    ),
]
DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True)
class Pair:
    source: str
    target: str


def split_of(key: str, seed: int, held_out: float) -> Split:
    """Which split a value belongs to: a stable hash, so the split never depends on sampling order."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    if h < held_out:
        return "test"
    if h < 2 * held_out:
        return "validation"
    return "train"


def _day(day: int, lang: str) -> str:
    if lang == "en":
        return num2words(day, lang="en", to="ordinal")
    if lang == "fr":
        return "premier" if day == 1 else num2words(day, lang="fr")
    if lang == "de":  # dative after "am": "am dritten März"
        return num2words(day, lang="de", to="ordinal") + "n"
    return num2words(day, lang="es")


def _year(year: int, lang: str) -> str:
    return num2words(year, lang=lang, to="year")


def _count(rng: random.Random, max_number: int) -> int:
    # Log-uniform over magnitudes, so small and large numbers are equally frequent.
    digits = rng.randint(1, len(str(max_number)))
    return rng.randint(max(2, 10 ** (digits - 1)), min(max_number, 10**digits - 1))


def _sample(rng: random.Random, lang: str, max_number: int) -> tuple[str, Pair]:
    """One (value key, sentence pair); counts and dates equally often."""
    col = 1 + LANGUAGES.index(lang)
    if rng.random() < 0.5:
        n = _count(rng, max_number)
        tpl = rng.choice(COUNT_TEMPLATES)
        return f"n{n}", Pair(tpl[0].format(n=num2words(n, lang="en")), tpl[col].format(n=num2words(n, lang=lang)))
    year, month = rng.randint(1900, 2099), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    tpl = rng.choice(DATE_TEMPLATES)
    en_month, month_name = get_month_names("wide", locale="en")[month], get_month_names("wide", locale=lang)[month]
    en = tpl[0].format(month=en_month, day=_day(day, "en"), year=_year(year, "en"))
    return f"d{year}-{month}-{day}", Pair(
        en, tpl[col].format(month=month_name, day=_day(day, lang), year=_year(year, lang))
    )


@lru_cache(maxsize=8)
def number_corpus(
    target_lang: Language = "fr",
    split: Split = "train",
    size: int = 20000,
    seed: int = 0,
    max_number: int = 99999,
    held_out: float = 0.1,
) -> tuple[Pair, ...]:
    """`size` distinct English -> `target_lang` pairs of one split. Values (numbers, dates) of different splits are
    disjoint, so no test or validation sentence appears in training."""
    if target_lang not in LANGUAGES:
        raise ValueError(
            f"the number corpus translates English into one of {LANGUAGES}, got target_lang={target_lang!r}"
        )
    if not 0.0 < held_out < 0.5:
        raise ValueError(f"held_out must be in (0, 0.5) (the test and validation share of values), got {held_out}")
    if size < 1 or max_number < 10:
        raise ValueError(f"size must be >= 1 and max_number >= 10, got size={size}, max_number={max_number}")
    # Each split draws from its own stream, so the test set does not change when the training size does.
    rng = random.Random(f"{seed}:{split}:{target_lang}")
    pairs: dict[str, Pair] = {}
    for _ in range(50 * size):  # bounded: a tiny max_number may not have `size` distinct sentences in a split
        key, pair = _sample(rng, target_lang, max_number)
        if split_of(key, seed, held_out) == split:
            pairs.setdefault(pair.source, pair)
            if len(pairs) == size:
                break
    return tuple(pairs.values())
