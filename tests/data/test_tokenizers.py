"""Tokenizers: round trips, special ids, serialisation, pretrained loading from a path and the offline hub error."""

from pydoc_data.topics import topics

import pytest
import tokenizers

from polyformer.data.tokenizers import END_OF_TEXT, Tokenizer, byte_level, pretrained, train_bpe

TEXT = "Héllo  wörld\n\tdef f(x):  return x ** 2  # 😀 ünïcode, tabs\tand  double  spaces\n"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(list(topics.values())[:20], vocab_size=600)


def test_byte_level_ids_are_bytes_and_round_trip():
    tok = byte_level()
    assert tok.vocab_size == 258 and tok.eos_id == tok.bos_id == 256 and tok.pad_id == 257
    assert tok.encode(TEXT) == list(TEXT.encode())
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("a", add_special=True) == [256, 97, 256]


def test_bpe_round_trip_compresses_and_survives_json(bpe, tmp_path):
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    assert bpe.vocab_size == 600 and {bpe.eos_id, bpe.pad_id} == {0, 1}
    prose = topics["assert"]
    assert len(bpe.encode(prose)) < 0.5 * len(prose.encode())  # merges learned: far fewer tokens than bytes
    again = Tokenizer.from_json(bpe.to_json())
    assert again.encode(TEXT) == ids and again.fingerprint == bpe.fingerprint
    bpe.save(tmp_path / "t" / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "t")
    assert loaded.encode_batch([TEXT, "x"]) == [ids, bpe.encode("x")]
    assert loaded.encode_batch(["x"], add_special=True) == [[bpe.bos_id, *bpe.encode("x"), bpe.eos_id]]


def test_special_tokens_are_skipped_when_decoding(bpe):
    ids = [bpe.bos_id, *bpe.encode("the end"), bpe.eos_id, bpe.pad_id, bpe.pad_id]
    assert bpe.decode(ids) == "the end"
    assert bpe.special_ids == sorted({bpe.eos_id, bpe.pad_id})


def test_pretrained_from_local_file_adds_missing_pad(tmp_path):
    # A GPT-2-style tokenizer.json: byte-level BPE with only <|endoftext|> (no pad token), as the hub's "gpt2".
    inner = tokenizers.ByteLevelBPETokenizer()
    inner.train_from_iterator(list(topics.values())[:5], vocab_size=400, special_tokens=[END_OF_TEXT])
    inner.save(str(tmp_path / "tokenizer.json"))
    tok = pretrained(str(tmp_path))
    assert tok.eos_id == tok.bos_id == 0
    assert tok.pad_id == 400 and tok.vocab_size == 401  # pad appended after the existing vocabulary
    assert tok.decode(tok.encode(" the end")) == " the end"


def test_pretrained_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        pretrained(str(tmp_path / "nope.json"))
    with pytest.raises(ConnectionError, match="needs the network.*local"):  # tests run with HF_HUB_OFFLINE=1
        pretrained("gpt2")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)
