"""Reads an offline W&B run back from its files: `wandb leet inspect --json` (wandb's own reader of the .wandb
transaction log) for config and history, the run's files/ folder for media."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    dir: Path
    id: str
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # logged artifacts: name, type, manifest, ...

    def metric_keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def values(self, key: str) -> list[tuple[int, Any]]:
        """(trainer/global_step, value) of every history row holding `key`."""
        return [(row.get("trainer/global_step"), row[key]) for row in self.history if key in row]

    def media(self, kind: str, key: str) -> list[Path]:
        """Files W&B wrote for a logged image ("images") or table ("table") under `key`."""
        folder = self.dir / "files" / "media" / kind / Path(key).parent
        return sorted(folder.glob(f"{Path(key).name}_*")) if folder.is_dir() else []


def offline_runs(save_dir: Path) -> list[Path]:
    return sorted((Path(save_dir) / "wandb").glob("offline-run-*"))


def read_run(run_dir: Path) -> Run:
    wandb_file = next(Path(run_dir).glob("run-*.wandb"))
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(exe), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_SILENT": "true"}, check=True,
    )  # fmt: skip
    run = Run(Path(run_dir), wandb_file.stem.removeprefix("run-"))
    for line in out.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind == "run":
            run.config.update(record["run"].get("config", {}).get("update", {}))
        elif kind == "config":
            run.config.update(record["config"].get("update", {}))
        elif kind == "history":
            run.history.append(record["history"]["item"])
        elif kind == "artifact":
            run.artifacts.append(record["artifact"])
    return run
