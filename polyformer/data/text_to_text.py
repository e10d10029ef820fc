"""T5-style text-to-text (Raffel et al. 2020): several tasks trained at once on one encoder-decoder, each marked by
a text prefix ("translate English to French: "), mixed by per-task sampling rates (section 3.5.2):

    proportional   r_i ∝ min(n_i, K)                 examples-proportional, sizes capped at K (size_limit)
    temperature    r_i ∝ min(n_i, K) ** (1 / T)      T = 1 is proportional; large T tends to equal rates
    fixed          r_i ∝ rate_i                      the rates given per task

A task's examples come from a built-in generator (`polyformer.data.generated_tasks`), local files (.jsonl with
"source"/"target" fields or .tsv), a hub dataset, or span corruption of a text corpus (`span:builtin`, the LM's
built-in prose, or `span:<file.txt>`; `polyformer.data.span_corruption`), T5's unsupervised objective.

Each training epoch draws `samples_per_epoch` examples: draw p picks its task from sample_seed(seed, epoch, p), and
each task walks its own per-epoch permutation, so an example repeats only once its task's pool is used up. The
draws are then cut into length-sorted batches of `batch_size`, the batches shuffled and dealt to ranks in turn:
the same on every rank, a function of (seed, epoch) alone, so resume is exact and ranks take disjoint batches.
Span corruption is applied when an example is loaded, seeded by its sample seed (`SeededSamples`).

Batch: as `TranslationData`'s (source, target_in, target_out, index, references) plus task (B,), the task's number.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from polyformer.data.generated_tasks import NAMES, generated_task
from polyformer.data.info import DataInfo
from polyformer.data.loading import EpochSampler, ResumableLoader, eval_loader, sample_seed, world_and_rank
from polyformer.data.number_corpus import split_of
from polyformer.data.span_corruption import corrupt_spans, corruption_lengths, tokens_for_input_length
from polyformer.data.tokenizers import Tokenizer, pretrained, sentinel_ids, train_bpe, with_sentinels
from polyformer.data.translation import Collate, length_batches, read_local

Sampling = Literal["proportional", "temperature", "fixed"]
SPLITS = ("train", "validation", "test")


@dataclass
class MixtureTask:
    name: str  # metrics are logged as val/<name>/<metric>
    source: str  # a built-in task (generated_tasks.NAMES), span:builtin, span:<file.txt>, a .jsonl/.tsv, or a hub name
    prefix: str = ""  # prepended to every source text, e.g. "translate English to French: "
    metric: Literal["bleu", "exact_match"] = "exact_match"  # the task's headline score (exact match is always shown)
    rate: float | None = None  # sampling="fixed": this task's share (rates are normalised)
    train_size: int = 10000  # built-in tasks: examples per split
    val_size: int = 200
    test_size: int = 300
    val_path: str | None = None  # local files: the validation / test files (else carved from training)
    test_path: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"mixture task name must be non-empty without '/', got {self.name!r}")
        if self.rate is not None and self.rate < 0:
            raise ValueError(f"task {self.name!r}: rate must be >= 0, got {self.rate}")


@dataclass(frozen=True)
class MixtureInfo(DataInfo):
    tasks: tuple[tuple[str, str], ...] = ()  # (name, metric) per task, in task-number order


def mixture_rates(
    sizes: list[int],
    sampling: Sampling,
    temperature: float = 1.0,
    size_limit: int | None = None,
    fixed: list[float | None] | None = None,
) -> list[float]:
    """Each task's probability of being drawn (see the module docstring)."""
    if sampling == "fixed":
        if fixed is None or any(r is None for r in fixed):
            raise ValueError("sampling=fixed needs a rate on every mixture task")
        weights = [float(r) for r in fixed]  # type: ignore[arg-type]
    else:
        if temperature <= 0:
            raise ValueError(f"data.temperature must be > 0, got {temperature}")
        power = 1.0 / temperature if sampling == "temperature" else 1.0
        weights = [min(n, size_limit or n) ** power for n in sizes]
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixture rates must not all be zero (sizes {sizes}, sampling {sampling})")
    return [w / total for w in weights]


