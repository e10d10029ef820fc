"""RunLogs -> one self-contained HTML page: inline CSS, curves as inline SVG, images as data: URIs, no network.

Every text that came from the logs or the config is escaped. A few lines of script at the end record, on <body>, how
many plots and images the browser actually laid out and decoded (`data-plots-visible`, `data-images-loaded`): the
page shows the same without script, and a headless-browser test reads the numbers back.
"""

from __future__ import annotations

import base64
import datetime
import html
import math

import yaml

from polyformer.report.plots import curves_svg
from polyformer.report.runs import Image, Media, RunLogs, Table
from polyformer.report.summary import (
    format_duration,
    format_number,
    is_stage_metric,
    is_throughput,
    monitored,
    plot_groups,
    summarize,
    task_class,
    throughput_summary,
)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 0 24px 48px; color: #1d232b; background: #fff; }
h1 { font-size: 24px; margin: 24px 0 4px; } h2 { font-size: 19px; margin-top: 36px; border-bottom: 1px solid #d8dde3;
padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: #5a6572; margin: 0 0 12px; word-break: break-all; }
nav ol { columns: 2; padding-left: 20px; } nav a, a { color: #1a5fb4; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d8dde3; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } .num { font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #e3e7ec; border-radius: 6px; padding: 6px; }
figure svg { width: 100%; height: auto; display: block; }
.images { display: flex; flex-wrap: wrap; gap: 10px; } .images figure { max-width: 100%; }
.images img { image-rendering: pixelated; max-width: 100%; min-width: 96px; display: block; }
figcaption { font-size: 12px; color: #5a6572; max-width: 360px; }
td img { max-width: 160px; image-rendering: pixelated; }
pre { background: #f6f8fa; border: 1px solid #e3e7ec; padding: 10px; overflow: auto; max-height: 640px;
      font-size: 12px; }
.note { background: #fff8e1; border: 1px solid #f0d98c; padding: 6px 10px; border-radius: 4px; }
"""

# Counts what was laid out (non-empty box) and decoded; written to <body> for tests, harmless for readers.
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var boxed = function (e) { var r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  var plots = Array.prototype.slice.call(document.querySelectorAll("figure.plot > svg"));
  var images = Array.prototype.slice.call(document.images);
  var b = document.body.dataset;
  b.plots = plots.length; b.plotsVisible = plots.filter(boxed).length;
  b.images = images.length;
  b.imagesLoaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0 && boxed(i); }).length;
  b.rendered = "yes";
});
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def data_uri(image: Image) -> str:
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"


def render_report(logs: RunLogs, note: str = "") -> str:
    """The whole page as a string."""
    metric_keys = [k for k in logs.scalars if is_stage_metric(k)]
    rate_keys = [k for k in logs.scalars if is_throughput(k)]
    rate_keys.sort(key=lambda k: not k.endswith(("_per_sec", "mfu")))  # rates before the running totals
    # Lightning's TensorBoardLogger logs hp_metric = -1 as a placeholder: listed with the series, not plotted.
    placeholder = {v for _, v in logs.scalars.get("hp_metric", [])} == {-1.0}
    other_keys = [
        k for k in logs.scalars if k not in metric_keys + rate_keys and not (k == "hp_metric" and placeholder)
    ]
    sections = [
        ("summary", "Summary", _summary(logs, note)),
        ("metrics", "Metrics", _plots(logs, metric_keys)),
        ("throughput", "Throughput", _throughput(logs, rate_keys)),
        ("other", "Other series (learning rate, memory, ...)", _plots(logs, other_keys)),
        ("media", _media_title(logs.media), _media(logs.media)),
        ("config", "Config", _config(logs)),
        ("series", "Every logged series", _series_table(logs)),
    ]
    sections = [(anchor, title, body) for anchor, title, body in sections if body]
    toc = "".join(f'<li><a href="#{a}">{esc(t)}</a></li>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{b}</section>' for a, t, b in sections)
    task = task_class(logs.config)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(f'{logs.name} - polyformer run report')}</title><style>{CSS}</style></head>"
        f"<body><header><h1>Run report: {esc(logs.name)}</h1>"
        f'<p class="sub">{esc(logs.dir)} &middot; {esc(task or "task unknown")} &middot; '
        f"{esc(', '.join(_FORMAT_NAMES[f] for f in logs.formats))} logs</p></header>"
        f"<nav><ol>{toc}</ol></nav>{body}<script>{CHECK_SCRIPT}</script></body></html>\n"
    )


_FORMAT_NAMES = {"tensorboard": "TensorBoard", "csv": "CSV", "wandb": "W&B"}


def _table(header: list[str], rows: list[list[str]], raw: bool = False, attrs: list[str] | None = None) -> str:
    """rows are escaped unless raw (cells already HTML); attrs: extra attributes per row."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header) if any(header) else ""
    lines = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td>{c if raw else esc(c)}</td>" for c in row)
        lines.append(f"<tr{' ' + attrs[i] if attrs else ''}>{cells}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{''.join(lines)}</tbody></table>"


def _summary(logs: RunLogs, note: str) -> str:
    facts = [
        ["run", logs.name],
        ["directory", str(logs.dir)],
        ["task", task_class(logs.config) or "(no model.class_path in the config)"],
        ["logs read", ", ".join(str(p) for p in logs.files)],
        ["config from", logs.config_source or "(none found)"],
        ["checkpoints", ", ".join(p.name for p in logs.checkpoints) or "(none found)"],
        ["report written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")],
    ]
    if logs.wall_clock:
        start = datetime.datetime.fromtimestamp(logs.wall_clock[0]).strftime("%Y-%m-%d %H:%M:%S")
        facts.insert(3, ["started", f"{start} (took {format_duration(logs.wall_clock[1] - logs.wall_clock[0])})"])
    out = f'<p class="note">{esc(note)}</p>' if note else ""
    out += _table(["", ""], facts)
    modes = monitored(logs.config)
    rows, attrs = [], []
    for key, series in logs.scalars.items():
        if not is_stage_metric(key) or not series:
            continue
        s = summarize(key, series, modes.get(key))
        better = "higher" if s.higher_is_better else "lower"
        flag = " (checkpoint monitor)" if key in modes else ""
        rows.append([esc(key + flag), _num(s.last), esc(s.last_step), _num(s.best), esc(s.best_step), better])
        attrs.append(f'data-metric="{esc(key)}"')
    if rows:
        out += "<h3>Final and best values</h3>"
        out += _table(["metric", "final", "at step", "best", "at step", "better"], rows, raw=True, attrs=attrs)
    return out


def _num(value: float) -> str:
    return f'<span class="num">{esc(format_number(value))}</span>'


def _plots(logs: RunLogs, keys: list[str]) -> str:
    figures = []
    for name, group in plot_groups(keys).items():
        svg = curves_svg(name, {k: logs.scalars[k] for k in group if logs.scalars[k]})
        figures.append(f'<figure class="plot" data-plot="{esc(name)}">{svg}</figure>')
    return f'<div class="plots">{"".join(figures)}</div>' if figures else ""


def _throughput(logs: RunLogs, keys: list[str]) -> str:
    rows = throughput_summary(logs.scalars, logs.wall_clock)
    if not keys and not rows:
        return ""
    explain = (
        "<p>From Lightning's ThroughputMonitor (<code>polyformer.callbacks.stats</code>): items are tokens for "
        "token batches; <code>device/</code> rates are per device, the others for all devices together.</p>"
    )
    return explain + _table(["", ""], [list(r) for r in rows]) + _plots(logs, keys)


def _media_title(media: list[Media]) -> str:
    steps = sorted({m.step for m in media})
    return f"Media of the last validation (step {steps[-1]})" if steps else "Media"


def _media(media: list[Media]) -> str:
    parts = []
    for item in sorted(media, key=lambda m: m.key):
        parts.append(f'<h3 data-media="{esc(item.key)}">{esc(item.key)} <small>(step {esc(item.step)})</small></h3>')
        if item.images:
            figures = "".join(
                f'<figure><img src="{data_uri(i)}" alt="{esc(item.key)} {n}">'
                + (f"<figcaption>{esc(i.caption)}</figcaption>" if i.caption else "")
                + "</figure>"
                for n, i in enumerate(item.images)
            )
            parts.append(f'<div class="images">{figures}</div>')
        if item.table is not None:
            parts.append(_logged_table(item.table))
        if item.text:
            parts.append(f"<pre>{esc(item.text)}</pre>")
    return "".join(parts)


def _logged_table(table: Table) -> str:
    def cell(value: str | Image) -> str:
        if isinstance(value, Image):
            return f'<img src="{data_uri(value)}" alt="{esc(value.caption or "image")}">'
        return esc(value)

    return _table(table.columns, [[cell(c) for c in row] for row in table.rows], raw=True)


def _config(logs: RunLogs) -> str:
    if not logs.config:
        return ""
    text = yaml.safe_dump(logs.config, sort_keys=False, allow_unicode=True, width=120)
    return f"<p>From {esc(logs.config_source)}.</p><pre>{esc(text)}</pre>"


def _series_table(logs: RunLogs) -> str:
    rows, attrs = [], []
    for key, series in logs.scalars.items():
        finite = [v for _, v in series if math.isfinite(v)]
        low, high = (min(finite), max(finite)) if finite else (math.nan, math.nan)
        first, last = (series[0][0], series[-1][0]) if series else ("", "")
        last_value = _num(series[-1][1]) if series else ""
        rows.append([esc(key), esc(len(series)), esc(first), esc(last), last_value, _num(low), _num(high)])
        attrs.append(f'data-series="{esc(key)}" data-points="{len(series)}"')
    header = ["key", "points", "first step", "last step", "last value", "min", "max"]
    return _table(header, rows, raw=True, attrs=attrs) if rows else ""
