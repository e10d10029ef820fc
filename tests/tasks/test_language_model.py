"""The language-model task: metrics against hand computation, generation (cache, stop token, limits), training,
checkpoint round trip with the tokenizer, sizes and the tokenizer from the data, media, and configuration errors."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing import check_compatible
from polyformer.checkpointing.loading import load_task
from polyformer.data.info import DataInfo
from polyformer.data.text import TextDataModule
from polyformer.data.tokenizers import _bytes_to_unicode, byte_level, decode_rows
from polyformer.models.gpt import GPT
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.language_model import LanguageModel, SamplingConfig
from polyformer.tasks.media import MediaRequest, Table

TINY = TransformerConfig(width=32, depth=2, heads=4, position="learned", max_len=64, causal=True, dropout=0.0)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TextDataModule:
    dm = TextDataModule(tokenizer="bpe", bpe_vocab_size=300, block_size=32, batch_size=8,
                        cache_dir=str(tmp_path_factory.mktemp("cache")))  # fmt: skip
    dm.setup("fit")
    return dm


def built(data: TextDataModule, **kwargs) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(backbone=kwargs.pop("backbone", TINY), **kwargs)
    model.connect_data(data.info())  # vocab_size and the tokenizer, as `setup` takes them
    model.configure_model()
    return model.eval()


def test_validation_metrics_match_hand_computation(data, tmp_path):
    model = built(data)
    logged = trainer(tmp_path).validate(model, datamodule=data, verbose=False)[0]
    nats, tokens, nbytes = 0.0, 0, 0
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(batch[:, :-1])
            targets = batch[:, 1:]
            nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            tokens += targets.numel()
            # The bytes each byte-level token stands for (special tokens stand for none).
            pieces = [data.tokenizer.inner.id_to_token(t) for t in targets.flatten().tolist()]
            nbytes += sum(len(bytes(to_byte[c] for c in p)) for p in pieces if p not in ("<|endoftext|>", "<|pad|>"))
    assert model.vocab_size == 300 and model.model.embed.weight.shape[0] == 320  # padded to a multiple of 64
    assert logged["val/loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(logged["val/loss"]), rel=1e-5)
    assert logged["val/bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def test_cached_and_uncached_generation_agree(data):
    model = built(data)
    prompts = [[5, 6, 7, 8, 9], [11], [3, 4]]  # different lengths: left-padded in one batch
    for temperature, top_k, top_p in [(0.0, None, None), (1.0, 20, None), (0.9, None, 0.8)]:
        kwargs = dict(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
        cached = model.generate(prompts, use_cache=True, **kwargs)
        assert cached == model.generate(prompts, use_cache=False, **kwargs)
        assert all(len(row) == 12 for row in cached)
    # Left padding does not change a prompt's continuation: each prompt alone gives the same greedy tokens.
    batched = model.generate(prompts, max_new_tokens=6, temperature=0.0)
    assert batched == [model.generate([p], max_new_tokens=6, temperature=0.0)[0] for p in prompts]


def test_generation_stops_at_eos_and_never_samples_padding(data):
    model = built(data)
    greedy = model.generate([[5, 6, 7]], max_new_tokens=10, temperature=0.0)[0]
    stop = greedy[3]
    first = greedy.index(stop)
    assert model.generate([[5, 6, 7]], max_new_tokens=10, temperature=0.0, eos_id=stop)[0] == greedy[:first]
    assert model.generate([[5, 6, 7]], max_new_tokens=0, temperature=0.0) == [[]]
    # Hot sampling over many tokens: padding and the padded vocabulary tail never come out.
    tokens = sum(model.generate([[5]] * 8, max_new_tokens=40, temperature=5.0, top_k=None), [])
    assert data.tokenizer.pad_id not in tokens and max(tokens) < data.tokenizer.vocab_size
    with pytest.raises(ValueError, match="max_len"):
        model.generate([[5]], max_new_tokens=64)


def test_generate_text_returns_strings(data):
    model = built(data, samples=SamplingConfig(max_new_tokens=5, temperature=0.0))
    texts = model.generate_text(["The ", "A much longer prompt than the first one"])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = model.generate([[data.tokenizer.bos_id, *data.tokenizer.encode("The ")]], max_new_tokens=5, temperature=0)
    assert texts[0] == data.tokenizer.decode(ids[0])


def test_training_lowers_the_loss_and_checkpoint_carries_tokenizer(data, tmp_path):
    model = LanguageModel(backbone=TINY, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5), samples=None)
    t = trainer(tmp_path, max_steps=40, limit_val_batches=2, val_check_interval=40, gradient_clip_val=1.0)
    before = trainer(tmp_path).validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    t.fit(model, datamodule=data)
    after = t.callback_metrics["val/loss"].item()
    assert after < before - 0.5, (before, after)
    t.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = load_task(tmp_path / "lm.ckpt", expected=LanguageModel)
    assert loaded.tokenizer.to_json() == data.tokenizer.to_json()
    x = data.val_set[0][None, :-1]
    torch.testing.assert_close(loaded(x), model.eval()(x))
    fine_tune = built(data, init_from=str(tmp_path / "lm.ckpt"))  # starts from the trained weights
    torch.testing.assert_close(fine_tune(x), model(x))


def test_logit_softcap_bounds_the_logits_and_checkpoints_rebuild_it(data, tmp_path):
    capped, plain = built(data, logit_softcap=0.1), built(data)  # same seed: the same weights; small at init
    x = data.val_set[0][None, :-1]
    with torch.no_grad():
        logits, raw = capped(x), plain(x)
    assert raw.abs().max() > 0.2  # the bound below is not met by accident
    assert logits.abs().max() < 0.1
    torch.testing.assert_close(logits, 0.1 * torch.tanh(raw / 0.1))
    t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    t.fit(capped.train(), datamodule=data)
    t.save_checkpoint(tmp_path / "capped.ckpt")
    loaded = load_task(tmp_path / "capped.ckpt", expected=LanguageModel)
    assert loaded.model.cfg.logit_softcap == 0.1
    torch.testing.assert_close(loaded(x), capped.eval()(x))
    # Resuming (`fit --ckpt_path`) with another cap is refused: it is part of the architecture.
    checkpoint = torch.load(tmp_path / "capped.ckpt", weights_only=False)
    with pytest.raises(ValueError, match="logit_softcap is 0.1 in the checkpoint but 0.2"):
        check_compatible(built(data, logit_softcap=0.2), checkpoint)


def test_untied_head_trains_both_matrices(data):
    model = built(data, tie_embeddings=False).train()
    assert model.model.head.weight is not model.model.embed.weight
    nats, _ = model.token_losses(data.train_set[0][None])
    nats.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    tied = built(data)
    assert tied.model.head.weight is tied.model.embed.weight
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tied.parameters()) == 320 * 32


def test_vocab_size_and_tokenizer_come_from_the_data_info(data):
    task = LanguageModel(backbone=TINY)
    assert task.model is None and task.missing_sizes() == ["vocab_size"]
    with pytest.raises(ValueError, match="--model.vocab_size"):
        task.configure_model()  # no Trainer, no data: the error names the flag to set
    task.connect_data(data.info())
    task.configure_model()
    assert isinstance(task.model, GPT) and task.model.cfg.vocab_size == 300 and task.hparams["vocab_size"] == 300
    assert task.tokenizer is data.tokenizer
    assert all(k.startswith("model.") for k in task.state_dict())  # checkpoint format 3; token_bytes not saved
    assert task.token_bytes.shape == (320,) and task.token_bytes[:300].tolist() == data.tokenizer.token_bytes()

    # Every size given: built in __init__, before any tokenizer. Bytes per token follow once the data's arrives.
    given = LanguageModel(backbone=TINY, vocab_size=300)
    assert isinstance(given.model, GPT) and not given.token_bytes.any()
    given.connect_data(data.info())
    assert given.token_bytes[:300].tolist() == data.tokenizer.token_bytes()

    # A tokenizer that came with a checkpoint must be the data's.
    other = LanguageModel(backbone=TINY, vocab_size=300)
    other.tokenizer = byte_level()
    with pytest.raises(ValueError, match="vocab_size"):
        other.connect_data(data.info())


def test_media_samples_continue_the_requested_prompts_or_the_validation_starts(data):
    model = built(data, samples=SamplingConfig(prompts=["The ", "A "]))
    batch = next(iter(data.val_dataloader()))[:3]
    request = MediaRequest(num_samples=3, max_new_tokens=4, temperature=0.0)
    (table,) = model.media(batch, MediaRequest(num_samples=3, prompts=["If ", "x", "y", "z"], max_new_tokens=4))
    assert isinstance(table, Table) and table.key == "samples" and table.columns == ["step", "prompt", "continuation"]
    assert [row[1] for row in table.rows] == ["If ", "x", "y"]  # the request's prompts first, num_samples of them
    (table,) = model.media(batch, request)
    assert [row[1] for row in table.rows] == ["The ", "A "]  # then the task's own
    assert table.rows[0] == [0, "The ", model.generate_text(["The "], max_new_tokens=4, temperature=0.0)[0]]
    model.samples = SamplingConfig()
    (table,) = model.media(batch, request)  # then the starts of the validation blocks
    assert [row[1] for row in table.rows] == decode_rows(data.tokenizer, batch[:, :16])
    assert all(isinstance(row[2], str) for row in table.rows)
    model.tokenizer = None
    assert model.media(batch, request) == []  # nothing to decode with


def test_configuration_errors_name_the_field(data, tmp_path):
    with pytest.raises(ValueError, match="model.backbone.causal=true"):
        LanguageModel(backbone=TransformerConfig(width=32, depth=1, heads=4))  # before any data is prepared
    with pytest.raises(ValueError, match="block_size \\(128\\) exceeds model.backbone.max_len \\(64\\)"):
        LanguageModel(backbone=TINY).connect_data(DataInfo(vocab_size=300, block_size=128))
    long_blocks = TextDataModule(tokenizer="bpe", bpe_vocab_size=300, block_size=128, cache_dir=str(data.cache_dir))
    with pytest.raises(ValueError, match="block_size \\(128\\) exceeds model.backbone.max_len \\(64\\)"):
        trainer(tmp_path, max_steps=1).fit(LanguageModel(backbone=TINY), datamodule=long_blocks)