class MixtureDataset(Dataset):
    """The examples of every task, one after the other. A pair example is (source ids, target ids, reference); a
    span-corruption example is a raw token window corrupted when read: with the global generators
    (seeded per sample by SeededSamples) in training, with a fixed seed per index in evaluation."""

    def __init__(self, tokenizer: Tokenizer, train: bool, seed: int, noise_density: float, mean_span: float) -> None:
        self.tokenizer, self.train, self.seed = tokenizer, train, seed
        self.noise_density, self.mean_span = noise_density, mean_span
        self.sentinels = sentinel_ids(tokenizer)
        self.examples: list[tuple[list[int], list[int] | None, str]] = []  # target None: a span window
        self.task: list[int] = []
        self.offsets: list[int] = []  # where each task starts

    def add(self, task: int, examples: list[tuple[list[int], list[int] | None, str]]) -> None:
        self.offsets.append(len(self.examples))
        self.examples += examples
        self.task += [task] * len(examples)

    def sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets, [*self.offsets[1:], len(self.examples)])]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int | list[int]) -> Any:
        if isinstance(i, list):  # a whole batch from the mixture sampler
            return [self[j] for j in i]
        source, target, reference = self.examples[i]
        if target is None:
            rng = random.Random(random.getrandbits(64) if self.train else sample_seed(self.seed, 0, i))
            source, target = corrupt_spans(source, self.sentinels, rng, self.noise_density, self.mean_span)
            reference = reference or self.tokenizer.decode(target)
        return i, source, target, reference

    def lengths(self) -> list[int]:
        """Padded cost of an example (the longer side + eos); span windows by their corrupted input length."""
        out = []
        for source, target, _ in self.examples:
            if target is None:
                out.append(corruption_lengths(len(source), self.noise_density, self.mean_span)[0])
            else:
                out.append(max(len(source), len(target)) + 1)
        return out


