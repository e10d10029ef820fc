"""`polyformer report`: one self-contained HTML page from a run's own log files, to read and share without W&B.

    polyformer report RUN_DIR [--out FILE]

RUN_DIR is a run's folder (`runs/lm-tiny/version_0`, a W&B `wandb/offline-run-*` folder) or a folder above runs
(`runs/lm-tiny`): then the run its `latest` link points to is taken, else the newest. TensorBoard, CSV and W&B logs
are read. The page holds the curves of every logged series (train and validation of a metric on one plot), the
throughput, the media of the last validation, the resolved config, and the final and best values. It needs no
network and no other file: plots are inline SVG, images are embedded. Default --out: RUN_DIR/report.html.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="polyformer report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory, or a folder holding runs")
    p.add_argument("--out", type=Path, default=None, help="the HTML file to write (default: RUN_DIR/report.html)")
    return p.parse_args(argv)


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old page or the new one, never half a page."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from polyformer.report.page import render_report
    from polyformer.report.runs import choose_run, read_run

    root: Path = args.run_dir
    run_dir, note = choose_run(root)
    if note:
        print(note)
    out: Path = args.out or root / "report.html"
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {out / 'report.html'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    logs = read_run(run_dir, root)
    write_atomically(out, render_report(logs, note))
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(logs.scalars)} series, "
        f"{len(logs.media)} media, from {run_dir}"
    )
    return 0
