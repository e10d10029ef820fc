"""A W&B run folder (offline or synced) -> RunLogs, with wandb's own reader of the `run-*.wandb` transaction log.

`wandb leet inspect --json RUN_DIR` prints the log's records as JSON lines; the `history` records are the logged rows,
the `run` record holds the config. Media are files under the run's `files/`; a history row names them with flattened
keys (`media/x._type`, `media/x.filenames`, `media/x.path`, `media/x.captions`). The protobuf layout of the .wandb file
is wandb's private business, so it is read through wandb's command, not parsed here.
"""

from __future__ import annotations

import json
import mimetypes
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from polyformer.report.runs import Image, Media, RunLogs, Table, load_yaml

# History keys that are W&B's own bookkeeping, not logged values.
_INTERNAL = ("_step", "_runtime", "_timestamp", "trainer/global_step")


def wandb_command() -> str:
    beside = Path(sys.executable).with_name("wandb")  # the venv's wandb, also when the venv is not activated
    found = str(beside) if beside.is_file() else shutil.which("wandb")
    if found is None:
        raise FileNotFoundError("reading a W&B run needs the `wandb` command: pip install wandb")
    return found


def inspect_records(run_dir: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "WANDB_SILENT": "true"}
    try:
        out = subprocess.run(
            [wandb_command(), "leet", "inspect", "--json", str(run_dir)],
            capture_output=True, text=True, timeout=300, env=env, check=True,
        )  # fmt: skip
    except subprocess.CalledProcessError as e:
        raise ValueError(f"{run_dir}: wandb could not read the run ({(e.stderr or e.stdout).strip()[-300:]})") from e
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def read_wandb(run_dir: Path, wandb_file: Path) -> RunLogs:
    files = run_dir / "files"
    run_id = wandb_file.stem.removeprefix("run-")
    logs = RunLogs(dir=run_dir, formats=["wandb"], name=run_id, files=[wandb_file])
    rows: list[dict[str, Any]] = []
    for record in inspect_records(run_dir):
        kind = record.get("type")
        if kind == "run":
            run = record["run"]
            logs.config.update(run.get("config", {}).get("update", {}))
            logs.name = run.get("display_name") or run_id
        elif kind == "config":
            logs.config.update(record["config"].get("update", {}))
        elif kind == "history":
            rows.append(record["history"]["item"])
    if (files / "config.yaml").is_file():  # a synced run: the same config, one {value: ...} per key
        synced = load_yaml(files / "config.yaml")
        logs.config.update({k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in synced.items()})
    for key in ("_wandb", "_instantiator"):
        logs.config.pop(key, None)
    logs.config_source = f"the W&B run's config ({wandb_file.name})" if logs.config else ""

    media: dict[str, Media] = {}
    times = [row["_timestamp"] for row in rows if isinstance(row.get("_timestamp"), (int, float))]
    logs.wall_clock = (min(times), max(times)) if times else None
    for row in rows:
        step = int(row.get("trainer/global_step", row.get("_step", 0)))
        kept = tuple(k.removesuffix("_type") for k in row if k.endswith("._type"))  # "media/x." for media/x.count
        for key, value in row.items():
            if key in _INTERNAL or key.startswith("_") or (key.startswith(kept) and kept):
                if key.endswith("._type"):
                    item = _media(key.removesuffix("._type"), step, value, row, files)
                    if item is not None:
                        media[item.key] = item  # rows come in order: the last one wins
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                logs.scalars.setdefault(key, []).append((step, float(value)))
    logs.media = list(media.values())
    return logs


def _media(key: str, step: int, kind: str, row: dict[str, Any], files: Path) -> Media | None:
    """The media item a history row names under `key`, read from the run's files/ folder."""
    if kind == "images/separated":
        paths = row.get(f"{key}.filenames") or []
        captions = row.get(f"{key}.captions") or []
        images = [_image(files / p, captions[i] if i < len(captions) else "") for i, p in enumerate(paths)]
        return Media(key, step, images=[i for i in images if i is not None])
    if kind == "image-file":
        image = _image(files / row.get(f"{key}.path", ""), row.get(f"{key}.caption") or "")
        return Media(key, step, images=[image] if image else [])
    if kind in ("table-file", "partitioned-table", "joined-table"):
        path = files / row.get(f"{key}.path", "")
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [[_cell(c, files) for c in r] for r in data.get("data", [])]
        return Media(key, step, table=Table([str(c) for c in data.get("columns", [])], rows))
    return None


def _cell(value: Any, files: Path) -> str | Image:
    if isinstance(value, dict) and value.get("_type") == "image-file":
        image = _image(files / value.get("path", ""), value.get("caption") or "")
        return image if image is not None else "(image missing)"
    return value if isinstance(value, str) else json.dumps(value)


def _image(path: Path, caption: str) -> Image | None:
    if not path.is_file():
        return None
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return Image(path.read_bytes(), mime=mime, caption=str(caption))
