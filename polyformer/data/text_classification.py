"""Text classification data: (text, label) pairs framed as [CLS] tokens [SEP], padded per batch.

Sources:
- `builtin`: which part of the Python reference a paragraph of CPython's pydoc topics comes from (statements,
  expressions, the data model, built-in types): four classes by a fixed map of topic names, paragraphs of at least
  120 characters, duplicates dropped, each class cut to the smallest one's size (166 paragraphs), and a fixed 80/20
  split per class by a hash of the text. Needs no network. The masked-LM preset pre-trains on the whole pydoc corpus,
  these paragraphs among them (their text, never their labels).
- local `.jsonl` / `.csv` files with a text and a label column (`text_field`, `label_field`); validation from
  `val_source` files, else a hash hold-out of `val_fraction`. Labels may be names or integers.
- a hub dataset, `name` or `name/config` (`glue/sst2`: text_field=sentence; `imdb`: split test for validation);
  offline it fails with one line saying so.

The tokenizer: `bpe` is the masked-LM data module's for the built-in corpus (the same cached file, with BERT's special
tokens), so a classifier fine-tuned from that pre-training reads the same ids; otherwise a tokenizer.json, a folder
holding one, or a hub name (a BERT tokenizer for `hf:` weights).
Legend: B batch, T longest sequence in the batch.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polyformer.data.info import DataInfo
from polyformer.data.loading import ResumableLoader, eval_loader
from polyformer.data.tokenizers import BERT_SPECIALS, Tokenizer, pretrained, with_special_tokens

# Which part of the language reference each pydoc topic belongs to.
BUILTIN_CLASSES: dict[str, tuple[str, ...]] = {
    "statements": ("assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del",
                   "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try",
                   "while", "with", "yield"),
    "expressions": ("atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
                    "booleans", "calls", "comparisons", "conversions", "exprlists", "floating", "identifiers",
                    "imaginary", "in", "integers", "lambda", "lists", "dict", "numbers", "operator-summary", "power",
                    "shifting", "slicings", "strings", "subscriptions", "unary"),
    "data model": ("attribute-access", "callable-types", "context-managers", "customization", "numeric-types",
                   "objects", "sequence-types", "specialattrs", "specialnames", "types"),
    "built-in types": ("bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
                       "string-methods", "formatstrings", "truth", "typesfunctions", "typesmapping", "typesmethods",
                       "typesmodules", "typesseq", "typesseq-mutable"),
}  # fmt: skip
_LOCAL = (".jsonl", ".json", ".csv")


def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def builtin_examples(val_share: float = 0.2) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, validation, class names) of the built-in set: balanced classes, a fixed split (module docstring)."""
    from pydoc_data.topics import topics

    owners: dict[str, set[int]] = {}
    for label, names in enumerate(BUILTIN_CLASSES.values()):
        for name in names:
            for para in topics[name].split("\n\n"):
                text = " ".join(para.split())
                if len(text) >= 120:
                    owners.setdefault(text, set()).add(label)
    per_class: list[list[str]] = [[] for _ in BUILTIN_CLASSES]
    for text, labels in owners.items():
        if len(labels) == 1:  # a paragraph under two parts would have two answers
            per_class[next(iter(labels))].append(text)
    size = min(map(len, per_class))
    train, val = [], []
    for label, texts in enumerate(per_class):
        texts = sorted(texts, key=_hash)[:size]  # a fixed, content-defined choice
        held = round(val_share * size)
        val += [(t, label) for t in texts[:held]]
        train += [(t, label) for t in texts[held:]]
    return train, val, list(BUILTIN_CLASSES)


class EncodedTexts(Dataset):
    """[CLS] ids [SEP] (cut to max_length) and the label, per example."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.tensor(self.ids[index]), self.labels[index]


class PadCollate:
    """Examples -> (tokens (B, T), padding mask (B, T) True at real tokens, labels (B,)), padded to the longest."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor]:
        longest = max(len(ids) for ids, _ in examples)
        tokens = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(examples), longest, dtype=torch.bool)
        for row, (ids, _) in enumerate(examples):
            tokens[row, : len(ids)], mask[row, : len(ids)] = ids, True
        return tokens, mask, torch.tensor([label for _, label in examples])


class TextClassificationDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str | list[str] = "builtin",  # "builtin", local .jsonl/.csv files, or a hub name ("glue/sst2")
        text_field: str = "text",
        label_field: str = "label",
        train_split: str = "train",  # hub datasets
        val_split: str = "validation",  # hub datasets: glue/sst2 "validation", imdb "test"
        val_source: str | list[str] | None = None,  # local validation files; None = hold out val_fraction
        val_fraction: float = 0.2,  # local files without val_source: share held out by a hash of the text
        tokenizer: str = "bpe",  # "bpe": the masked-LM preset's BPE of the built-in corpus; or a tokenizer.json / hub
        bpe_vocab_size: int = 2048,  # "bpe": the masked-LM data module's setting
        max_length: int = 128,  # tokens per example, [CLS] and [SEP] included
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,  # None = $POLYFORMER_CACHE or ~/.cache/polyformer
        seed: int = 0,
    ) -> None:
        super().__init__()
        if max_length < 3:
            raise ValueError(f"data.max_length must be >= 3 ([CLS], a token, [SEP]), got {max_length}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.source, self.text_field, self.label_field = source, text_field, label_field
        self.train_split, self.val_split, self.val_source, self.val_fraction = (
            train_split, val_split, val_source, val_fraction,
        )  # fmt: skip
        self.tokenizer_spec, self.bpe_vocab_size, self.max_length = tokenizer, bpe_vocab_size, max_length
        self.batch_size, self.num_workers, self.cache_dir, self.seed = batch_size, num_workers, cache_dir, seed
        self.tokenizer: Tokenizer | None = None
        self.class_names: list[str] | None = None
        self.train_set: EncodedTexts | None = None
        self.val_set: EncodedTexts | None = None

    def info(self) -> DataInfo:
        tok, names = self.tokenizer, self.class_names
        return DataInfo(
            tokenizer=tok, vocab_size=tok.vocab_size if tok else None, block_size=self.max_length,
            num_classes=len(names) if names else None, class_names=tuple(names) if names else None,
        )  # fmt: skip

    # ---- sources ----------------------------------------------------------------------------------------------
    def _is_local(self, source: str | list[str]) -> bool:
        sources = [source] if isinstance(source, str) else source
        return all(Path(s).suffix in _LOCAL or os.path.exists(s) for s in sources)

    def _read_local(self, source: str | list[str], key: str) -> list[dict[str, Any]]:
        import datasets

        files = [source] if isinstance(source, str) else list(source)
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"{key}: no such file {missing[0]!r}")
        builder = "csv" if Path(files[0]).suffix == ".csv" else "json"
        return list(datasets.load_dataset(builder, data_files=files, split="train"))

    def _read_hub(self, split: str) -> list[dict[str, Any]]:
        import datasets

        assert isinstance(self.source, str)
        name, _, config = self.source.partition("/")
        try:
            return list(datasets.load_dataset(name, config or None, split=split))
        except (ConnectionError, OSError) as e:
            raise ConnectionError(
                f"cannot load hub dataset {self.source!r}: {str(e).splitlines()[0]}. It needs the network "
                "(HF_HUB_OFFLINE=0), or give local .jsonl/.csv files with text and label as data.source"
            ) from None
        except ValueError as e:  # an unknown split or config: the library's message names the valid ones
            raise ValueError(f"data.source {self.source!r}: {str(e).splitlines()[0]}") from None

    def _examples(self) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], list[str] | None]:
        if self.source == "builtin":
            return builtin_examples()
        if self._is_local(self.source):
            rows = self._read_local(self.source, "data.source")
            if self.val_source is not None:
                train, val = rows, self._read_local(self.val_source, "data.val_source")
            else:
                held = [_hash(str(r.get(self.text_field))) % 100_000 < self.val_fraction * 100_000 for r in rows]
                train = [r for r, h in zip(rows, held) if not h]
                val = [r for r, h in zip(rows, held) if h]
        else:
            train, val = self._read_hub(self.train_split), self._read_hub(self.val_split)
        for row in train[:1]:
            for key in (self.text_field, self.label_field):
                if key not in row:
                    raise ValueError(f"data: column {key!r} not found in {self.source!r}; columns: {sorted(row)}")
        pairs = lambda rows: [(r[self.text_field], r[self.label_field]) for r in rows]  # noqa: E731
        return pairs(train), pairs(val), None

    def _get_tokenizer(self) -> Tokenizer:
        if self.tokenizer_spec == "bpe":
            from polyformer.data.masked_text import MaskedTextDataModule

            corpus = MaskedTextDataModule(bpe_vocab_size=self.bpe_vocab_size, cache_dir=self.cache_dir)
            return corpus._get_tokenizer()
        return with_special_tokens(pretrained(self.tokenizer_spec), BERT_SPECIALS)

    # ---- setup and loaders ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tok = self.tokenizer = self._get_tokenizer()
        train, val, names = self._examples()
        if names is None:  # names as given: strings sorted; integers 0..K-1 named by themselves
            found = sorted({label for _, label in train + val}, key=lambda x: (str(type(x)), x))
            names = [str(x) for x in found]
            index = {label: i for i, label in enumerate(found)}
            if all(isinstance(x, int) for x in found):
                names = [str(i) for i in range(max(found) + 1)]
                index = {i: i for i in range(max(found) + 1)}
            train = [(t, index[y]) for t, y in train]
            val = [(t, index[y]) for t, y in val]
        self.class_names = names
        vocab = tok.inner.get_vocab(with_added_tokens=True)
        cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
        body = self.max_length - 2

        def encode(pairs: list[tuple[str, int]]) -> EncodedTexts:
            ids = tok.encode_batch([text for text, _ in pairs])
            return EncodedTexts([[cls_id, *x[:body], sep_id] for x in ids], [y for _, y in pairs])

        self.train_set, self.val_set = encode(train), encode(val)
        if len(self.train_set) < self.batch_size or len(self.val_set) == 0:
            raise ValueError(
                f"{len(self.train_set)} training and {len(self.val_set)} validation examples: need at least one batch "
                f"(data.batch_size={self.batch_size}) and one validation example"
            )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None and self.tokenizer is not None, "setup() first"
        return ResumableLoader(
            self.train_set, self.batch_size, shuffle=True, seed=self.seed, num_workers=self.num_workers,
            collate_fn=PadCollate(self.tokenizer.pad_id),
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None and self.tokenizer is not None, "setup() first"
        collate = PadCollate(self.tokenizer.pad_id)
        return eval_loader(self.val_set, self.batch_size, num_workers=self.num_workers, collate_fn=collate)
