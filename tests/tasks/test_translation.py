"""The translation task: loss formula, metrics, a real Lightning fit that overfits, checkpoints that carry the
tokenizers and load with weights_only=True."""

import lightning as L
import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing.loading import load_task
from polyformer.data.translation import TranslationData
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.translation import DecodingConfig, Translation, corpus_scores, label_smoothed_nll

PAIRS = [  # at least four words: BLEU counts 4-grams
    ("one bird is here", "un oiseau est là"),
    ("two birds are here", "deux oiseaux sont là"),
    ("three books are here", "trois livres sont là"),
    ("four trees are here", "quatre arbres sont là"),
    ("five euros are here", "cinq euros sont là"),
    ("six books are here", "six livres sont là"),
]


def test_label_smoothing_equals_its_formula():
    torch.manual_seed(0)
    logits, pad, eps = torch.randn(3, 5, 11), 0, 0.1
    target = torch.randint(1, 11, (3, 5))
    target[0, 3:] = pad
    target[2, 1:] = pad
    logp = logits.log_softmax(-1)
    per_token = (1 - eps) * -logp.gather(-1, target[..., None])[..., 0] + eps * -logp.mean(-1)
    expected = per_token[target != pad].mean()
    torch.testing.assert_close(label_smoothed_nll(logits, target, eps, pad), expected)
    nll = -logp.gather(-1, target[..., None])[..., 0][target != pad].mean()
    torch.testing.assert_close(label_smoothed_nll(logits, target, 0.0, pad), nll)


def test_bleu_of_a_perfect_hypothesis_is_100():
    refs = ["le billet coûte seize euros.", "j'ai compté cinq oiseaux.", "il y a soixante arbres dans le parc."]
    perfect = corpus_scores(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert "nrefs:1" in perfect["bleu_signature"] and "tok:13a" in perfect["bleu_signature"]
    worse = corpus_scores(["le billet coûte dix-sept euros.", *refs[1:]], refs)
    assert 0 < worse["bleu"] < 100 and 0 < worse["chrf"] < 100


def test_tied_embeddings_need_one_vocabulary():
    task = Translation(TransformerConfig(width=16, depth=1, heads=2), vocab_size=300, source_vocab_size=280)
    with pytest.raises(ValueError, match="tie_encoder_embedding"):
        task.configure_model()
    untied = Translation(TransformerConfig(width=16, depth=1, heads=2), vocab_size=300, source_vocab_size=280,
                         tie_encoder_embedding=False)  # fmt: skip
    untied.configure_model()
    assert untied.source_embed.weight.shape == (280, 16) and untied.target_embed.weight.shape == (300, 16)
    with pytest.raises(ValueError, match="beam_size"):
        DecodingConfig(beam_size=0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model fitted by a real Trainer until it knows six pairs by heart."""
    tmp = tmp_path_factory.mktemp("fit")
    (tmp / "train.tsv").write_text("\n".join(f"{s}\t{t}" for s, t in PAIRS))
    (tmp / "val.tsv").write_text("\n".join(f"{s}\t{t}" for s, t in PAIRS[:3]))
    L.seed_everything(0)
    dm = TranslationData(train_path=str(tmp / "train.tsv"), val_path=str(tmp / "val.tsv"),
                         test_path=str(tmp / "val.tsv"), bpe_vocab_size=300, batch_size=6)  # fmt: skip
    task = Translation(
        TransformerConfig(width=32, depth=1, heads=4, dropout=0.0),
        label_smoothing=0.0,
        decoding=DecodingConfig(beam_size=1),
        optimizer=OptimizerConfig(lr=1e-2, warmup_steps=10, weight_decay=0.0),
    )
    trainer = L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(task, dm)
    evaluator = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    (metrics,) = evaluator.validate(task, dm, verbose=False)
    return trainer, task, metrics, tmp


@pytest.mark.slow  # ~10 s alone, ~30 s on a busy machine
def test_fit_overfits_and_scores_100(fitted):
    _, task, metrics, _ = fitted
    assert task.translate([s for s, _ in PAIRS]) == [t for _, t in PAIRS]
    assert metrics["val/bleu"] == pytest.approx(100.0) and metrics["val/chrf"] == pytest.approx(100.0)
    assert "tok:13a" in task.signatures["bleu"]


@pytest.mark.slow
def test_checkpoint_carries_tokenizers_and_loads_safely(fitted):
    trainer, task, _, tmp = fitted
    path = tmp / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert raw["tokenizers"]["target"] == task.tokenizer.to_json()
    assert "bleu" in raw["sacrebleu_signatures"]
    loaded = load_task(path, expected=Translation)
    assert loaded.tokenizer.to_json() == task.tokenizer.to_json()
    assert loaded.translate([s for s, _ in PAIRS]) == [t for _, t in PAIRS]


def test_translate_without_tokenizer_is_a_clear_error():
    task = Translation(TransformerConfig(width=16, depth=1, heads=2), vocab_size=300, source_vocab_size=300)
    task.configure_model()
    with pytest.raises(ValueError, match="no tokenizer"):
        task.translate(["one"])
