"""polyformer's own export (`polyformer.weights.native`) for every model, `init_from=<export>/model.safetensors`, and
the `polyformer export` verb on real checkpoints (tests/fixtures/format1): what it writes loads where it should, a
failed or refused export leaves nothing behind. The foreign formats' round trips are tests/reference/test_exports.py
and test_onnx_export.py."""

import json

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file

from polyformer.backbone import TransformerConfig
from polyformer.cli import main as cli
from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig
from polyformer.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.models.vit import ViT, ViTConfig
from polyformer.weights import load_weights
from polyformer.weights.native import export_safetensors, load_model

FORMAT1 = ROOT / "tests" / "fixtures" / "format1"
SMALL = dict(width=16, depth=1, heads=2, dropout=0.0)
TOKENS, IMAGES = torch.randint(2, 30, (2, 6), generator=torch.Generator().manual_seed(0)), torch.randn(2, 1, 8, 8)


def _models() -> dict[str, tuple[torch.nn.Module, object]]:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(TransformerConfig(**SMALL, position="learned", max_len=8, causal=True), vocab_size=50))
    seq2seq = EncoderDecoder(EncoderDecoderConfig(TransformerConfig(**SMALL), vocab_size=40, source_vocab_size=40))
    vit = ViT(ViTConfig(TransformerConfig(**SMALL), image_size=8, patch_size=4, channels=1, num_classes=3))
    clip = CLIP(
        CLIPConfig(
            ImageEncoderConfig(TransformerConfig(**SMALL, position="none"), image_size=8, patch_size=4, channels=1),
            TextEncoderConfig(TransformerConfig(**SMALL, position="learned", max_len=6, causal=True)),
            embed_dim=8, vocab_size=30, eos_id=1,
        )
    )  # fmt: skip
    return {
        "gpt": (gpt, lambda m: m(TOKENS)),
        "encoder_decoder": (seq2seq, lambda m: m(TOKENS, TOKENS != 0, TOKENS)),
        "vit": (vit, lambda m: m(IMAGES)),
        "clip": (clip, lambda m: torch.cat([t.flatten() for t in m(IMAGES, TOKENS)])),
    }


@pytest.mark.parametrize("name", ["gpt", "encoder_decoder", "vit", "clip"])
def test_every_model_exports_and_loads_back_without_the_training_stack(tmp_path, name):
    model, run = _models()[name]
    model.eval()
    export_safetensors(model, tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    torch.testing.assert_close(run(loaded), run(model), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    gpt, _ = _models()["gpt"]
    export_safetensors(gpt, tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert ("head.weight" in stored) != ("embed.weight" in stored)  # one name for the shared matrix
    loaded = load_model(tmp_path)
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()


def test_init_from_an_export_checks_its_config_and_loads_its_weights(tmp_path):
    vit, _ = _models()["vit"]
    export_safetensors(vit, tmp_path)
    fresh = ViT(vit.cfg)
    load_weights(fresh, str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(fresh(IMAGES), vit(IMAGES), rtol=0, atol=0)
    wider = ViT(ViTConfig(TransformerConfig(**{**SMALL, "width": 32}), 8, 4, channels=1, num_classes=5))
    with pytest.raises(ValueError) as e:
        load_weights(wider, str(tmp_path / "model.safetensors"))
    assert "--model.backbone.width=16 (here 32)" in str(e.value) and "--model.num_classes=3 (here 5)" in str(e.value)
    gpt, _ = _models()["gpt"]
    with pytest.raises(ValueError, match="holds a ViT, not a GPT"):
        load_weights(gpt, str(tmp_path / "model.safetensors"))


def test_a_config_naming_a_module_outside_the_models_is_refused(tmp_path):
    vit, _ = _models()["vit"]
    export_safetensors(vit, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model": "os.system"}))
    with pytest.raises(ValueError, match="not a polyformer model; refusing it"):
        load_model(tmp_path)


def test_export_verb_writes_the_language_model_with_its_tokenizer(tmp_path, capsys):
    from polyformer.checkpointing.loading import load_task
    from polyformer.data.tokenizers import Tokenizer

    out = tmp_path / "lm"
    assert cli(["export", "--ckpt", str(FORMAT1 / "lm.ckpt"), "--format", "safetensors", "--out", str(out)]) == 0
    assert "exported GPT (safetensors)" in capsys.readouterr().out
    task = load_task(FORMAT1 / "lm.ckpt")
    model = load_model(out)
    tokens = torch.tensor([[task.tokenizer.bos_id, *task.tokenizer.encode("The class")]])
    torch.testing.assert_close(model(tokens), task.model(tokens), rtol=0, atol=0)
    assert Tokenizer.from_json((out / "tokenizer.json").read_text()).to_json() == task.tokenizer.to_json()
    assert not [p for p in tmp_path.iterdir() if p.name != "lm"]  # no temporary folder left beside it

    # An existing folder is kept unless --overwrite; a format the model has no counterpart in names what it has.
    again = cli(["export", "--ckpt", str(FORMAT1 / "lm.ckpt"), "--format", "safetensors", "--out", str(out)])
    assert again == 1 and "already exists and is not empty" in capsys.readouterr().err
    wrong = cli(["export", "--ckpt", str(FORMAT1 / "lm.ckpt"), "--format", "timm", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert wrong == 1 and "GPT" in err and "hf" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_export_verb_writes_a_transformers_folder_that_generates_as_we_do(tmp_path):
    import transformers  # the [dev] extra

    from polyformer.checkpointing.loading import load_task

    out = tmp_path / "hf"
    assert cli(["export", "--ckpt", str(FORMAT1 / "lm.ckpt"), "--format", "hf", "--out", str(out)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    task = load_task(FORMAT1 / "lm.ckpt")
    tokens = torch.tensor([[task.tokenizer.bos_id, *task.tokenizer.encode("The class")]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, task.model(tokens), rtol=1e-4, atol=1e-4)


def test_export_verb_writes_clip_with_its_tokenizer(tmp_path):
    out = tmp_path / "clip"
    assert cli(["export", "--ckpt", str(FORMAT1 / "clip.ckpt"), "--format", "safetensors", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert isinstance(load_model(out), CLIP)
