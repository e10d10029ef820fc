"""Parallel text for sequence-to-sequence tasks: the built-in number corpus, local parallel files, or a Hugging Face
hub dataset (`wmt/wmt14` de-en, `Helsinki-NLP/opus_books` ...), tokenized once with a joint BPE (Sennrich et al.
2016) or one tokenizer per side, and served in length-bucketed batches with dynamic padding: fairseq's
`--max-tokens` batching (Ott et al. 2019), so little compute goes to padding.

Batch: source (B, S), target_in (B, T) = bos + target, target_out (B, T) = target + eos, index (B,), and the raw
reference strings (detokenized BLEU is computed against them, never against token ids).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polyformer.data.info import DataInfo
from polyformer.data.loading import EpochSampler, ResumableLoader, eval_loader, world_and_rank
from polyformer.data.number_corpus import number_corpus
from polyformer.data.tokenizers import Tokenizer, pretrained, train_bpe

Item = tuple[int, list[int], list[int], str]  # index, source ids, target ids, reference text


class ParallelDataset(Dataset):
    """Token ids per pair plus the raw target text (the BLEU reference)."""

    def __init__(self, source_ids: list[list[int]], target_ids: list[list[int]], references: list[str]) -> None:
        self.source_ids, self.target_ids, self.references = source_ids, target_ids, references

    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, i: int | list[int]) -> Item | list[Item]:
        if isinstance(i, list):  # a whole batch from BucketBatchSampler
            return [self[j] for j in i]  # type: ignore[misc]
        return i, self.source_ids[i], self.target_ids[i], self.references[i]

    def lengths(self) -> list[int]:
        """Padded cost of a pair: the longer side (+1 for eos / bos)."""
        return [max(len(s), len(t)) + 1 for s, t in zip(self.source_ids, self.target_ids)]


class Collate:
    """Dynamic padding: each batch is padded to its own longest sequence, not to a global maximum."""

    def __init__(self, source_pad: int, target_pad: int, eos_id: int, bos_id: int, source_eos: int) -> None:
        self.source_pad, self.target_pad, self.eos, self.bos, self.source_eos = (
            source_pad, target_pad, eos_id, bos_id, source_eos,
        )  # fmt: skip

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        idx, src, tgt, refs = zip(*items)
        source = pad([[*s, self.source_eos] for s in src], self.source_pad)
        return {
            "source": source,
            "target_in": pad([[self.bos, *t] for t in tgt], self.target_pad),
            "target_out": pad([[*t, self.eos] for t in tgt], self.target_pad),
            "index": torch.tensor(idx),
            "references": list(refs),
        }


def pad(rows: list[list[int]], value: int) -> Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def length_batches(lengths: list[int], order: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Group indices (already sorted by length) into batches of `batch_size` pairs, or, with max_tokens, of as many
    pairs as fit in max_tokens padded tokens (pairs x longest) but never more than `batch_size` (fairseq's
    --batch-size beside --max-tokens): short pairs would otherwise make batches of thousands of rows."""
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        full = len(cur) >= batch_size or (max_tokens is not None and (len(cur) + 1) * new_longest > max_tokens)
        if cur and full:
            batches.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches


