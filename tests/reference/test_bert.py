"""Our BERT with weights converted from Hugging Face BERT (by the production converter) computes the same function:
equal masked-LM logits, pooled [CLS] output and classification logits (fp32, tight tolerance), with padding and
token types; `init_from="hf:<folder>"` goes through the same loader, and a wrong architecture or an offline hub name
fails with a message naming what to change. The references are built locally from a small BertConfig: no download."""

import dataclasses

import pytest
import torch
import transformers

from polyformer.backbone import TransformerConfig
from polyformer.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from polyformer.weights import load_weights
from polyformer.weights.bert import bert_config, convert_bert

V = 99


def hf_config(**kw) -> transformers.BertConfig:
    # initializer_range above BERT's 0.02 so the outputs are far from constant and a wrong mapping shows.
    return transformers.BertConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40, type_vocab_size=2, initializer_range=0.2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3, **kw,
    )  # fmt: skip


def backbone_of(config: transformers.BertConfig) -> TransformerConfig:
    keys = bert_config(config.to_dict())
    fields = {k.removeprefix("backbone."): v for k, v in keys.items() if k.startswith("backbone.")}
    return TransformerConfig(**fields, max_len=config.max_position_embeddings, dropout=0.0)


@pytest.fixture(scope="module")
def references():
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(hf_config()).eval()
    cls = transformers.BertForSequenceClassification(hf_config()).eval()
    return mlm, cls


def inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, 24), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 15:] = False  # a padded row
    types = torch.zeros_like(tokens)
    types[:, 12:] = 1  # a second segment
    return tokens, mask, types


def test_masked_lm_logits_match(references):
    mlm, _ = references
    cfg = BertConfig(backbone_of(mlm.config), vocab_size=V)
    model = BertForMaskedLM(cfg)
    shapes, state = convert_bert(mlm.state_dict(), cfg.padded_vocab_size)
    assert shapes["backbone.depth"] == 3 and shapes["backbone.width"] == 64 and shapes["backbone.mlp_ratio"] == 2.0
    model.load_state_dict(state, strict=True)  # every weight of ours has its counterpart
    tokens, mask, types = inputs()
    with torch.no_grad():
        expected = mlm(tokens, attention_mask=mask.long(), token_type_ids=types).logits
        ours = model.eval()(tokens, mask, types)
    real = mask[..., None].expand_as(expected)  # padded positions' outputs are not defined the same way
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-5, atol=1e-5)
    assert expected.std() > 1.0


def test_pooled_output_and_classifier_logits_match(references):
    _, cls = references
    cfg = BertConfig(backbone_of(cls.config), vocab_size=V, num_classes=3)
    model = BertForSequenceClassification(cfg)
    _, state = convert_bert(cls.state_dict(), cfg.padded_vocab_size)
    model.load_state_dict(state, strict=True)  # every weight of ours has its counterpart
    model.eval()
    tokens, mask, types = inputs()
    with torch.no_grad():
        out = cls(tokens, attention_mask=mask.long(), token_type_ids=types, output_hidden_states=True)
        pooled = cls.bert(tokens, attention_mask=mask.long(), token_type_ids=types).pooler_output
        torch.testing.assert_close(model.pooled(tokens, mask, types), pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens, mask, types), out.logits, rtol=1e-5, atol=1e-5)


def test_init_from_folder_names_every_key_to_change(references, tmp_path):
    mlm, cls = references
    mlm.save_pretrained(tmp_path / "mlm")
    cls.save_pretrained(tmp_path / "cls")
    backbone = backbone_of(mlm.config)
    ours = BertForMaskedLM(BertConfig(dataclasses.replace(backbone, max_len=32), vocab_size=V))
    load_weights(ours, f"hf:{tmp_path / 'mlm'}")  # a shorter context takes the first positions
    tokens, mask, types = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), mlm(tokens).logits, rtol=1e-5, atol=1e-5)
    # A pre-trained MLM into a classifier: the encoder loads, the classifier keeps its initialisation.
    clf = BertForSequenceClassification(BertConfig(backbone, vocab_size=V, num_classes=5))
    load_weights(clf, f"hf:{tmp_path / 'mlm'}")
    torch.testing.assert_close(clf.bert.embed_norm.weight, mlm.bert.embeddings.LayerNorm.weight)
    wrong = BertForSequenceClassification(
        BertConfig(dataclasses.replace(backbone, width=32, prenorm=True, heads=2), vocab_size=V, num_classes=3)
    )
    with pytest.raises(ValueError) as e:
        load_weights(wrong, f"hf:{tmp_path / 'cls'}")
    for key in ("--model.backbone.width=64", "--model.backbone.heads=4", "--model.backbone.prenorm=False"):
        assert key in str(e.value)


def test_offline_hub_name_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = BertForMaskedLM(BertConfig(TransformerConfig(width=32, depth=1, heads=2, prenorm=False), vocab_size=V))
    with pytest.raises(ConnectionError, match="cannot fetch BERT weights 'bert-base-uncased'"):
        load_weights(model, "hf:bert-base-uncased")
