"""The text-to-text task: per-task metrics on known predictions, what it logs after an evaluation (every rank's
rows once), the per-task media tables, task names linked from the data, and a short real fit on a mixture."""

import lightning as L
import pytest

from polyformer.backbone import TransformerConfig
from polyformer.data.text_to_text import MixtureInfo, MixtureTask, TextToTextData
from polyformer.data.tokenizers import byte_level
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.media import MediaRequest, Table
from polyformer.tasks.text_to_text import TextToText, exact_match, task_scores
from polyformer.tasks.translation import DecodingConfig, corpus_scores

TASKS = [("en-fr", "bleu"), ("digits", "exact_match")]
ROWS = [  # (index, hypothesis, reference, task)
    (0, "le billet coûte seize euros .", "le billet coûte seize euros .", 0),
    (1, "il y a deux arbres dans le parc .", "il y a trois arbres dans le parc .", 0),
    (2, "702", "702", 1),
    (3, "71", "17", 1),
    (4, " 5 ", "5", 1),
]


def test_exact_match_and_per_task_scores_on_known_predictions():
    assert exact_match(["a", "b ", "c"], ["a", "b", "d"]) == pytest.approx(200 / 3)
    scores = task_scores(ROWS, TASKS)
    fr = corpus_scores([ROWS[0][1], ROWS[1][1]], [ROWS[0][2], ROWS[1][2]])
    assert scores["en-fr"] == pytest.approx(
        {"exact_match": 50.0, "bleu": fr["bleu"], "chrf": fr["chrf"], "score": fr["bleu"], "count": 2}
    )
    assert scores["digits"] == pytest.approx({"exact_match": 200 / 3, "score": 200 / 3, "count": 3})
    assert task_scores(ROWS[:2], TASKS).keys() == {"en-fr"}  # a task without rows is left out, not scored 0


def task(**kwargs) -> TextToText:
    tok = byte_level()
    t = TextToText(
        TransformerConfig(width=16, depth=1, heads=2, max_len=64),
        vocab_size=tok.vocab_size,
        source_vocab_size=tok.vocab_size,
        decoding=DecodingConfig(beam_size=1, max_len_b=4),
        **kwargs,
    )
    t.set_tokenizers(tok)
    return t


def test_score_logs_per_task_metrics_and_the_means(monkeypatch):
    t = task(task_metrics=TASKS)
    logged = {}
    monkeypatch.setattr(t, "log_dict", lambda values, **kw: logged.update(values))
    t._outputs = [*ROWS, ROWS[2]]  # a row twice (DDP's padded duplicate): counted once
    t._score("val")
    scores = task_scores(ROWS, TASKS)
    assert logged["val/en-fr/bleu"] == pytest.approx(scores["en-fr"]["bleu"])
    assert logged["val/en-fr/exact_match"] == 50.0 and logged["val/digits/exact_match"] == pytest.approx(200 / 3)
    assert "val/digits/bleu" not in logged and "val/en-fr/count" not in logged
    assert logged["val/score"] == pytest.approx((scores["en-fr"]["bleu"] + 200 / 3) / 2)
    assert logged["val/exact_match"] == pytest.approx((50 + 200 / 3) / 2)
    assert t._outputs == []
    tables = {m.key: m for m in t.media({"other": 1}, MediaRequest()) if isinstance(m, Table)}
    assert [r[0] for r in tables["tasks"].rows] == ["en-fr", "digits"]
    assert tables["tasks"].rows[1][:4] == ["digits", "exact_match", pytest.approx(66.67), pytest.approx(66.67)]
    assert [r[0] for r in tables["task_examples"].rows] == ["en-fr", "en-fr", "digits", "digits", "digits"]
    assert tables["task_examples"].rows[3][3] is False


def test_task_names_come_from_the_data():
    t = task()
    info = MixtureInfo(tokenizer=t.tokenizer, vocab_size=t.vocab_size, tasks=tuple(TASKS))
    t.connect_data(info)
    assert t.task_metrics == TASKS and t.hparams["task_metrics"] == [list(x) for x in TASKS]


def test_a_short_fit_scores_every_task(tmp_path, one_thread):
    tasks = [
        MixtureTask("rev", "reverse-words", "reverse: ", train_size=300, val_size=16, test_size=16),
        MixtureTask("fr", "numbers-fr", "to French: ", "bleu", train_size=300, val_size=16, test_size=16),
    ]
    dm = TextToTextData(tasks, bpe_vocab_size=400, num_sentinels=4, batch_size=16)
    model = TextToText(
        TransformerConfig(width=32, depth=1, heads=2, max_len=128, dropout=0.0),
        decoding=DecodingConfig(beam_size=1),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5),
    )
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    (metrics,) = trainer.validate(model, dm, verbose=False)
    assert {"val/rev/exact_match", "val/fr/bleu", "val/fr/chrf", "val/score"} <= metrics.keys()
    assert model.task_metrics == [("rev", "exact_match"), ("fr", "bleu")]
