"""Finding a run's log files under a directory and reading them into one `RunLogs`, whatever logger wrote them.

A run is a directory holding the files of one logger: TensorBoard event files (`events.out.tfevents.*`), Lightning's
CSV logs (`metrics.csv`), or a W&B run folder (`wandb/run-*` or `wandb/offline-run-*` holding `run-*.wandb`). They
lie in `<default_root_dir>/version_N/`, in the older `lightning_logs/version_N/`, or wherever a logger's `save_dir`
put them, so the directory given is searched recursively; a `latest` symlink in it names the run to take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Format = Literal["tensorboard", "csv", "wandb"]
LOOKED_FOR = (
    "TensorBoard event files (events.out.tfevents.*), Lightning CSV logs (metrics.csv) "
    "or W&B run folders (wandb/run-* or wandb/offline-run-* holding run-*.wandb)"
)
# Folders that never hold logs of their own and can be large: not walked.
_SKIP_DIRS = {"checkpoints", "media", "__pycache__", ".git", ".venv", "node_modules"}


@dataclass
class Image:
    """A logged image: PNG (or other) bytes as the logger stored them."""

    data: bytes
    mime: str = "image/png"
    caption: str = ""


@dataclass
class Table:
    """A logged table; a cell is text or an Image."""

    columns: list[str]
    rows: list[list[str | Image]]


@dataclass
class Media:
    """What one media key logged at one step: images (a grid) or a table."""

    key: str
    step: int
    images: list[Image] = field(default_factory=list)
    table: Table | None = None
    text: str = ""  # a text summary that is not a table


@dataclass
class RunLogs:
    """Everything the report shows, read from one run's files.

    scalars: key -> [(step, value)] in logging order; media: the last step of each media key; config: the resolved
    LightningCLI config (or the logger's hyperparameters when that is all there is); wall_clock: (first, last) Unix
    time of the logged records, where the format stores it.
    """

    dir: Path
    formats: list[Format]
    name: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    media: list[Media] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    config_source: str = ""
    wall_clock: tuple[float, float] | None = None
    files: list[Path] = field(default_factory=list)  # the log files read
    checkpoints: list[Path] = field(default_factory=list)

    def merge(self, other: RunLogs) -> None:
        """Add another logger's records of the same run (TensorBoard and CSV side by side): keys already read win."""
        self.formats += [f for f in other.formats if f not in self.formats]
        for key, points in other.scalars.items():
            self.scalars.setdefault(key, points)
        known = {m.key for m in self.media}
        self.media += [m for m in other.media if m.key not in known]
        if not self.config:
            self.config, self.config_source = other.config, other.config_source
        self.wall_clock = self.wall_clock or other.wall_clock
        self.files += other.files


def log_formats(directory: Path) -> dict[Format, list[Path]]:
    """The log files directly in `directory`, by format."""
    found: dict[Format, list[Path]] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        path = directory / name
        if name.startswith("events.out.tfevents.") and path.is_file():
            found.setdefault("tensorboard", []).append(path)
        elif name == "metrics.csv" and path.is_file():
            found.setdefault("csv", []).append(path)
        elif name.startswith("run-") and name.endswith(".wandb") and path.is_file():
            found.setdefault("wandb", []).append(path)
    return found


def find_runs(root: Path) -> list[Path]:
    """Every directory under `root` (itself included) that holds log files. Symlinks are not followed, so a `latest`
    link (ours, or W&B's `latest-run`) does not list a run twice."""
    runs = []
    for current, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not (d == "files" and "wandb" in current))
        if log_formats(Path(current)):
            runs.append(Path(current))
    return runs


def _newest(runs: list[Path]) -> Path:
    def last_write(run: Path) -> float:
        return max(p.stat().st_mtime for paths in log_formats(run).values() for p in paths)

    return max(runs, key=last_write)


