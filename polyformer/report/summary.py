"""What the report says about the numbers: which series share a plot, final and best values, throughput.

Keys follow the platform's logging: `<stage>/<metric>` for task metrics (train/loss and val/loss share a plot),
Lightning's ThroughputMonitor writes `<stage>/[device/]{batches,samples,items,flops}_per_sec`, `<stage>/mfu` and the
running totals `<stage>/{time,batches,samples,lengths}` (`polyformer.callbacks.stats`), LearningRateMonitor writes
`lr-<Optimizer>[/pg<i>]`.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

STAGES = ("train", "val", "validate", "test", "predict")
_RATE = re.compile(r"(^|/)((batches|samples|items|flops)_per_sec|mfu)$")
_TOTAL = re.compile(rf"^({'|'.join(STAGES)})/(time|batches|samples|lengths)$")
# Metrics where larger is better; everything else (loss, perplexity, bits per byte, error) is minimised.
_HIGHER_IS_BETTER = re.compile(r"acc|top\d|bleu|chrf|f1|precision|recall|auc|score|zero_shot|mfu|per_sec", re.I)

Series = list[tuple[int, float]]


def is_throughput(key: str) -> bool:
    return bool(_RATE.search(key) or _TOTAL.match(key))


def is_stage_metric(key: str) -> bool:
    return key.split("/", 1)[0] in STAGES and "/" in key and not is_throughput(key)


def plot_name(key: str) -> str:
    """The plot a series goes on: its key without the stage prefix and without Lightning's _step/_epoch suffix."""
    if key.startswith("lr-"):
        return "learning rate"
    stage, _, rest = key.partition("/")
    name = rest if stage in STAGES and rest else key
    return re.sub(r"_(step|epoch)$", "", name)


def plot_groups(keys: list[str]) -> dict[str, list[str]]:
    """Plot name -> its keys, in first-seen order; plots holding a validation series come first."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(plot_name(key), []).append(key)
    has_val = {name for name, ks in groups.items() if any(k.startswith(("val/", "validate/")) for k in ks)}
    return dict(sorted(groups.items(), key=lambda item: item[0] not in has_val))


def higher_is_better(key: str) -> bool:
    return bool(_HIGHER_IS_BETTER.search(key.rpartition("/")[2]))


@dataclass
class SeriesSummary:
    key: str
    points: int
    first_step: int
    last_step: int
    last: float
    best: float
    best_step: int
    higher_is_better: bool


def summarize(key: str, series: Series, mode: str | None = None) -> SeriesSummary:
    """mode: "max" or "min" where the config says (a checkpoint callback's monitor), else guessed from the name."""
    higher = mode == "max" if mode else higher_is_better(key)
    finite = [(s, v) for s, v in series if math.isfinite(v)] or series
    best_step, best = (max if higher else min)(finite, key=lambda p: p[1])
    return SeriesSummary(key, len(series), series[0][0], series[-1][0], series[-1][1], best, best_step, higher)


def monitored(config: dict[str, Any]) -> dict[str, str]:
    """Metric -> "min"/"max" for every checkpoint callback in the config that monitors one."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    found = {}
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        args = cb.get("init_args", {}) if isinstance(cb, dict) else {}
        if isinstance(args, dict) and args.get("monitor"):
            found[str(args["monitor"])] = str(args.get("mode") or "min")
    return found


def task_class(config: dict[str, Any]) -> str:
    model = config.get("model")
    return str(model.get("class_path", "")) if isinstance(model, dict) else ""


def throughput_summary(scalars: dict[str, Series], wall_clock: tuple[float, float] | None) -> list[tuple[str, str]]:
    """(label, value) rows: the median of every rate the throughput monitor logged (items are tokens for token
    batches), the number of steps, and the time the run took where the logs say."""
    rows = []
    for key, series in scalars.items():
        if _RATE.search(key):
            values = [v for _, v in series if math.isfinite(v)]
            if values:
                rows.append((f"median {key}", format_number(statistics.median(values))))
    steps = [s for series in scalars.values() for s, _ in series]
    if steps:
        rows.append(("last logged step", str(max(steps))))
    if scalars.get("train/batches"):
        rows.append(("training batches (train/batches)", format_number(scalars["train/batches"][-1][1])))
    if scalars.get("train/time"):
        rows.append(("training time (train/time)", format_duration(scalars["train/time"][-1][1])))
    if wall_clock is not None:
        rows.append(("wall clock, first to last record", format_duration(wall_clock[1] - wall_clock[0])))
    return rows


def format_number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e7:
        return f"{int(value):,}"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:,.0f}" if 1e5 <= abs(value) < 1e9 else f"{value:.3e}"


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"
