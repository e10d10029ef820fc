"""Tokenizers for every text task, on Hugging Face `tokenizers`: raw bytes (no training), byte-level BPE trained on
the training split (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al. 2019), or a pretrained
`tokenizer.json` (a local file/folder or a hub name such as "gpt2").

Every tokenizer has pad, bos and eos ids (one end-of-text token may serve as both bos and eos, as in GPT-2); a
tokenizer that lacks them gets them added. Serialised as the plain `tokenizer.json` text, so `save()` output loads in
any Hugging Face tool and a checkpoint can carry the tokenizer as one string.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
# Names that pretrained tokenizers use for their special tokens, most specific first. CLIP has both a start and an
# end token (OpenAI/Hugging Face: <|startoftext|> <|endoftext|>; open_clip: <start_of_text> <end_of_text>): its start
# token must win over <|endoftext|>, which is bos only as the last resort, for GPT-2 style single-token vocabularies.
_EOS_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "<end_of_text>", "[SEP]")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<start_of_text>", "[CLS]", END_OF_TEXT)
_PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|padding|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (so BPE never sees whitespace or control bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        self.inner = inner
        vocab = inner.get_vocab(with_added_tokens=True)
        eos = next((t for t in _EOS_NAMES if t in vocab), None)
        bos = next((t for t in _BOS_NAMES if t in vocab), None)
        if eos is None:  # no end-of-text at all: add GPT-2's, which then also serves as bos
            inner.add_special_tokens([END_OF_TEXT])
            eos = END_OF_TEXT
        if not any(t in vocab for t in _PAD_NAMES):
            # Padding gets its own id (not eos): tasks that ignore pad in the loss must still learn to emit eos.
            inner.add_special_tokens([PAD])
        vocab = inner.get_vocab(with_added_tokens=True)
        self.eos_id = vocab[eos]
        self.bos_id = vocab[bos] if bos is not None else self.eos_id
        self.pad_id = vocab[next(t for t in _PAD_NAMES if t in vocab)]
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        """Ids of all special (added) tokens: never part of text, never to be sampled except eos."""
        return sorted(i for i, t in self.inner.get_added_tokens_decoder().items() if t.special)

    def token_bytes(self) -> list[int]:
        """UTF-8 length of each token's text (0 for special tokens): bits per byte = nats / (ln 2 * bytes)."""
        special = set(self.special_ids)
        if isinstance(self.inner.decoder, decoders.ByteLevel):  # each character of a byte-level token is one byte
            return [0 if i in special else len(self.inner.id_to_token(i) or "") for i in range(self.vocab_size)]
        return [0 if i in special else len(self.inner.decode([i]).encode()) for i in range(self.vocab_size)]

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids = self.inner.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def encode_batch(self, texts: list[str], add_special: bool = False) -> list[list[int]]:
        encs = self.inner.encode_batch_fast(list(texts), add_special_tokens=False)
        if add_special:
            return [[self.bos_id, *e.ids, self.eos_id] for e in encs]
        return [e.ids for e in encs]

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return self.inner.decode_batch([list(ids) for ids in batch], skip_special_tokens=True)

    def to_json(self) -> str:
        return self.inner.to_str()

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_str(s))

    @cached_property
    def fingerprint(self) -> str:
        """Short content hash: keys token caches, so a different tokenizer never reuses another's tokens."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}; give a tokenizer.json or a folder holding one")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def _byte_level_shell(model: models.Model) -> tokenizers.Tokenizer:
    inner = tokenizers.Tokenizer(model)
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    return inner


def byte_level() -> Tokenizer:
    """256 byte tokens (id = byte value), then end-of-text (256) and pad (257). Needs no training."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    inner = _byte_level_shell(models.BPE(vocab=vocab, merges=[]))
    # The GPT-2 split regex only matters for merges; without merges it is wasted work.
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.add_special_tokens([END_OF_TEXT, PAD])
    return Tokenizer(inner)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE learned from `texts` (every byte is in the alphabet, so no input is ever unknown)."""
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size for byte-level BPE must be >= 258 (256 bytes + 2 specials), got {vocab_size}")
    inner = _byte_level_shell(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(inner)


def sentinel(i: int) -> str:
    """T5's i-th sentinel token (Raffel et al. 2020): marks the i-th dropped span in span corruption."""
    return f"<extra_id_{i}>"


