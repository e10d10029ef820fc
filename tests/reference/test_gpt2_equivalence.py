"""Our language model with weights converted from Hugging Face GPT-2 computes the same function: equal logits
(fp32, tight tolerance) and identical greedy generations. The reference is built locally from a small GPT2Config
with random weights: no download."""

import pytest
import torch
import transformers  # a dev dependency (the [dev] extra)

from polyformer.tasks.language_model import LanguageModel
from polyformer.weights.gpt2 import convert_gpt2, gpt2_backbone_config


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    # initializer_range well above GPT-2's 0.02 so random logits are far apart and greedy paths are not degenerate.
    config = transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=64, n_layer=3, n_head=4, initializer_range=0.3,
        bos_token_id=100, eos_token_id=100,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def ours_from(reference) -> LanguageModel:
    cfg = gpt2_backbone_config(reference.config.to_dict())
    model = LanguageModel(backbone=cfg, vocab_size=reference.config.vocab_size)
    model.configure_model()
    missing, unexpected = model.load_state_dict(
        convert_gpt2(reference.state_dict(), cfg, model.embed.weight.shape[0]), strict=False
    )
    assert not unexpected and not [k for k in missing if not k.startswith("val_metric")]
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
    ours = model.generate(prompts.tolist(), max_new_tokens=20, temperature=0.0)
    assert ours == expected
    assert all(len(set(row)) > 3 for row in expected)  # real paths, not one repeated token


def test_init_from_a_save_pretrained_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    cfg = gpt2_backbone_config(reference.config.to_dict())
    model = LanguageModel(backbone=cfg, vocab_size=101, init_from=str(tmp_path))
    model.configure_model()
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), reference(tokens).logits, rtol=1e-5, atol=1e-5)
    wrong = LanguageModel(backbone=gpt2_backbone_config({**reference.config.to_dict(), "n_layer": 2}), vocab_size=101,
                          init_from=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="backbone.depth is 2 but the GPT-2 weights need 3"):
        wrong.configure_model()
    offline = LanguageModel(backbone=cfg, vocab_size=101, init_from="gpt2")
    with pytest.raises(ConnectionError, match="needs the network"):  # tests run with HF_HUB_OFFLINE=1
        offline.configure_model()
