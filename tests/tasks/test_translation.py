"""The translation task: loss formula, metrics, sizes and tokenizers from the data, media, a real Lightning fit that
overfits, checkpoints that carry the tokenizers and load with weights_only=True."""

import lightning as L
import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing.loading import load_task
from polyformer.data.info import DataInfo
from polyformer.data.tokenizers import byte_level, decode_rows
from polyformer.data.translation import TranslationData
from polyformer.models.encoder_decoder import EncoderDecoder
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.media import MediaRequest, Table
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
    with pytest.raises(ValueError, match="set model.tie_encoder_embedding=false or data.shared_vocab=true"):
        Translation(TransformerConfig(width=16, depth=1, heads=2), vocab_size=300, source_vocab_size=280)
    untied = Translation(TransformerConfig(width=16, depth=1, heads=2), vocab_size=300, source_vocab_size=280,
                         tie_encoder_embedding=False)  # fmt: skip
    model = untied.model
    assert model.source_embed.weight.shape == (280, 16) and model.target_embed.weight.shape == (300, 16)
    with pytest.raises(ValueError, match="beam_size"):
        DecodingConfig(beam_size=0)


def write_pairs(folder) -> dict[str, str]:
    (folder / "train.tsv").write_text("\n".join(f"{s}\t{t}" for s, t in PAIRS))
    (folder / "val.tsv").write_text("\n".join(f"{s}\t{t}" for s, t in PAIRS[:3]))
    return {"train_path": str(folder / "train.tsv"), "val_path": str(folder / "val.tsv"),
            "test_path": str(folder / "val.tsv")}  # fmt: skip


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> TranslationData:
    dm = TranslationData(**write_pairs(tmp_path_factory.mktemp("pairs")), bpe_vocab_size=300, batch_size=6)
    dm.setup("fit")
    return dm


def test_sizes_and_tokenizers_come_from_the_data_info(pairs_data):
    task = Translation(TransformerConfig(width=16, depth=1, heads=2))
    assert task.model is None and task.missing_sizes() == ["vocab_size", "source_vocab_size"]
    with pytest.raises(ValueError, match="--model.vocab_size, --model.source_vocab_size"):
        task.configure_model()  # no Trainer, no data: the error names the flags to set
    info = pairs_data.info()
    task.connect_data(info)
    task.configure_model()
    assert isinstance(task.model, EncoderDecoder) and task.model.cfg.vocab_size == info.vocab_size
    assert task.hparams["vocab_size"] == task.hparams["source_vocab_size"] == info.vocab_size
    assert task.tokenizer is pairs_data.tokenizer and task.source_tokenizer is pairs_data.source_tokenizer
    # Checkpoint format 3: the task's old keys under `model.` (the tied source embedding is listed as before).
    keys = list(task.state_dict())
    assert all(k.startswith("model.") for k in keys), keys
    assert {"model.target_embed.weight", "model.source_embed.weight"} <= set(keys)
    assert keys[0].startswith("model.encoder.") and keys[-2:] == ["model.target_embed.weight",
                                                                  "model.source_embed.weight"]  # fmt: skip

    # A tokenizer that came with a checkpoint must be the data's.
    other = Translation(TransformerConfig(width=16, depth=1, heads=2))
    other.set_tokenizers(byte_level())
    with pytest.raises(ValueError, match="tokenizer differs"):
        other.connect_data(info)
    # Sizes the config gives are kept; the data only fills the unset ones.
    given = Translation(TransformerConfig(width=16, depth=1, heads=2), vocab_size=info.vocab_size,
                        source_vocab_size=info.vocab_size)  # fmt: skip
    given.connect_data(DataInfo(tokenizer=pairs_data.tokenizer))
    assert given.source_tokenizer is pairs_data.tokenizer  # no source tokenizer: one joint vocabulary


def test_media_shows_translations_with_sentence_bleu_and_the_signature(pairs_data):
    torch.manual_seed(0)
    task = Translation(TransformerConfig(width=16, depth=1, heads=2, dropout=0.0),
                       decoding=DecodingConfig(beam_size=1, max_len_b=3))  # fmt: skip
    task.connect_data(pairs_data.info())
    task.configure_model()
    batch = next(iter(pairs_data.val_dataloader()))
    batch = {k: v[:2] for k, v in batch.items()}  # what the media callback hands over: the first rows
    (table,) = task.media(batch, MediaRequest(num_samples=5))
    assert isinstance(table, Table) and table.key == "translations"
    assert table.columns == ["source", "reference", "hypothesis", "sentence_bleu"]
    assert [row[0] for row in table.rows] == decode_rows(pairs_data.source_tokenizer, batch["source"])
    assert [row[1] for row in table.rows] == batch["references"]
    hyps = task.tokenizer.decode_batch(task.generate(batch["source"]))
    assert [row[2] for row in table.rows] == hyps and all(0 <= row[3] <= 100 for row in table.rows)
    assert task.training  # left as it was (a fresh task trains), though decoded in eval mode

    # After a scored evaluation: the corpus scores with their signatures.
    task.scores = {"bleu": 12.345, "chrf": 40.0}
    task.signatures = {"bleu": "nrefs:1|case:mixed", "chrf": "nrefs:1|case:mixed|nc:6"}
    translations, signature = task.media(batch, MediaRequest(num_samples=1))
    assert len(translations.rows) == 1
    assert signature.key == "sacrebleu" and signature.columns == ["metric", "corpus_score", "signature"]
    assert signature.rows == [["bleu", 12.35, "nrefs:1|case:mixed"], ["chrf", 40.0, "nrefs:1|case:mixed|nc:6"]]
    task.scores = {}  # a signature from a checkpoint, no score yet
    assert task.media(batch, MediaRequest())[1].rows[0] == ["bleu", None, "nrefs:1|case:mixed"]
    task.tokenizer = None
    assert task.media(batch, MediaRequest()) == []  # nothing to decode with


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model fitted by a real Trainer until it knows six pairs by heart."""
    tmp = tmp_path_factory.mktemp("fit")
    paths = write_pairs(tmp)
    L.seed_everything(0)
    dm = TranslationData(**paths, bpe_vocab_size=300, batch_size=6)
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
    with pytest.raises(ValueError, match="no tokenizer"):
        task.translate(["one"])
    with pytest.raises(ValueError, match="no tokenizer"):
        task.generate(torch.ones(1, 3, dtype=torch.long))
