"""Text for language modelling: documents -> tokens (once, cached) -> fixed-length blocks from a memory-mapped array.

The nanoGPT recipe (Karpathy, `data/openwebtext/prepare.py`): every document is tokenized in parallel with
`datasets.map`, followed by end-of-text, concatenated into one flat `uint16`/`uint32` file per split, and training
reads (block + 1)-token windows from it. Documents go to validation by a hash of their text, so the split is
deterministic, needs no shuffling of the corpus, works while streaming, and identical documents can never land on
both sides. Sources: the built-in corpus (the English prose inside CPython, `pydoc_data.topics`), local
`.txt`/`.jsonl`/`.parquet` files or globs, and Hugging Face hub datasets (optionally streamed). Validation data can
instead be given explicitly: a hub dataset's own split (`val_split`) or local files (`val_source`); then every
training document trains.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, IterableDataset

from polyformer.data.info import DataInfo
from polyformer.data.loading import ResumableLoader, eval_loader, world_and_rank
from polyformer.data.tokenizers import Tokenizer, byte_level, pretrained, train_bpe

CACHE_VERSION = 1  # bump when the cache layout or the split rule changes
_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("POLYFORMER_CACHE", Path.home() / ".cache" / "polyformer"))


def explain_read_error(error: Exception, files: list[str]) -> Exception:
    """The user-facing reason behind a `datasets` reading error, or the error itself if it is not a known one."""
    names = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            return ValueError(
                f"data.source: {names} is not UTF-8 text (byte {cause.object[cause.start]:#x} at position "
                f"{cause.start}); convert it first, e.g. iconv -f latin1 -t utf-8"
            )
        if type(cause).__name__ in ("SchemaInferenceError", "EmptyDatasetError"):
            return ValueError(f"data.source: {names} is empty: it holds no text")
        cause = cause.__cause__ or cause.__context__
    return error


def is_validation(text: str, fraction: float) -> bool:
    """Deterministic document-level split: the same text always goes to the same side."""
    return zlib.crc32(text.encode()) % 100_000 < fraction * 100_000


def builtin_documents(min_chars: int = 1000) -> list[str]:
    """CPython's pydoc topics (~465k characters of English), cut into documents of whole paragraphs, so that the
    hash split holds out ~val_fraction of the text rather than a few whole topics."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        current: list[str] = []
        for para in topics[name].split("\n\n"):
            current.append(para)
            if sum(map(len, current)) >= min_chars:
                docs.append("\n\n".join(current))
                current = []
        if current:
            docs.append("\n\n".join(current))
    return docs


class TokenBlocks(Dataset):
    """Non-overlapping (block_size + 1)-token windows of a flat token file: inputs are [:-1], targets [1:]."""

    def __init__(self, path: Path, dtype: str, block_size: int) -> None:
        self.path, self.dtype, self.block_size = path, dtype, block_size
        self.num_tokens = path.stat().st_size // np.dtype(dtype).itemsize
        self._tokens: np.ndarray | None = None  # opened lazily, so the dataset pickles cheaply into workers

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.block_size)

    def __getitem__(self, i: int) -> torch.Tensor:  # (block_size + 1,)
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        start = i * self.block_size
        return torch.from_numpy(self._tokens[start : start + self.block_size + 1].astype(np.int64))


class StreamingBlocks(IterableDataset):
    """Training blocks packed on the fly from a streamed corpus (bigger than the disk): each rank and worker reads
    its own shards. Resuming restarts the stream (the position inside a stream is not checkpointed), and ranks may
    reach the end of a finite stream at different steps: bound the run with trainer.max_steps."""

    def __init__(self, docs: Any, tokenizer: Tokenizer, text_field: str, block_size: int, val_fraction: float) -> None:
        self.docs, self.tokenizer, self.text_field = docs, tokenizer, text_field
        self.block_size, self.val_fraction = block_size, val_fraction

    def __iter__(self) -> Iterator[torch.Tensor]:
        from datasets.distributed import split_dataset_by_node

        # Every (rank, worker) pair reads its own part: whole shards when they divide evenly, else every n-th row.
        world, rank = world_and_rank()
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        docs = self.docs
        if world * workers > 1:
            docs = split_dataset_by_node(docs, rank=rank * workers + worker, world_size=world * workers)
        buffer: list[int] = []
        for row in docs:
            text = row[self.text_field]
            if not text or is_validation(text, self.val_fraction):
                continue
            buffer += self.tokenizer.encode(text) + [self.tokenizer.eos_id]
            while len(buffer) > self.block_size:
                yield torch.tensor(buffer[: self.block_size + 1])
                buffer = buffer[self.block_size :]