def choose_run(root: Path) -> tuple[Path, str]:
    """The run directory to report on under `root`, and a note saying how it was chosen when there was a choice.

    `root` itself when it holds logs; else its only run; else the run its `latest` symlink points to (or the newest
    run inside that); else the run written last."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory; give a run directory, e.g. runs/lm-tiny or its version_N")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; give the run's directory (e.g. runs/lm-tiny or runs/lm-tiny/version_0)")
    if log_formats(root):
        return root, ""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(
            f"no logs found under {root}: looked for {LOOKED_FOR}. Give the run's trainer.default_root_dir "
            "(e.g. runs/lm-tiny) or one of its version_N folders"
        )
    if len(runs) == 1:
        return runs[0], ""
    latest = root / "latest"
    if latest.is_dir():
        target = latest.resolve()
        inside = [r for r in runs if r.resolve() == target or target in r.resolve().parents]
        inside = inside or find_runs(target)
        if inside:
            chosen = _newest(inside)
            return chosen, f"{root} holds {len(runs)} runs; using {chosen} (the one `latest` points to)"
    chosen = _newest(runs)
    return chosen, f"{root} holds {len(runs)} runs; using the newest, {chosen} (give its path to choose another)"


def read_run(run_dir: Path, root: Path | None = None) -> RunLogs:
    """Read every log format in `run_dir`; the config is looked for beside the logs and in the folders above, up to
    `root` (LightningCLI writes config.yaml into the logger's directory, or its save_dir for W&B)."""
    found = log_formats(run_dir)
    if not found:
        raise FileNotFoundError(f"no logs found in {run_dir}: looked for {LOOKED_FOR}")
    logs: RunLogs | None = None
    for fmt, paths in found.items():
        part = _read(fmt, run_dir, paths)
        if logs is None:
            logs = part
        else:
            logs.merge(part)
    assert logs is not None
    # Named from the folder the user gave: "lm-tiny/version_3" says more than "version_3".
    above = root is not None and root.resolve() in run_dir.resolve().parents
    if "wandb" in found:
        logs.name = f"{root.resolve().name}: W&B run {logs.name}" if above else f"W&B run {logs.name}"  # type: ignore[union-attr]
    elif above:
        logs.name = f"{root.resolve().name}/{run_dir.resolve().relative_to(root.resolve())}"  # type: ignore[union-attr]
    if "wandb" in found and (root is None or root == run_dir):
        root = run_dir.parent.parent  # the folder holding wandb/: where LightningCLI wrote config.yaml
    logs.checkpoints = find_checkpoints(run_dir, root)
    cli_config = find_cli_config(run_dir, root)
    if cli_config is not None:  # the resolved config beats a logger's flattened hyperparameters
        logs.config, logs.config_source = load_yaml(cli_config), str(cli_config)
    elif not logs.config and (run_dir / "hparams.yaml").is_file():
        logs.config, logs.config_source = load_yaml(run_dir / "hparams.yaml"), str(run_dir / "hparams.yaml")
    return logs


def _read(fmt: Format, run_dir: Path, paths: list[Path]) -> RunLogs:
    if fmt == "tensorboard":
        from polyformer.report.tensorboard_logs import read_tensorboard

        return read_tensorboard(run_dir, paths)
    if fmt == "csv":
        from polyformer.report.csv_logs import read_csv

        return read_csv(run_dir, paths[0])
    from polyformer.report.wandb_logs import read_wandb

    return read_wandb(run_dir, paths[0])


def _folders_up(run_dir: Path, root: Path | None) -> list[Path]:
    """`run_dir` and the folders above it, up to and including `root` (only `run_dir` without one)."""
    stop = (root or run_dir).resolve()
    folders = []
    for folder in [run_dir, *run_dir.parents]:
        folders.append(folder)
        if folder.resolve() == stop or folder.resolve() in stop.parents:
            break
    return folders


def find_cli_config(run_dir: Path, root: Path | None) -> Path | None:
    """The nearest config.yaml written by LightningCLI, in `run_dir` or a folder above it up to `root`."""
    for folder in _folders_up(run_dir, root):
        candidate = folder / "config.yaml"
        if candidate.is_file() and _is_cli_config(candidate):
            return candidate
    return None


def find_checkpoints(run_dir: Path, root: Path | None) -> list[Path]:
    """The nearest `checkpoints/` folder's .ckpt files (beside the logs, or in the version_N above a W&B run)."""
    for folder in _folders_up(run_dir, root):
        found = sorted((folder / "checkpoints").glob("*.ckpt"))
        if found:
            return found
    return []


def _is_cli_config(path: Path) -> bool:
    try:
        data = load_yaml(path)
    except ValueError:
        return False
    return "trainer" in data or "model" in data


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as YAML ({e})") from e
    return data if isinstance(data, dict) else {}