def with_sentinels(tokenizer: Tokenizer, count: int) -> Tokenizer:
    """A copy of `tokenizer` with `count` sentinel specials added (those it already has are kept, so adding them to
    a tokenizer that has them changes nothing and ids stay stable)."""
    inner = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    inner.add_special_tokens([sentinel(i) for i in range(count)])
    return Tokenizer(inner)


def sentinel_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... in order, as many as the tokenizer has."""
    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
    ids: list[int] = []
    while sentinel(len(ids)) in vocab:
        ids.append(vocab[sentinel(len(ids))])
    return ids


def pretrained(name_or_path: str) -> Tokenizer:
    """A `tokenizer.json` file, a folder holding one, or a hub repository name (downloaded once, then cached)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return Tokenizer.load(path)
    if name_or_path.endswith(".json") or name_or_path.startswith((".", "/", "~")):  # meant as a path, not a hub name
        raise FileNotFoundError(f"tokenizer path not found: {path}; give an existing tokenizer.json or folder")
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(name_or_path, "tokenizer.json")
    except Exception as e:  # offline mode, no network, unknown repo: all mean "cannot get it from the hub"
        raise ConnectionError(
            f"cannot fetch tokenizer {name_or_path!r} from the Hugging Face hub ({type(e).__name__}); it needs the "
            f"network once (then it is cached), or give a local tokenizer.json / folder path instead"
        ) from None
    return Tokenizer.load(file)


BERT_SPECIALS = ("[CLS]", "[SEP]", "[MASK]")  # what a masked-LM / classification encoder reads besides pad


def with_special_tokens(tokenizer: Tokenizer, names: Iterable[str]) -> Tokenizer:
    """A copy of `tokenizer` with those of `names` it lacks added as special tokens (ids after its vocabulary, so
    the ids it has keep their meaning); a pretrained BERT tokenizer already has them and comes back unchanged."""
    inner = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    vocab = inner.get_vocab(with_added_tokens=True)
    missing = [n for n in names if n not in vocab]
    if missing:
        inner.add_special_tokens(missing)
    return Tokenizer(inner)


def word_starts(tokenizer: Tokenizer) -> list[bool]:
    """For each id, whether its token begins a word (whole-word masking keeps a word's pieces together): byte-level
    BPE marks a word's first piece with its leading space or newline, WordPiece its continuations with "##",
    SentencePiece its first piece with "▁". Special tokens stand alone. Other tokenizers: every token a word."""
    inner, special = tokenizer.inner, set(tokenizer.special_ids)
    tokens = [inner.id_to_token(i) or "" for i in range(tokenizer.vocab_size)]
    if isinstance(inner.model, models.WordPiece):
        prefix = inner.model.continuing_subword_prefix
        return [i in special or not t.startswith(prefix) for i, t in enumerate(tokens)]
    marks = ("\u0120", "\u010a", "\u0109") if isinstance(inner.decoder, decoders.ByteLevel) else ("\u2581",)
    if not isinstance(inner.decoder, (decoders.ByteLevel, decoders.Metaspace)):
        return [True] * len(tokens)
    return [i in special or t.startswith(marks) for i, t in enumerate(tokens)]


def decode_rows(tokenizer: Tokenizer, ids: Tensor) -> list[str]:
    """Padded token rows (N, T) to text for display: special tokens dropped, each row cut at its first end-of-text
    after some text (what follows is padding, whatever id the collate function padded with)."""
    special, eos = set(tokenizer.special_ids), tokenizer.eos_id
    rows = []
    for row in ids.tolist():
        kept: list[int] = []
        for i in row:
            if i == eos and kept:
                break
            if i not in special:
                kept.append(i)
        rows.append(kept)
    return tokenizer.decode_batch(rows)