class TextDataModule(L.LightningDataModule):
    """Tokenized text in fixed-length blocks. `vocab_size` and `tokenizer` are read by the language model."""

    def __init__(
        self,
        source: str | list[str] = "builtin",  # "builtin", local files/globs (.txt, .jsonl, .parquet), or a hub name
        hub_config: str | None = None,  # e.g. "wikitext-103-raw-v1" for source "wikitext"
        text_field: str = "text",  # column holding the text (.jsonl, parquet, hub)
        train_split: str = "train",
        val_split: str | None = None,  # the hub dataset's own validation split; None = hold out val_fraction
        val_fraction: float = 0.05,  # share of documents held out (by a hash of their text) without val_split/source
        val_source: str | list[str] | None = None,  # local validation files/globs; None = val_split or val_fraction
        streaming: bool = False,  # corpora bigger than the disk: train from the stream, no token cache
        stream_val_documents: int = 2000,  # streaming: how many held-out documents the validation set reads
        tokenizer: str = "bpe",  # "byte", "bpe" (trained on the training split), or a tokenizer.json / hub name
        bpe_vocab_size: int = 4096,
        bpe_training_chars: int = 200_000_000,  # BPE learns from at most this much training text
        block_size: int = 256,  # tokens per training example (the model's context)
        batch_size: int = 32,
        shuffle: bool = True,  # random order of training blocks (reshuffled each epoch); False = sequential
        num_workers: int = 0,
        tokenize_processes: int | None = None,  # datasets.map processes; None = all cores for large corpora
        cache_dir: str | None = None,  # None = $POLYFORMER_CACHE or ~/.cache/polyformer
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"data.block_size and data.batch_size must be >= 1, got {block_size}, {batch_size}")
        if streaming and source == "builtin":
            raise ValueError("data.streaming is for corpora bigger than the disk, not the built-in one: set it false")
        # Local files and the built-in corpus have no named splits, so a val_split there used to be ignored and the
        # validation set was the training set. Refuse it, and take validation files as data.val_source instead (as
        # run_clm's --validation_file or fairseq's valid subset do): a fixed, separately curated validation set is
        # what results are compared on, which a hash hold-out of the training files cannot be.
        if val_split is not None and val_source is not None:
            raise ValueError(
                f"data.val_split ({val_split!r}) and data.val_source ({val_source!r}) both name the validation data; "
                "set only one: val_split for a hub dataset's own split, val_source for local validation files"
            )
        if val_split is not None and self._kind(source) != "hub":
            where = "the built-in corpus" if source == "builtin" else f"local files ({source!r})"
            raise ValueError(
                f"data.val_split={val_split!r} names a hub dataset's split, but data.source is {where}, which has no "
                "splits: validation would be the training data. Give validation files as data.val_source, or drop "
                "data.val_split to hold out data.val_fraction of the documents"
            )
        if val_source is not None and not self._is_local(val_source):
            raise ValueError(
                f"data.val_source must be local files or globs ({', '.join(sorted(_LOCAL_BUILDERS))}), got "
                f"{val_source!r}; for a hub dataset's own validation split set data.val_split instead"
            )
        self.save_hyperparameters()
        self.source, self.hub_config, self.text_field = source, hub_config, text_field
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.val_source = val_source
        self.streaming, self.stream_val_documents = streaming, stream_val_documents
        self.tokenizer_spec, self.bpe_vocab_size = tokenizer, bpe_vocab_size
        self.bpe_training_chars = bpe_training_chars
        self.block_size, self.batch_size, self.shuffle, self.num_workers = block_size, batch_size, shuffle, num_workers
        self.tokenize_processes, self.seed = tokenize_processes, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def info(self) -> DataInfo:
        """The tokenizer (known after setup) and the block size the task's positions must cover."""
        tok = self.tokenizer
        return DataInfo(tokenizer=tok, vocab_size=tok.vocab_size if tok else None, block_size=self.block_size)

    # ---- sources ----------------------------------------------------------------------------------------------
    @staticmethod
    def _kind(source: str | list[str]) -> str:
        if source == "builtin":
            return "builtin"
        sources = [source] if isinstance(source, str) else list(source)
        looks_local = ("/", "./", "../", "~")  # a path, even a missing one, is never a hub name
        if any(
            Path(s).suffix in _LOCAL_BUILDERS or glob.has_magic(s) or os.path.exists(s) or s.startswith(looks_local)
            for s in sources
        ):
            return "local"
        if len(sources) != 1:
            raise ValueError(f"data.source: several hub names are not supported, got {sources}")
        return "hub"

    @classmethod
    def _is_local(cls, source: str | list[str]) -> bool:
        try:
            return cls._kind(source) == "local"
        except ValueError:  # several hub names
            return False

    @property
    def _explicit_val(self) -> bool:
        """Validation comes from its own documents (val_split / val_source), not a hash hold-out of training."""
        return self.val_split is not None or self.val_source is not None

    def _local_files(self, source: str | list[str] | None = None, key: str = "data.source") -> list[str]:
        source = self.source if source is None else source
        sources = [source] if isinstance(source, str) else list(source)
        files: list[str] = []
        for pattern in sources:
            path = Path(pattern).expanduser()
            found = sorted(str(p) for p in path.glob("*") if p.suffix in _LOCAL_BUILDERS) if path.is_dir() else []
            found = found or sorted(glob.glob(str(path), recursive=True))
            if not found:
                raise FileNotFoundError(f"{key}: no files match {pattern!r}")
            files += found
        suffixes = {Path(f).suffix for f in files}
        if len({_LOCAL_BUILDERS.get(s) for s in suffixes}) != 1 or None in {_LOCAL_BUILDERS.get(s) for s in suffixes}:
            raise ValueError(
                f"{key}: files must all be one of {sorted(_LOCAL_BUILDERS)} (one kind at a time), got {suffixes}"
            )
        return files

    def _read_local(self, files: list[str], streaming: bool) -> Any:
        import datasets

        builder = _LOCAL_BUILDERS[Path(files[0]).suffix]
        extra = {"sample_by": "paragraph"} if builder == "text" else {}  # a paragraph is a document
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **extra)
        except Exception as e:  # datasets wraps reading errors in its own: name the cause and the fix
            raise explain_read_error(e, files) from None
        if self.text_field not in (ds.column_names or [self.text_field]):
            raise ValueError(f"data.text_field {self.text_field!r} is not a column of {files}: {ds.column_names}")
        return ds

    def _load_validation(self, streaming: bool = False) -> Any:
        """The explicit validation documents: the files of val_source, or the hub dataset's val_split."""
        if self.val_source is not None:
            return self._read_local(self._local_files(self.val_source, "data.val_source"), streaming)
        assert self.val_split is not None
        return self._load(self.val_split, streaming)

    def _load(self, split: str, streaming: bool = False) -> Any:
        """The documents of one split as a `datasets` dataset (or an IterableDataset when streaming)."""
        import datasets

        kind = self._kind(self.source)
        if kind == "builtin":
            return datasets.Dataset.from_dict({self.text_field: builtin_documents()})
        if kind == "local":
            ds = self._read_local(self._local_files(), streaming)
        else:
            try:
                ds = datasets.load_dataset(self.source, self.hub_config, split=split, streaming=streaming)
            except (ConnectionError, OSError) as e:
                raise ConnectionError(
                    f"cannot load hub dataset {self.source!r} (config {self.hub_config!r}): {str(e).splitlines()[0]}. "
                    "It needs the network (set HF_HUB_OFFLINE=0), or give local files as data.source"
                ) from None
            except ValueError as e:  # unknown split / config: the library's message lists the valid names
                raise ValueError(f"data.source {self.source!r}: {str(e).splitlines()[0]}") from None
        if self.text_field not in (ds.column_names or [self.text_field]):
            raise ValueError(f"data.text_field {self.text_field!r} is not a column of {self.source}: {ds.column_names}")
        return ds

    def _corpus_key(self) -> str:
        kind = self._kind(self.source)
        if kind == "builtin":
            ident: Any = hashlib.sha256("\x00".join(builtin_documents()).encode()).hexdigest()
        elif kind == "local":
            ident = [(str(Path(f).resolve()), os.path.getsize(f), os.path.getmtime(f)) for f in self._local_files()]
        else:
            ident = [self.source, self.hub_config, self.train_split]
        spec = [CACHE_VERSION, kind, ident, self.text_field, self.val_split, self.val_fraction]
        if self.val_source is not None:  # only then: the keys of caches made without val_source stay as they were
            files = self._local_files(self.val_source, "data.val_source")
            spec.append([(str(Path(f).resolve()), os.path.getsize(f), os.path.getmtime(f)) for f in files])
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    # ---- tokenizer --------------------------------------------------------------------------------------------
    def _make_tokenizer(self, train_docs: Any) -> Tokenizer:
        if self.tokenizer_spec == "byte":
            return byte_level()
        if self.tokenizer_spec != "bpe":
            return pretrained(self.tokenizer_spec)

        def texts() -> Iterator[str]:
            seen = 0
            for row in train_docs:
                text = row[self.text_field]
                if text and (self._explicit_val or not is_validation(text, self.val_fraction)):
                    yield text
                    seen += len(text)
                    if seen >= self.bpe_training_chars:
                        return

        return train_bpe(texts(), self.bpe_vocab_size)

    def _tokenizer_path(self, root: Path) -> Path:
        if self.tokenizer_spec == "bpe":  # learned from this corpus: lives with it
            return root / f"bpe-{self.bpe_vocab_size}" / "tokenizer.json"
        name = hashlib.sha256(self.tokenizer_spec.encode()).hexdigest()[:12]
        return root / f"tok-{name}" / "tokenizer.json"

    # ---- preparation ------------------------------------------------------------------------------------------
    def _token_dir(self, tok: Tokenizer) -> Path:
        return self.cache_dir / "text" / self._corpus_key() / f"tokens-{tok.fingerprint}"

    def prepare_data(self) -> None:
        """Runs on one process per node: trains the tokenizer and writes the token files, under a lock, into a
        temporary folder that is renamed into place, so a concurrent run either waits or finds the finished cache."""
        if self.streaming:
            self._get_tokenizer()  # BPE on a streamed corpus learns from its first bpe_training_chars characters
            return
        root = self.cache_dir / "text" / self._corpus_key()
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / ".lock")):
            tok = self._get_tokenizer()
            out = self._token_dir(tok)
            if (out / "meta.json").is_file():
                return
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if not self._explicit_val:
                self._write_tokens(self._load(self.train_split), tok, tmp, split_by_hash=True)
            else:
                self._write_tokens(self._load(self.train_split), tok, tmp, split_by_hash=False, only="train")
                self._write_tokens(self._load_validation(), tok, tmp, split_by_hash=False, only="val")
            meta = {"dtype": self._dtype(tok), "tokenizer": tok.fingerprint, "source": str(self.source)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            tmp.replace(out)

    def _get_tokenizer(self) -> Tokenizer:
        if self.tokenizer is not None:
            return self.tokenizer
        root = self.cache_dir / "text" / self._corpus_key()
        path = self._tokenizer_path(root)
        if path.is_file():
            self.tokenizer = Tokenizer.load(path)
        else:
            docs = self._load(self.train_split, streaming=self.streaming) if self.tokenizer_spec == "bpe" else None
            self.tokenizer = self._make_tokenizer(docs)
            self.tokenizer.save(path)
        return self.tokenizer

    @staticmethod
    def _dtype(tok: Tokenizer) -> str:
        return "uint16" if tok.vocab_size <= 2**16 else "uint32"

    def _write_tokens(self, docs: Any, tok: Tokenizer, out: Path, split_by_hash: bool, only: str = "") -> None:
        field, frac, eos = self.text_field, self.val_fraction, tok.eos_id

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = [t or "" for t in batch[field]]  # a row without text (None) is an empty document
            ids = [[*x, eos] if t else [] for t, x in zip(texts, tok.encode_batch(texts))]  # empty lines: nothing
            val = [bool(t) and is_validation(t, frac) for t in texts] if split_by_hash else [only == "val"] * len(texts)
            return {"ids": ids, "val": val}

        procs = self.tokenize_processes or (os.cpu_count() or 1)
        procs = 1 if len(docs) < 20_000 else procs  # starting processes costs more than small corpora take
        tokens = docs.map(encode, batched=True, num_proc=procs, remove_columns=docs.column_names, desc="tokenizing")
        dtype = self._dtype(tok)
        for split in ("train", "val"):
            if only and split != only:
                continue
            part = tokens.filter(lambda v, s=split: v == (s == "val"), input_columns="val", num_proc=procs)
            with open(out / f"{split}.bin", "wb") as f:
                for batch in part.iter(batch_size=10_000):
                    flat = [i for ids in batch["ids"] for i in ids]
                    f.write(np.asarray(flat, dtype=dtype).tobytes())

    # ---- setup and loaders ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.streaming:
            self._setup_streaming()
            return
        tok = self._get_tokenizer()
        folder = self._token_dir(tok)
        if not (folder / "meta.json").is_file():  # outside a Trainer (tests, scripts) nobody called prepare_data
            self.prepare_data()
        dtype = json.loads((folder / "meta.json").read_text())["dtype"]
        self.tokenizer, self.vocab_size = tok, tok.vocab_size
        self.train_set = TokenBlocks(folder / "train.bin", dtype, self.block_size)
        self.val_set = TokenBlocks(folder / "val.bin", dtype, self.block_size)
        for name, ds in (("training", self.train_set), ("validation", self.val_set)):
            if len(ds) == 0:
                raise ValueError(
                    f"the {name} split has {ds.num_tokens} tokens, fewer than one block of data.block_size + 1 = "
                    f"{self.block_size + 1}; lower data.block_size or use more text (val_fraction for validation)"
                )
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_set) // world < self.batch_size:  # the loader drops partial batches: 0 steps, silently
            raise ValueError(
                f"the training split has {len(self.train_set)} blocks, fewer than one batch "
                f"(data.batch_size={self.batch_size} x {world} processes); lower data.batch_size"
            )

    def _setup_streaming(self) -> None:
        tok = self._get_tokenizer()
        self.tokenizer, self.vocab_size = tok, tok.vocab_size
        stream = self._load(self.train_split, streaming=True)
        # With explicit validation data nothing is held out of training (fraction 0), as without streaming.
        held_out = 0.0 if self._explicit_val else self.val_fraction
        self.train_set = StreamingBlocks(stream, tok, self.text_field, self.block_size, held_out)
        # Validation: the held-out documents among the first ones of the stream (or of val_split / val_source), kept
        # in memory.
        source = self._load_validation(streaming=True) if self._explicit_val else stream
        texts = []
        for row in source:
            text = row[self.text_field]
            if text and (self._explicit_val or is_validation(text, self.val_fraction)):
                texts.append(text)
            if len(texts) >= self.stream_val_documents:
                break
        flat = np.asarray([i for ids in tok.encode_batch(texts) for i in [*ids, tok.eos_id]], dtype=self._dtype(tok))
        folder = self.cache_dir / "text" / self._corpus_key() / f"stream-val-{tok.fingerprint}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".val.{os.getpid()}.tmp"
        flat.tofile(tmp)
        tmp.replace(folder / "val.bin")
        self.val_set = TokenBlocks(folder / "val.bin", self._dtype(tok), self.block_size)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup() first"
        if isinstance(self.train_set, IterableDataset):
            return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers)
        return ResumableLoader(
            self.train_set, self.batch_size, shuffle=self.shuffle, seed=self.seed, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "setup() first"
        return eval_loader(self.val_set, self.batch_size, num_workers=self.num_workers)
