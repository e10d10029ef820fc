"""Activation checkpointing, applied by the task from outside the backbone: the same losses, gradients and
state_dict keys as without it, real recomputation in backward (only there), and KV-cache decoding left alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

from polyformer.backbone import Block, Transformer, TransformerConfig
from polyformer.tasks.base import TaskModule, clean_name, weight_decay_groups
from polyformer.tasks.image_classification import ImageClassifier
from polyformer.tasks.language_model import LanguageModel

# Dropout on: the recompute must replay the forward's random masks (checkpoint restores the RNG state).
BACKBONE = dict(width=32, depth=2, heads=4, dropout=0.1, attention_dropout=0.1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    pytest.mark.usefixtures("one_thread"),
]


def language_model(checkpointing: bool, **backbone) -> LanguageModel:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**BACKBONE, "position": "rotary", "causal": True, "kv_heads": 2, **backbone})
    task = LanguageModel(backbone=cfg, vocab_size=50, activation_checkpointing=checkpointing)
    task.configure_model()
    return task


def image_classifier(checkpointing: bool) -> ImageClassifier:
    torch.manual_seed(0)
    task = ImageClassifier(backbone=TransformerConfig(**BACKBONE, drop_path=0.1), patch_size=2, num_classes=10,
                           image_size=8, channels=1, mean=(0.5,), std=(0.5,),
                           activation_checkpointing=checkpointing)  # fmt: skip
    task.configure_model()
    return task


def lm_batch() -> Tensor:
    return torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))


def vit_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


TASKS: dict[str, tuple[Callable[[bool], TaskModule], Callable[[], object]]] = {
    "lm": (language_model, lm_batch),
    "vit": (image_classifier, vit_batch),
}


def count_block_calls(task: nn.Module) -> list[int]:
    """A one-element counter of forward calls of the (unwrapped) blocks."""
    calls = [0]
    for m in task.modules():
        if isinstance(m, Block):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", TASKS)
def test_same_loss_gradients_and_state_dict_keys_and_blocks_recompute_in_backward(name):
    build, batch = TASKS[name]
    plain, wrapped = build(False), build(True)
    assert not any(isinstance(m, CheckpointWrapper) for m in plain.modules())
    assert sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules()) == 2
    assert not hasattr(Transformer(TransformerConfig(**BACKBONE)), "activation_checkpointing")  # no backbone flag
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    # Parameter names gain the wrapper's prefix; the optimizer's names (clean_name) do not.
    assert any("_checkpoint_wrapped_module." in n for n, _ in wrapped.named_parameters(remove_duplicate=False))
    assert [g["param_names"] for g in weight_decay_groups(plain, 0.1)] == [
        g["param_names"] for g in weight_decay_groups(wrapped, 0.1)
    ]

    data = batch()
    losses, grads = [], []
    for task in (plain, wrapped):
        task.train()
        calls = count_block_calls(task)
        torch.manual_seed(2)
        loss = task.training_step(data, 0)
        forward_calls = calls[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append({clean_name(n): p.grad for n, p in task.named_parameters()})
        assert forward_calls == 2
        recomputed = calls[0] - forward_calls
        assert recomputed == (2 if task is wrapped else 0), f"{recomputed} block recomputes in backward"
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_checkpoints_load_across_the_switch():
    plain, wrapped = language_model(False), language_model(True)
    other_plain, other_wrapped = language_model(False, dropout=0.0), language_model(True, dropout=0.0)
    for p in [*other_plain.parameters(), *other_wrapped.parameters()]:
        p.data.normal_()  # different weights, so a load that silently did nothing would show
    wrapped.load_state_dict(other_plain.state_dict())
    plain.load_state_dict(other_wrapped.state_dict())
    for a, b in ((wrapped, other_plain), (plain, other_wrapped)):
        for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), n


@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode"])
def test_no_recompute_without_a_backward(mode):
    task = language_model(True)
    task.train(mode != "eval")
    calls = count_block_calls(task)
    ctx = {"eval": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        out = task(lm_batch())
    if out.requires_grad:
        out.sum().backward()
    assert calls[0] == 2


def test_torch_wrapper_alone_runs_once_under_no_grad_and_inference_mode():
    """What the plain wrapper does without grad (why decoding under `generate`'s no_grad is safe either way)."""
    block = Block(TransformerConfig(**{**BACKBONE, "dropout": 0.0}))
    wrapped = checkpoint_wrapper(block)
    calls = count_block_calls(wrapped)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            wrapped(torch.randn(1, 3, 32))
    assert calls[0] == 2


def cached_decode(task: LanguageModel, tokens: Tensor) -> tuple[Tensor, list]:
    cache = task.model.new_cache()
    steps = [task(tokens[:, :4], cache=cache)] + [task(tokens[:, i : i + 1], cache=cache) for i in range(4, 9)]
    return torch.cat(steps, dim=1), cache


def test_cached_decoding_equals_the_full_forward_even_in_training_with_grad():
    # No dropout: the training-mode forward must be deterministic to compare positions.
    task = language_model(True, dropout=0.0, attention_dropout=0.0)
    plain = language_model(False, dropout=0.0, attention_dropout=0.0)
    tokens = lm_batch()
    with torch.no_grad():
        full = task.eval()(tokens)
    with torch.no_grad():
        torch.testing.assert_close(cached_decode(task, tokens)[0], full)
    # A backward through a cached decode must not recompute the blocks: that would append to the cache again.
    grads = []
    for model in (task, plain):
        model.train()
        logits, cache = cached_decode(model, tokens)
        torch.testing.assert_close(logits, full)
        logits.square().mean().backward()
        assert all(layer["self"]["k"].shape[2] == 9 for layer in cache)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)

    task.eval()
    prompts = [[5, 6, 7, 8], [11], [3, 4]]
    cached = task.generate(prompts, max_new_tokens=8, temperature=0.0, use_cache=True)
    assert cached == task.generate(prompts, max_new_tokens=8, temperature=0.0, use_cache=False)
    assert cached == plain.eval().generate(prompts, max_new_tokens=8, temperature=0.0)


def test_configure_model_wraps_once():
    task = language_model(True)
    task.configure_model()
    assert sum(isinstance(m, CheckpointWrapper) for m in task.modules()) == 2
    assert not any(isinstance(m._checkpoint_wrapped_module, CheckpointWrapper) for m in task.model.backbone.blocks)