class BucketBatchSampler(EpochSampler):
    """Each epoch: shuffle, stable-sort by length (ties stay shuffled), cut into batches, shuffle the batches, and
    give rank r every world-th batch, the same number on every rank (the remainder is dropped). Yields whole batches
    (lists of indices; lists of (index, sample seed) keys inside a ResumableLoader); a DistributedSampler (via
    EpochSampler) so Lightning leaves it in place under DDP."""

    def __init__(
        self, lengths: list[int], batch_size: int, max_tokens: int | None, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(lengths, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.lengths, self.batch_size, self.max_tokens = lengths, batch_size, max_tokens
        # The sorted length sequence is the same every epoch, hence so is the number of batches.
        by_length = sorted(range(len(lengths)), key=lengths.__getitem__)
        self._count = len(length_batches(lengths, by_length, batch_size, max_tokens))

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        order.sort(key=self.lengths.__getitem__)
        batches = length_batches(self.lengths, order, self.batch_size, self.max_tokens)
        if self.shuffle:
            rng.shuffle(batches)
        world, rank = world_and_rank()
        return batches[rank::world][: len(batches) // world]

    def epoch_items(self) -> list[list[int]]:  # EpochSampler skips, and under a ResumableLoader seeds, these
        return self.batches()

    def __len__(self) -> int:
        return self._count // world_and_rank()[0]


def read_local(path: str, source_lang: str, target_lang: str) -> tuple[list[str], list[str]]:
    """`x.jsonl` (fields source_lang/target_lang, "source"/"target", or a "translation" dict), `x.tsv` (source TAB
    target), or a prefix `x` with aligned line files `x.<source_lang>` and `x.<target_lang>`."""
    p = Path(path).expanduser()
    if p.suffix in (".jsonl", ".tsv"):
        if not p.is_file():
            raise FileNotFoundError(f"parallel data file not found: {p}")
        lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if p.suffix == ".tsv":
            rows = [line.split("\t") for line in lines]
            bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
            if bad is not None:
                raise ValueError(
                    f"{p} line {bad + 1} has {len(rows[bad])} tab-separated fields; expected source\\ttarget"
                )
            return [r[0] for r in rows], [r[1] for r in rows]
        src, tgt = [], []
        for i, line in enumerate(lines):
            row = json.loads(line)
            row = row.get("translation", row)
            keys = (source_lang, target_lang) if source_lang in row else ("source", "target")
            if not all(k in row for k in keys):
                raise ValueError(
                    f"{p} line {i + 1} has fields {sorted(row)}; expected {source_lang!r} and {target_lang!r} "
                    f"(or 'source' and 'target', or a 'translation' object holding them)"
                )
            src.append(row[keys[0]])
            tgt.append(row[keys[1]])
        return src, tgt
    files = [p.with_name(f"{p.name}.{lang}") for lang in (source_lang, target_lang)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"parallel data not found: {missing}; give a .jsonl or .tsv file, or a prefix with files "
            f"PREFIX.{source_lang} and PREFIX.{target_lang}"
        )
    src, tgt = (f.read_text(encoding="utf-8").splitlines() for f in files)
    if len(src) != len(tgt):
        raise ValueError(f"{files[0]} has {len(src)} lines but {files[1]} has {len(tgt)}; they must be aligned")
    return src, tgt


def read_hub(
    name: str, subset: str | None, source_lang: str, target_lang: str
) -> dict[str, tuple[list[str], list[str]]]:
    """A hub dataset with rows {"translation": {lang: text}} (the WMT, IWSLT and OPUS layout), split by split."""
    import datasets

    try:
        ds = datasets.load_dataset(name, subset)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ConnectionError(
            f"cannot load hub dataset {name!r} (subset {subset!r}): {str(e).splitlines()[0][:200]}; it needs the "
            f"network once (then it is cached), or give local files with data.train_path/val_path/test_path"
        ) from None
    out = {}
    for split, names in {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}.items():
        hub_split = next((n for n in names if n in ds), None)
        if hub_split is None:
            continue
        rows = ds[hub_split]["translation"]
        if rows and not {source_lang, target_lang} <= rows[0].keys():
            raise ValueError(f"{name} has languages {sorted(rows[0])}, not {source_lang!r} and {target_lang!r}")
        out[split] = ([r[source_lang] for r in rows], [r[target_lang] for r in rows])
    return out


class TranslationData(L.LightningDataModule):
    """Source -> target pairs: `dataset="numbers"` (built-in), local files (`train_path` ...), or a hub name.

    The model's vocabulary sizes are read from here (`vocab_size`, `source_vocab_size`), as are its tokenizers."""

    def __init__(
        self,
        dataset: str = "numbers",  # "numbers" (built-in, no network) or a hub dataset name, e.g. "wmt/wmt14"
        subset: str | None = None,  # hub configuration, e.g. "de-en"
        source_lang: str = "en",
        target_lang: str = "fr",  # numbers: fr, de or es
        train_path: str | None = None,  # local files override `dataset`: .jsonl, .tsv or a PREFIX.<lang> pair
        val_path: str | None = None,
        test_path: str | None = None,
        tokenizer: str | None = None,  # a pretrained tokenizer.json / folder / hub name; None = train a BPE
        bpe_vocab_size: int = 8000,  # of the BPE trained on the training split (the model reads `vocab_size`)
        shared_vocab: bool = True,  # one joint BPE for both sides (lets the model tie all embeddings)
        batch_size: int = 64,  # pairs per batch, or the cap when max_tokens is set
        max_tokens: int | None = None,  # tokens per batch (pairs x longest side), fairseq's --max-tokens
        max_length: int = 256,  # training pairs longer than this (tokens, either side) are dropped
        train_size: int = 20000,  # numbers corpus sizes
        val_size: int = 300,
        test_size: int = 500,
        held_out_fraction: float = 0.01,  # a corpus without validation/test split gives this share of train to each
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if max_tokens is not None and max_tokens < max_length + 1:
            raise ValueError(
                f"data.max_tokens ({max_tokens}) must be > max_length ({max_length}) to fit the longest pair"
            )
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"data.batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None  # target side (and source side when shared)
        self.source_tokenizer: Tokenizer | None = None
        self.datasets: dict[str, ParallelDataset] = {}

    @property
    def vocab_size(self) -> int | None:
        return self.tokenizer.vocab_size if self.tokenizer else None

    @property
    def source_vocab_size(self) -> int | None:
        return self.source_tokenizer.vocab_size if self.source_tokenizer else None

    def info(self) -> DataInfo:
        """Both tokenizers and their vocabulary sizes, known after setup (the BPE is trained there)."""
        return DataInfo(
            tokenizer=self.tokenizer, source_tokenizer=self.source_tokenizer, vocab_size=self.vocab_size,
            source_vocab_size=self.source_vocab_size, eos_id=self.tokenizer.eos_id if self.tokenizer else None,
        )  # fmt: skip

    def raw_splits(self) -> dict[str, tuple[list[str], list[str]]]:
        hp = self.hparams
        if hp.train_path is not None:
            paths = {"train": hp.train_path, "validation": hp.val_path, "test": hp.test_path}
            out = {s: read_local(p, hp.source_lang, hp.target_lang) for s, p in paths.items() if p is not None}
        elif hp.dataset == "numbers":
            if hp.source_lang != "en":
                raise ValueError(
                    f"the numbers corpus translates from English: set data.source_lang=en, not {hp.source_lang!r}"
                )
            sizes = {"train": hp.train_size, "validation": hp.val_size, "test": hp.test_size}
            out = {}
            for split, size in sizes.items():
                pairs = number_corpus(hp.target_lang, split, size, hp.seed)
                out[split] = ([p.source for p in pairs], [p.target for p in pairs])
        else:
            out = read_hub(hp.dataset, hp.subset, hp.source_lang, hp.target_lang)
        return carve_missing_splits(out, hp.held_out_fraction, hp.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        raw = self.raw_splits()
        self.tokenizer, self.source_tokenizer = self.make_tokenizers(*raw["train"])
        for split, (src, tgt) in raw.items():
            s_ids = self.source_tokenizer.encode_batch(src)
            t_ids = self.tokenizer.encode_batch(tgt)
            if split == "train":  # over-long pairs cost memory for little gain; evaluation keeps every pair
                keep = [i for i in range(len(src)) if max(len(s_ids[i]), len(t_ids[i])) < self.hparams.max_length]
                s_ids, t_ids, tgt = [s_ids[i] for i in keep], [t_ids[i] for i in keep], [tgt[i] for i in keep]
            self.datasets[split] = ParallelDataset(s_ids, t_ids, list(tgt))

    def make_tokenizers(self, src: list[str], tgt: list[str]) -> tuple[Tokenizer, Tokenizer]:
        """(target, source) tokenizers. A trained BPE is deterministic, so every DDP rank trains the same one."""
        hp = self.hparams
        if hp.tokenizer is not None:
            tok = pretrained(hp.tokenizer)
            return tok, tok
        if hp.shared_vocab:
            tok = train_bpe([*src, *tgt], hp.bpe_vocab_size)
            return tok, tok
        return train_bpe(tgt, hp.bpe_vocab_size), train_bpe(src, hp.bpe_vocab_size)

    def collate(self) -> Collate:
        t, s = self.tokenizer, self.source_tokenizer
        assert t is not None and s is not None, "setup() first"
        return Collate(s.pad_id, t.pad_id, t.eos_id, t.bos_id, s.eos_id)

    def train_dataloader(self) -> DataLoader:
        ds, hp = self.datasets["train"], self.hparams
        sampler = BucketBatchSampler(ds.lengths(), hp.batch_size, hp.max_tokens, shuffle=True, seed=hp.seed)
        return ResumableLoader(
            ds,
            None,
            sampler=sampler,
            collate_fn=self.collate(),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
        )

    def _eval(self, split: str) -> DataLoader:
        return eval_loader(self.datasets[split], self.hparams.batch_size, collate_fn=self.collate())

    def val_dataloader(self) -> DataLoader:
        return self._eval("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")


def carve_missing_splits(
    splits: dict[str, tuple[list[str], list[str]]], fraction: float, seed: int
) -> dict[str, tuple[list[str], list[str]]]:
    """Corpora with only a training split (e.g. opus_books) lend a seeded `fraction` of it to validation / test."""
    if "train" not in splits:
        raise ValueError("no training split: give data.train_path, or a hub dataset with a 'train' split")
    missing = [s for s in ("validation", "test") if s not in splits]
    if not missing:
        return splits
    src, tgt = splits["train"]
    order = list(range(len(src)))
    random.Random(seed).shuffle(order)
    n = max(1, int(fraction * len(src)))
    out = dict(splits)
    for k, split in enumerate(missing):
        part = order[k * n : (k + 1) * n]
        out[split] = ([src[i] for i in part], [tgt[i] for i in part])
    rest = order[len(missing) * n :]
    out["train"] = ([src[i] for i in rest], [tgt[i] for i in rest])
    return out