class MixtureSampler(EpochSampler):
    """Whole batches of an epoch's mixture draws for this rank (see the module docstring)."""

    def __init__(
        self, offsets: list[int], sizes: list[int], rates: list[float], lengths: list[int],
        samples_per_epoch: int, batch_size: int, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(lengths, num_replicas=1, rank=0, shuffle=True, seed=seed)  # type: ignore[arg-type]
        if samples_per_epoch < batch_size:
            raise ValueError(f"data.samples_per_epoch ({samples_per_epoch}) must be >= batch_size ({batch_size})")
        self.offsets, self.sizes, self.lengths = offsets, sizes, lengths
        self.samples_per_epoch, self.batch_size = samples_per_epoch, batch_size
        self.cumulative = [sum(rates[: t + 1]) for t in range(len(rates))]

    def task_of_draw(self, epoch: int, position: int) -> int:
        u = sample_seed(self.seed, epoch, position) / 2**63
        return min(bisect.bisect_right(self.cumulative, u), len(self.sizes) - 1)

    def draws(self, epoch: int) -> list[int]:
        """Dataset indices of the epoch's draws, in draw order."""
        orders: dict[int, list[int]] = {}
        used = [0] * len(self.sizes)
        out = []
        for p in range(self.samples_per_epoch):
            t = self.task_of_draw(epoch, p)
            if t not in orders:
                orders[t] = list(range(self.sizes[t]))
                random.Random(f"{self.seed}:{epoch}:{t}").shuffle(orders[t])
            out.append(self.offsets[t] + orders[t][used[t] % self.sizes[t]])
            used[t] += 1
        return out

    def batches_for(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        draws = self.draws(epoch)
        rng = random.Random(f"{self.seed}:{epoch}:batches")
        order = sorted(range(len(draws)), key=lambda p: self.lengths[draws[p]])  # length buckets: little padding
        batches = [[draws[p] for p in b] for b in length_batches([1] * len(draws), order, self.batch_size, None)]
        batches = batches[: self.samples_per_epoch // self.batch_size]  # full batches only: a fixed count per epoch
        rng.shuffle(batches)
        return batches[rank::world][: len(batches) // world]

    def epoch_items(self) -> list[list[int]]:
        world, rank = world_and_rank()
        return self.batches_for(self.epoch, rank, world)

    def __len__(self) -> int:
        return self.samples_per_epoch // self.batch_size // world_and_rank()[0]


class MixtureCollate(Collate):
    def __init__(self, task_of: list[int], *args: int) -> None:
        super().__init__(*args)
        self.task_of = torch.tensor(task_of)

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        batch = super().__call__(items)
        batch["task"] = self.task_of[batch["index"]]
        return batch


class TextToTextData(L.LightningDataModule):
    """A mixture of text-to-text tasks for the encoder-decoder; validation and test per task (batches carry the
    task's number). The vocabulary is one joint byte-level BPE plus T5's sentinels, or a given tokenizer."""

    def __init__(
        self,
        tasks: list[MixtureTask],
        sampling: Sampling = "proportional",
        temperature: float = 1.0,  # sampling=temperature: T
        size_limit: int | None = None,  # K: a task counts as at most this many examples when rates are computed
        samples_per_epoch: int | None = None,  # draws per training epoch; None = every task's training size summed
        tokenizer: str | None = None,  # a tokenizer.json / folder, or a polyformer .ckpt (its tokenizer); None = BPE
        bpe_vocab_size: int = 2000,
        num_sentinels: int = 100,  # T5's <extra_id_0> ... <extra_id_99>
        span_input_length: int = 64,  # span corruption: tokens of a corrupted input, eos included
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        batch_size: int = 64,
        max_length: int = 256,  # training pairs longer than this (tokens, either side) are dropped
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("data.tasks is empty: give at least one mixture task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture task names must be unique, got {names}")
        if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
            raise ValueError(
                f"data.noise_density must be in (0, 1) and mean_noise_span_length >= 1, got {noise_density}, "
                f"{mean_noise_span_length}"
            )
        self.save_hyperparameters()
        self.tasks = tasks
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, MixtureDataset] = {}

    @property
    def vocab_size(self) -> int | None:
        return self.tokenizer.vocab_size if self.tokenizer else None

    def info(self) -> MixtureInfo:
        tok = self.tokenizer
        return MixtureInfo(
            tokenizer=tok, source_tokenizer=tok, vocab_size=self.vocab_size, source_vocab_size=self.vocab_size,
            eos_id=tok.eos_id if tok else None, tasks=tuple((t.name, t.metric) for t in self.tasks),
        )  # fmt: skip

    # ---- reading ----------------------------------------------------------------------------------------------
    def raw_task(self, task: MixtureTask) -> dict[str, list[tuple[str, str]] | list[str]]:
        """Per split: (source, target) pairs, or for span corruption the documents."""
        seed = self.hparams.seed
        if task.source.startswith("span:"):
            docs = read_documents(task.source.removeprefix("span:"))
            return {s: [d for d in docs if split_of(d, seed, 0.05) == s] for s in SPLITS}
        if task.source in NAMES or "/" not in task.source:  # hub datasets are owner/name
            sizes = dict(zip(SPLITS, (task.train_size, task.val_size, task.test_size)))
            return {
                s: [(p.source, p.target) for p in generated_task(task.source, s, n, seed)]  # type: ignore[arg-type]
                for s, n in sizes.items()
            }
        if task.source.endswith((".jsonl", ".tsv")):
            paths = dict(zip(SPLITS, (task.source, task.val_path, task.test_path)))
            out = {s: list(zip(*read_local(p, "source", "target"))) for s, p in paths.items() if p is not None}
        else:
            out = read_hub_pairs(task.source)
        return carve(out, seed)  # type: ignore[arg-type]

    def make_tokenizer(self, raw: list[dict[str, Any]]) -> Tokenizer:
        hp = self.hparams
        if hp.tokenizer is not None:
            tok = tokenizer_from(hp.tokenizer)
        else:
            texts: list[str] = []
            for task, splits in zip(self.tasks, raw):
                for row in splits["train"]:
                    texts += [row] if isinstance(row, str) else [task.prefix + row[0], row[1]]
            tok = train_bpe(texts, hp.bpe_vocab_size)  # deterministic: every DDP rank trains the same one
        return with_sentinels(tok, hp.num_sentinels)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        raw = [self.raw_task(t) for t in self.tasks]
        tok = self.tokenizer = self.make_tokenizer(raw)
        window = tokens_for_input_length(hp.span_input_length, hp.noise_density, hp.mean_noise_span_length)
        for split in SPLITS:
            ds = MixtureDataset(tok, split == "train", hp.seed, hp.noise_density, hp.mean_noise_span_length)
            for t, (task, splits) in enumerate(zip(self.tasks, raw)):
                rows = splits[split]
                if task.source.startswith("span:"):
                    ds.add(t, [(w, None, "") for w in token_windows(tok, rows, window)])  # type: ignore[arg-type]
                    continue
                src = tok.encode_batch([task.prefix + s for s, _ in rows])
                tgt = tok.encode_batch([r for _, r in rows])
                examples = [(s, g, r) for s, g, (_, r) in zip(src, tgt, rows)]
                if split == "train":  # over-long pairs cost memory for little gain; evaluation keeps every pair
                    examples = [e for e in examples if max(len(e[0]), len(e[1])) < hp.max_length]
                ds.add(t, examples)  # type: ignore[arg-type]
            empty = [task.name for task, n in zip(self.tasks, ds.sizes()) if n == 0]
            if split == "train" and empty:
                raise ValueError(f"mixture tasks with no training examples: {empty}")
            self.datasets[split] = ds

    def rates(self) -> list[float]:
        hp = self.hparams
        sizes = self.datasets["train"].sizes()
        return mixture_rates(sizes, hp.sampling, hp.temperature, hp.size_limit, [t.rate for t in self.tasks])

    # ---- loaders ----------------------------------------------------------------------------------------------
    def collate(self, split: str) -> MixtureCollate:
        tok = self.tokenizer
        assert tok is not None, "setup() first"
        return MixtureCollate(self.datasets[split].task, tok.pad_id, tok.pad_id, tok.eos_id, tok.bos_id, tok.eos_id)

    def train_sampler(self) -> MixtureSampler:
        ds, hp = self.datasets["train"], self.hparams
        per_epoch = hp.samples_per_epoch or len(ds)
        return MixtureSampler(ds.offsets, ds.sizes(), self.rates(), ds.lengths(), per_epoch, hp.batch_size, hp.seed)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return ResumableLoader(
            self.datasets["train"], None, sampler=self.train_sampler(), collate_fn=self.collate("train"),
            num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets["validation"], self.hparams.batch_size, collate_fn=self.collate("validation"))

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets["test"], self.hparams.batch_size, collate_fn=self.collate("test"))


def token_windows(tok: Tokenizer, docs: list[str], length: int) -> list[list[int]]:
    """The documents' tokens, joined by eos, in consecutive windows of `length` (the remainder dropped)."""
    stream: list[int] = []
    for ids in tok.encode_batch(docs):
        stream += [*ids, tok.eos_id]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def read_documents(source: str) -> list[str]:
    """`builtin` (the LM's built-in prose) or a local .txt file (documents separated by blank lines)."""
    if source == "builtin":
        from polyformer.data.text import builtin_documents

        return builtin_documents()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"span corruption text not found: {path}; give span:builtin or span:<file.txt>")
    return [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def read_hub_pairs(name: str) -> dict[str, list[tuple[str, str]]]:
    """A hub dataset with "source" and "target" columns, split by split."""
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown name: one line, not a traceback
        raise ConnectionError(
            f"cannot load hub dataset {name!r} ({type(e).__name__}): it needs the network once (then it is cached); "
            f"or give local .jsonl/.tsv files, or a built-in task ({', '.join(NAMES)})"
        ) from None
    splits = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
    out = {}
    for split, names in splits.items():
        found = next((n for n in names if n in ds), None)
        if found is not None:
            out[split] = list(zip(ds[found]["source"], ds[found]["target"]))
    return out


def carve(splits: dict[str, list[tuple[str, str]]], seed: int, fraction: float = 0.05) -> dict[str, list]:
    """Missing validation / test splits each take a seeded `fraction` of training."""
    if "train" not in splits:
        raise ValueError("a mixture task has no training split")
    out = dict(splits)
    rows = list(splits["train"])
    random.Random(seed).shuffle(rows)
    n = max(1, int(fraction * len(rows)))
    for split in ("validation", "test"):
        if split not in out:
            out[split], rows = rows[:n], rows[n:]
    out["train"] = rows
    return out


def tokenizer_from(path: str) -> Tokenizer:
    """A tokenizer.json, a folder or hub name, or the tokenizer stored in a polyformer checkpoint (to fine-tune on
    the vocabulary a model was pre-trained with)."""
    if not path.endswith(".ckpt"):
        return pretrained(path)
    from polyformer.checkpointing.files import load_checkpoint

    stored = load_checkpoint(path).get("tokenizers")
    if stored is None:
        raise ValueError(f"data.tokenizer={path!r}: the checkpoint holds no tokenizer (not an encoder-decoder run)")
    return Tokenizer.from_json(stored["target"])
