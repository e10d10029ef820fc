"""GPT's logit soft-capping, logits = c tanh(logits / c), against its formula in training, eval and cached generation;
and how the modern-recipe options (qk_norm, relu2, logit_softcap) leave the model: the transformers GPT-2 exporter
refuses each by name, the native export round-trips them, ONNX exports them faithfully."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.weights.gpt2 import export_hf_gpt2, gpt2_export_problems

VOCAB = 50


def tiny(**kw) -> TransformerConfig:
    return TransformerConfig(**{"width": 32, "depth": 2, "heads": 4, "max_len": 16, "causal": True, "dropout": 0.0,
                                "position": "learned", **kw})  # fmt: skip


def modern(cap: float | None = 2.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(tiny(qk_norm=True, activation="relu2"), vocab_size=VOCAB, logit_softcap=cap)).eval()


def test_softcap_equals_formula_in_training_and_eval():
    capped, plain = modern(cap=2.0), modern(cap=None)  # same seed: same weights
    tokens = torch.randint(0, VOCAB, (2, 7))
    for train in (True, False):
        capped.train(train), plain.train(train)
        raw = plain(tokens)
        torch.testing.assert_close(capped(tokens), 2.0 * torch.tanh(raw / 2.0))
    assert capped(tokens).abs().max() < 2.0 and plain(tokens).abs().max() > 0  # bounded by c


def test_softcap_is_close_to_identity_for_small_logits_and_receives_gradients():
    model = modern(cap=1000.0).train()
    tokens = torch.randint(0, VOCAB, (2, 7))
    logits = model(tokens)
    torch.testing.assert_close(logits, modern(cap=None).train()(tokens), atol=1e-5, rtol=1e-4)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_softcap_and_qk_norm_cached_generation_equals_one_pass():
    from polyformer.decoding import Decoder, sample

    model = modern(cap=2.0)
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # Greedy generation picks the argmax of the capped logits (tanh is monotonic: the same tokens as uncapped).
    decoder = Decoder(lambda t, mask, pos, cache: model(t, mask, pos, cache), model.new_cache)
    new = sample(decoder, [[1, 2, 3]], max_new_tokens=5, temperature=0.0)[0]
    seq = [1, 2, 3]
    for _ in range(5):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[3:]


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_softcap_names_the_key(cap):
    with pytest.raises(ValueError, match="model.logit_softcap must be a finite number > 0 or None"):
        GPTConfig(tiny(), vocab_size=VOCAB, logit_softcap=cap)


def test_hf_gpt2_export_refuses_each_modern_option_by_name(tmp_path):
    model = modern(cap=30.0)
    problems = "\n".join(gpt2_export_problems(model))
    needed_keys = ("model.backbone.qk_norm=False (here True)", "(here 'relu2')", "model.logit_softcap=None (here 30.0)")
    for needed in needed_keys:
        assert needed in problems
    with pytest.raises(ValueError, match="logit_softcap"):
        export_hf_gpt2(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not gpt2_export_problems(GPT(GPTConfig(tiny(activation="gelu_tanh"), vocab_size=VOCAB)))  # all off


def test_native_export_round_trips_the_new_fields(tmp_path):
    from polyformer.weights.native import export_safetensors, load_model

    model = modern(cap=15.0)
    export_safetensors(model, tmp_path / "out")
    again = load_model(tmp_path / "out")
    assert again.cfg == model.cfg and again.cfg.backbone.qk_norm and again.cfg.logit_softcap == 15.0
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")), reason="export extra missing"
)
@pytest.mark.slow  # one ONNX export (two graphs) takes ~10-20 s on two cores
def test_onnx_export_keeps_qk_norm_relu2_and_softcap(tmp_path):
    import onnxruntime as ort

    from polyformer.weights.onnx import export_onnx

    model = modern(cap=2.0)
    folder = export_onnx(model, tmp_path / "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    run = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokens = torch.randint(0, VOCAB, (3, 9))
    (logits,) = run.run(None, {"tokens": tokens.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(tokens), atol=1e-4, rtol=1e-4)
    assert abs(logits).max() < 2.0
