"""The BERT tasks on tiny inputs: the masked-LM loss counts the selected positions only, a tiny model overfits a
batch, the classifier fine-tunes from a masked-LM checkpoint (encoder carried, head fresh; another architecture named
key by key), its media (confusion matrix, misclassified texts), and the built-in classification set."""

import dataclasses

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.data.masked_text import IGNORE
from polyformer.data.text_classification import builtin_examples
from polyformer.tasks.masked_lm import MaskedLM
from polyformer.tasks.media import Heatmap, MediaRequest, Table
from polyformer.tasks.sequence_classification import SequenceClassifier

TINY = TransformerConfig(width=32, depth=2, heads=2, prenorm=False, position="learned", max_len=16, dropout=0.0)


def test_masked_loss_is_on_selected_positions_only():
    torch.manual_seed(0)
    task = MaskedLM(TINY, vocab_size=50)
    inputs = torch.randint(0, 50, (2, 16))
    labels = torch.full_like(inputs, IGNORE)
    labels[0, 3], labels[1, 7], labels[1, 9] = 5, 6, 7
    nats, correct, count = task.masked_loss((inputs, labels))
    logits = task.model(inputs)
    expected = sum(F.cross_entropy(logits[b, t], labels[b, t], reduction="sum") for b, t in [(0, 3), (1, 7), (1, 9)])
    assert count == 3 and 0 <= correct <= 3
    torch.testing.assert_close(nats, expected)


def test_tiny_masked_lm_overfits_a_batch():
    torch.manual_seed(0)
    task = MaskedLM(TINY, vocab_size=40)
    inputs = torch.randint(4, 40, (4, 16))
    labels = torch.where(torch.rand(4, 16) < 0.3, inputs, IGNORE)
    masked = torch.where(labels != IGNORE, torch.tensor(3), inputs)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    for _ in range(150):
        nats, _, count = task.masked_loss((masked, labels))
        opt.zero_grad()
        (nats / count).backward()
        opt.step()
    nats, correct, count = task.masked_loss((masked, labels))
    assert nats / count < 0.1 and correct == count


def test_classifier_fine_tunes_from_a_masked_lm_checkpoint(tmp_path):
    torch.manual_seed(0)
    mlm = MaskedLM(TINY, vocab_size=60)
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(mlm)
    trainer.save_checkpoint(tmp_path / "mlm.ckpt")
    clf = SequenceClassifier(TINY, vocab_size=60, num_classes=3, init_from=str(tmp_path / "mlm.ckpt"))
    for key, value in mlm.model.bert.state_dict().items():
        torch.testing.assert_close(clf.model.bert.state_dict()[key], value)  # encoder and pooler carried over
    wrong = dataclasses.replace(TINY, width=64, prenorm=True)
    with pytest.raises(ValueError) as e:
        SequenceClassifier(wrong, vocab_size=60, num_classes=3, init_from=str(tmp_path / "mlm.ckpt"))
    assert "--model.backbone.width=32" in str(e.value) and "--model.backbone.prenorm=False" in str(e.value)


def test_classifier_media_shows_confusion_and_misclassified():
    torch.manual_seed(0)
    from polyformer.data.tokenizers import byte_level

    clf = SequenceClassifier(TINY, vocab_size=300, num_classes=3, class_names=["a", "b", "c"])
    clf.tokenizer = byte_level()
    tokens = torch.randint(0, 256, (6, 10))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, 5:] = False
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    clf.eval()
    with torch.no_grad():
        for metric in (clf.val_accuracy, clf.val_f1, clf.val_confusion):
            metric.update(clf(tokens, mask), labels)
        clf._keep_misclassified(tokens, mask, clf(tokens, mask), labels)
    clf.on_validation_epoch_end()
    items = clf.media(None, MediaRequest())
    cm = next(i for i in items if isinstance(i, Heatmap))
    assert cm.matrix.sum() == 6 and cm.xlabels == ["a", "b", "c"]
    table = next(i for i in items if isinstance(i, Table))
    assert table.key == "misclassified" and len(table.rows) == len(clf.misclassified) > 0


def test_builtin_classification_set_is_balanced_and_fixed():
    train, val, names = builtin_examples()
    assert names == ["statements", "expressions", "data model", "built-in types"]
    counts = [sum(y == k for _, y in train + val) for k in range(4)]
    assert len(set(counts)) == 1 and counts[0] > 100
    assert {t for t, _ in train}.isdisjoint(t for t, _ in val)
    assert builtin_examples() == (train, val, names)
