"""The benchmark script runs and reports a well-formed table at micro sizes. Speeds are never asserted here:
they depend on the machine and on whoever else is using it."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import ROOT

from benchmarks import run
from benchmarks.models import TASKS


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the benchmark sets its own thread count
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, *extra: str) -> tuple[list[dict], str]:
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["--size", "micro", "--rounds", "1", "--warmup", "1", "--peak-tflops", "1", "--output", str(md)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.main([*argv, "--json", str(js), *extra]) == 0
    return json.loads(js.read_text())["rows"], md.read_text()


def _check_markdown(text: str, sections: list[str]) -> None:
    from benchmarks.report import TITLES

    assert text.startswith("# Benchmarks") and "python scripts/benchmark.py --size micro" in text
    for section in sections:
        assert f"## {TITLES[section]}" in text
    tables = [line for line in text.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in tables if "---" in line}  # each table's separator row
    for line in tables:  # every row has as many cells as some table's header
        assert line.count("|") in widths, line


def _check_comparisons(rows: list[dict]) -> None:
    for r in rows:
        assert r["ours"].startswith("polyformer") and r["peer"] and r["ours"] != r["peer"]
        assert r["ours_per_s"] > 0 and r["peer_per_s"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0
        if r["section"] == "train":  # --peak-tflops turns MFU on even on CPU; memory is estimated on CPU
            assert r["ours_mfu"] > 0 and r["peer_mfu"] > 0 and r["ours_mib"] > 0 and r["peer_mib"] > 0


def test_one_task_train_and_infer(tmp_path):
    rows, text = _run(tmp_path, "--tasks", "vit", "--sections", "train", "infer")
    assert [(r["section"], r["task"]) for r in rows] == [("train", "vit"), ("infer", "vit")]
    _check_comparisons(rows)
    _check_markdown(text, ["train", "infer"])


def test_every_task_and_section(tmp_path):
    rows, text = _run(tmp_path, "--sections", "train", "infer", "generate", "data")
    by_section = {s: [r for r in rows if r["section"] == s] for s in ("train", "infer", "generate", "data")}
    assert {r["task"] for r in by_section["train"]} == set(TASKS)
    assert {r["task"] for r in by_section["infer"]} == set(TASKS)
    assert {r["task"] for r in by_section["generate"]} == {"sampling", "beam search"}
    assert len(by_section["data"]) == len(TASKS)
    _check_comparisons(by_section["train"] + by_section["infer"] + by_section["generate"])
    for r in by_section["data"]:
        assert r["ours_per_s"] > 0 and r["ratio"] > 0
    _check_markdown(text, ["train", "infer", "generate", "data"])


def test_lm_pairs_compare_matched_activations():
    from benchmarks.models import build_case

    case = build_case("lm", "micro", torch.device("cpu"))
    names = {c.name for c in case.contenders}
    assert {"polyformer gelu", "polyformer gelu_tanh"} <= names
    acts = {c.name: c.model.config.activation_function for c in case.contenders if not c.ours}
    assert acts == {"transformers GPT2LMHeadModel gelu": "gelu", "transformers GPT2LMHeadModel gelu_new": "gelu_new"}
    for ours, peer, _ in case.pairs:
        assert ours in names and peer in names
    assert case.flops_per_step and case.flops_per_step > 0


def test_gpu_arguments(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = run.parse_args(["--device", "cuda", "--precision", "bf16", "--compile"])
    assert (args.size, args.warmup, args.precision, args.compile) == ("base", 5, "bf16", True)
    assert run.peak_flops(run.parse_args(["--peak-tflops", "989"]), torch.device("cuda")) == 989e12
    assert run.peak_flops(run.parse_args([]), torch.device("cpu")) is None  # no MFU on CPU unless asked


def test_bad_arguments_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
    for bad in (["--threads", "0"], ["--rounds", "0"], ["--peak-tflops", "-1"], ["--size", "huge"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def test_script_help_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--compile" in out.stdout and "--precision" in out.stdout
