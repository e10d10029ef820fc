"""The benchmark driver behind `scripts/benchmark.py`: builds each case, times the contenders interleaved, and
renders one Markdown report (machine, versions, exact command, tables of throughput and ratios ours/peer).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import warnings
from dataclasses import asdict

import torch

from .data import run_data
from .generation import generation_cases
from .models import SIZES, TASKS, Case, build_case
from .report import Report, Row, render
from .timing import Settings, infer_step, interleave, make_optimizer, paired_ratio, peak_memory, train_step

SECTIONS = ("train", "infer", "generate", "data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/benchmark.py",
        description="Time polyformer against transformers / timm / torch / open_clip at matched configs, in one run, "
        "alternating the contenders; prints a Markdown report of throughput ratios ours/peer.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile every contender")
    p.add_argument("--size", choices=SIZES, default=None, help="default: tiny on cpu, base on cuda")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 2 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per contender (default 2, 5 compiled)")
    p.add_argument("--rounds", type=int, default=7, help="timed steps per contender, interleaved")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: Lightning's table)")
    p.add_argument("--output", default=None, help="write the Markdown report here (e.g. docs/benchmarks.md)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    args.size = args.size or ("base" if args.device == "cuda" else "tiny")
    args.warmup = args.warmup if args.warmup is not None else (5 if args.compile else 2)
    return args


def environment(device: torch.device) -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    env = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "cpu": _cpu_name(),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for dist in ("torch", "lightning", "transformers", "timm", "open_clip_torch"):
        env[dist] = version(dist)
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None  # MFU is a GPU notion here; pass --peak-tflops to get it on CPU anyway
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the clean Markdown report."""
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def run_case(case: Case, args: argparse.Namespace, s: Settings, peak: float | None) -> list[Row]:
    for c in case.contenders:
        c.optimizer = make_optimizer(c.model, s.device)
    rows: list[Row] = []
    memory: dict[str, float] = {}
    if "train" in args.sections and s.device.type == "cpu":
        # The estimate hooks autograd, which a compiled graph hides: take it eagerly, before compiling.
        memory = {c.name: peak_memory(c, s)[0] for c in case.contenders}
    if s.compile:
        for c in case.contenders:
            c.model.compile()
    sections = [(sec, step) for sec, step in (("train", train_step), ("infer", infer_step)) if sec in args.sections]
    for section, step in sections:
        for c in case.contenders:
            c.model.train(section == "train")
        times = interleave(case.contenders, step, s)
        log(
            f"{case.task} {section}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items())
        )
        if section == "train" and s.device.type == "cuda":  # measured after compile and warm-up: the real peak
            memory = {c.name: peak_memory(c, s)[0] for c in case.contenders}
        for ours, peer, note in case.pairs:
            t_ours, t_peer = statistics.median(times[ours]), statistics.median(times[peer])
            row = Row(
                section, case.task, case.shape.describe(case.task), ours, peer, f"{case.unit}/s",
                case.items / t_ours, case.items / t_peer, paired_ratio(times[ours], times[peer]), note,
            )  # fmt: skip
            if section == "train":
                row.ours_mib, row.peer_mib = memory.get(ours), memory.get(peer)
                if peak is not None and case.flops_per_step:
                    row.ours_mfu = case.flops_per_step / t_ours / peak
                    row.peer_mfu = case.flops_per_step / t_peer / peak
            rows.append(row)
    return rows


def run_generation(args: argparse.Namespace, s: Settings) -> list[Row]:
    rows = []
    for case in generation_cases(args.size, s.device, args.seed, tuple(args.tasks)):
        times = interleave(case.contenders, infer_step, s)
        log(f"{case.kind}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items()))
        for ours, peer, note in case.pairs:
            t_ours, t_peer = statistics.median(times[ours]), statistics.median(times[peer])
            rows.append(
                Row(
                    "generate",
                    case.kind,
                    case.description,
                    ours,
                    peer,
                    "tok/s",
                    case.tokens / t_ours,
                    case.tokens / t_peer,
                    paired_ratio(times[ours], times[peer]),
                    note,
                )  # fmt: skip
            )
    return rows


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32: the same for every contender
    s = Settings(device, args.precision, args.compile, args.warmup, args.rounds)
    peak = peak_flops(args, device)
    report = Report(
        command="python scripts/benchmark.py " + shlex.join(argv),
        environment=environment(device),
        settings={k: v for k, v in vars(args).items() if k not in ("output", "json")} | {"peak_flops": peak},
    )
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")  # nn.Transformer with norm_first
    warnings.filterwarnings("ignore", message=".*attention_mask.*")
    for task in args.tasks:
        if not {"train", "infer"} & set(args.sections):
            break
        case = build_case(task, args.size, device, args.seed)
        report.rows += run_case(case, args, s, peak)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "generate" in args.sections:
        report.rows += run_generation(args, s)
    if "data" in args.sections:
        rows, skipped = run_data(args, report.rows)
        report.rows += rows
        report.skipped += skipped
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    report = run(args, argv)
    text = render(report)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(report)}, f, indent=1)
    return 0
