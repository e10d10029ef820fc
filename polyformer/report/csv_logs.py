"""Lightning's CSVLogger -> RunLogs: `metrics.csv` has one column per key plus `step` (and `epoch`); each row holds
the keys logged at one step and leaves the others empty. The CSV logger keeps no media and no times."""

from __future__ import annotations

import csv
from pathlib import Path

from polyformer.report.runs import RunLogs


def read_csv(run_dir: Path, path: Path) -> RunLogs:
    logs = RunLogs(dir=run_dir, formats=["csv"], name=run_dir.name, files=[path])
    with path.open(newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError as e:
                raise ValueError(f"{path}, line {line}: step {row.get('step')!r} is not a number") from e
            for key, text in row.items():
                if key in (None, "step") or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue  # a text column (none are written by Lightning): not a curve
                logs.scalars.setdefault(key, []).append((step, value))  # NaN kept: a diverged loss is news
    return logs
