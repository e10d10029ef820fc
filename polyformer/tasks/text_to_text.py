"""T5-style text-to-text (Raffel et al. 2020): the translation task's model, loss and decoding, scored per task of a
mixture (`polyformer.data.text_to_text.TextToTextData`, whose batches carry each row's task number).

Logged after each evaluation, over every rank's rows (each sample once):
    <stage>/<task>/exact_match   % of hypotheses equal to the reference (whitespace-trimmed), every task
    <stage>/<task>/bleu, chrf    sacreBLEU corpus scores, tasks whose metric is "bleu"
    <stage>/score                the mean over tasks of each task's headline metric (BLEU or exact match)
    <stage>/exact_match          the mean over tasks of exact match
`media()` adds a table of those scores per task and a few decoded examples of each task.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from polyformer.backbone import TransformerConfig
from polyformer.data.info import DataInfo
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.media import Media, MediaRequest, Table
from polyformer.tasks.translation import DecodingConfig, Translation, corpus_scores


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """Percent of hypotheses equal to their reference after trimming whitespace."""
    if not references:
        return 0.0
    return 100.0 * sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)


def task_scores(rows: list[tuple[int, str, str, int]], tasks: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Per task name: exact_match, (bleu, chrf for metric "bleu" tasks), count, and `score`, the headline metric.
    `rows` are (index, hypothesis, reference, task number); tasks with no rows are left out."""
    out: dict[str, dict[str, float]] = {}
    for number, (name, metric) in enumerate(tasks):
        hyps = [h for _, h, _, t in rows if t == number]
        refs = [r for _, _, r, t in rows if t == number]
        if not refs:
            continue
        scores = {"exact_match": exact_match(hyps, refs), "count": float(len(refs))}
        if metric == "bleu":
            corpus = corpus_scores(hyps, refs)
            scores |= {"bleu": corpus["bleu"], "chrf": corpus["chrf"]}
        scores["score"] = scores[metric]
        out[name] = scores
    return out


class TextToText(Translation):
    def __init__(
        self,
        backbone: TransformerConfig | None = None,
        decoder_depth: int | None = None,
        vocab_size: int | None = None,
        source_vocab_size: int | None = None,
        tie_encoder_embedding: bool = True,
        label_smoothing: float = 0.1,
        decoding: DecodingConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,  # e.g. a span-corruption pre-training checkpoint (same vocabulary)
        task_metrics: list[tuple[str, str]] | None = None,  # (name, metric) per task number; linked from the data
    ) -> None:
        super().__init__(
            backbone, decoder_depth, vocab_size, source_vocab_size, tie_encoder_embedding, label_smoothing,
            decoding, optimizer, compile, activation_checkpointing, init_from,
        )  # fmt: skip
        self.save_hyperparameters()
        self.task_metrics = [tuple(t) for t in task_metrics] if task_metrics is not None else None
        self.task_results: dict[str, dict[str, float]] = {}  # of the last evaluation, for media()
        self.examples: list[list[Any]] = []  # [task, reference, hypothesis, exact] rows of the last evaluation

    def connect_data(self, info: DataInfo) -> None:
        super().connect_data(info)
        tasks = getattr(info, "tasks", None)  # a MixtureInfo; plain parallel data is one task
        self.link("task_metrics", [list(t) for t in tasks] if tasks else None)
        if self.task_metrics is not None:
            self.task_metrics = [tuple(t) for t in self.task_metrics]

    def _record(self, batch: dict[str, Any], hypotheses: list[str]) -> None:
        task = batch["task"].tolist() if "task" in batch else [0] * len(hypotheses)
        self._outputs += zip(batch["index"].tolist(), hypotheses, batch["references"], task)

    def _score(self, stage: str) -> None:
        rows = self._gathered_outputs()
        if not rows:
            return
        tasks = self.task_metrics or [("text", "bleu")]
        results = task_scores(rows, tasks)  # type: ignore[arg-type]
        logged = {f"{stage}/{name}/{key}": v for name, s in results.items() for key, v in s.items() if key != "count"}
        logged[f"{stage}/score"] = sum(s["score"] for s in results.values()) / len(results)
        logged[f"{stage}/exact_match"] = sum(s["exact_match"] for s in results.values()) / len(results)
        self.log_dict(logged, rank_zero_only=False)  # every rank computed the same numbers from the same rows
        self.task_results = results
        self.examples = []
        for number, (name, _) in enumerate(tasks):
            mine = [r for r in rows if r[3] == number][:3]
            self.examples += [[name, ref, hyp, hyp.strip() == ref.strip()] for _, hyp, ref, _ in mine]
        summary = ", ".join(f"{name} {s['score']:.1f}" for name, s in results.items())
        rank_zero_info(f"{stage}: score {logged[f'{stage}/score']:.2f} ({summary}) on {len(rows)} examples")

    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """The translation tables for the first rows of `batch`, then "tasks" (each task's scores of the last
        evaluation) and "task_examples" (the first hypotheses of each task in that evaluation)."""
        items = super().media(batch, request)
        items = [i for i in items if not (isinstance(i, Table) and i.key == "sacrebleu")]  # per task below instead
        if self.task_results:
            columns = ["task", "metric", "score", "exact_match", "bleu", "chrf", "examples"]
            metric = dict(self.task_metrics or [])
            rows = [
                [name, metric.get(name, "bleu"), *(round(s[k], 2) if k in s else None
                                                   for k in ("score", "exact_match", "bleu", "chrf")), int(s["count"])]
                for name, s in self.task_results.items()
            ]  # fmt: skip
            items.append(Table("tasks", columns, rows))
        if self.examples:
            items.append(Table("task_examples", ["task", "reference", "hypothesis", "exact"], self.examples))
        return items
