"""The plain `GPT` with weights converted from Hugging Face GPT-2 (by the production converter) computes the same
function: equal logits (fp32, tight tolerance) and identical greedy generations; `init_from="hf:<folder>"` through
the task does the same, and a wrong architecture or an offline hub name fails with a message. The reference is built
locally from a small GPT2Config with random weights: no download."""

import pytest
import torch
import transformers  # a dev dependency (the [dev] extra)

from polyformer.decoding import Decoder, sample
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.tasks.language_model import LanguageModel
from polyformer.weights import load_weights
from polyformer.weights.gpt2 import convert_gpt2, gpt2_backbone_config, gpt2_config


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    # initializer_range well above GPT-2's 0.02 so random logits are far apart and greedy paths are not degenerate.
    config = transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=64, n_layer=3, n_head=4, initializer_range=0.3,
        bos_token_id=100, eos_token_id=100,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    reference.save_pretrained(path)  # config.json + model.safetensors, what `hf:<folder>` reads
    return path


def ours_from(reference) -> GPT:
    model = GPT(GPTConfig(gpt2_backbone_config(reference.config.to_dict()), vocab_size=reference.config.vocab_size))
    config, state = convert_gpt2(reference.state_dict(), model.cfg.padded_vocab_size)
    assert config["backbone.depth"] == 3 and config["backbone.width"] == 64 and config["backbone.mlp_ratio"] == 4.0
    model.load_state_dict(state, strict=True)  # every weight of ours has its GPT-2 counterpart
    return model.eval()


def test_logits_match(reference):
    model = ours_from(reference)
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1.0  # the comparison is not between near-constant outputs


def test_greedy_generation_matches(reference):
    model = ours_from(reference)
    prompts = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    expected = reference.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, do_sample=False, pad_token_id=0,
        eos_token_id=None,
    )[:, 6:].tolist()  # fmt: skip
    with torch.no_grad():  # the plain model with the KV cache, through the same sampler the task uses
        ours = sample(Decoder(model, model.new_cache, True), prompts.tolist(), 20, 0.0, None, None, pad_id=0)
    assert ours == expected
    assert all(len(set(row)) > 3 for row in expected)  # real paths, not one repeated token


def test_config_json_and_shapes_name_the_whole_architecture(reference):
    from_json = gpt2_config(reference.config.to_dict())
    from_shapes, _ = convert_gpt2(reference.state_dict(), 128)
    assert {k: from_json[k] for k in from_shapes} == from_shapes  # both agree where both know
    assert from_json["backbone.heads"] == 4 and from_json["backbone.activation"] == "gelu_tanh"
    with pytest.raises(ValueError, match="GPT-2 has 101 tokens but the model's vocabulary has 64 rows"):
        convert_gpt2(reference.state_dict(), 64)


def test_init_from_a_save_pretrained_folder_through_the_task(reference, folder):
    cfg = gpt2_backbone_config(reference.config.to_dict())
    task = LanguageModel(backbone=cfg, vocab_size=101, init_from=f"hf:{folder}")  # every size given: loads at once
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)
    assert task.generate(tokens.tolist(), max_new_tokens=5, temperature=0.0) == (
        reference.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=5, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[:, 16:].tolist()
    )  # fmt: skip


def test_a_shorter_context_takes_the_first_positions(reference, folder):
    cfg = gpt2_backbone_config({**reference.config.to_dict(), "n_positions": 20})
    model = GPT(GPTConfig(cfg, vocab_size=101))
    load_weights(model, f"hf:{folder}")
    torch.testing.assert_close(model.backbone.positions.weight, reference.transformer.wpe.weight[:20])
    longer = GPT(GPTConfig(gpt2_backbone_config({**reference.config.to_dict(), "n_positions": 64}), vocab_size=101))
    with pytest.raises(ValueError, match="--model.backbone.max_len to at most 48"):
        load_weights(longer, f"hf:{folder}")


def test_another_architecture_is_named_key_by_key(reference, folder):
    other = {**reference.config.to_dict(), "n_layer": 2, "n_head": 2}
    with pytest.raises(ValueError, match="--model.backbone.depth=3 \\(here 2\\).*--model.backbone.heads=4 \\(here 2"):
        LanguageModel(backbone=gpt2_backbone_config(other), vocab_size=101, init_from=f"hf:{folder}")
    # exact GELU instead of GPT-2's tanh GELU: another function, refused as well
    gelu = gpt2_backbone_config(reference.config.to_dict())
    gelu.activation = "gelu"
    with pytest.raises(ValueError, match="--model.backbone.activation='gelu_tanh' \\(here 'gelu'\\)"):
        load_weights(GPT(GPTConfig(gelu, vocab_size=101)), f"hf:{folder}")


def test_offline_hub_name_and_missing_folder(reference, tmp_path):
    cfg = gpt2_backbone_config(reference.config.to_dict())
    with pytest.raises(ConnectionError, match="needs the network"):  # tests run with HF_HUB_OFFLINE=1
        LanguageModel(backbone=cfg, vocab_size=101, init_from="hf:gpt2")
    with pytest.raises(FileNotFoundError, match="GPT-2 folder not found"):
        load_weights(GPT(GPTConfig(cfg, vocab_size=101)), f"hf:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="names no weight source"):  # the old spelling without a scheme
        LanguageModel(backbone=cfg, vocab_size=101, init_from="gpt2")
