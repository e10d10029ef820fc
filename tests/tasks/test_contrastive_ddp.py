"""CLIP under DDP: 2 gloo processes on CPU give the single-process loss and gradients on the concatenated batch (with
the contrastive loss and with SigLIP's sigmoid loss, whose bias must get the same gradient too), and the same
zero-shot and retrieval metrics over an evaluation set split unevenly across the ranks."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("clip_ddp_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("clip_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes importing torch: ~15 s idle, more on a busy machine
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_process_loss_gradients_and_metrics_equal_one_process(tmp_path, loss):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), loss],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)

    w = _load_worker()
    model = w.make_model(loss)
    images, tokens, _ = w.make_data(w.TRAIN_BATCH, seed=1)
    ref = w.loss_and_grads(model, images, tokens)
    e_images, e_tokens, e_labels = w.make_data(w.EVAL_SIZE, seed=2)
    ref_metrics = w.evaluate(model, e_images, e_tokens, e_labels)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # The logged loss is the mean of the ranks' losses: that is the global-batch loss.
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref["loss"])
    for rank in ranks:
        assert rank["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            assert grad.abs().max() > 0, f"{name} got no gradient in the reference"
            torch.testing.assert_close(rank["grads"][name], grad, msg=lambda m, n=name: f"{n}: {m}")
        assert rank["metrics"] == ref_metrics  # computed on the gathered set, identical on every rank
        assert rank["per_class"] == model.per_class_top1
    assert {"val/zero_shot_top1", "val/image_to_text_R@1", "val/text_to_image_R@10"} <= ref_metrics.keys()
