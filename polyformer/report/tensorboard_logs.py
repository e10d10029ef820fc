"""TensorBoard event files -> RunLogs, with tensorboard's own EventAccumulator (tensorboard is a dependency).

Scalars are read whole. Images and text keep only the newest record per tag (TensorBoard's reservoir always keeps the
most recent), which is all the report shows: the media of the last validation. `polyformer.callbacks.media` logs an
image grid as `<key>/<i>` per image and a table as markdown text under `<key>`.
"""

from __future__ import annotations

import re
from pathlib import Path

from polyformer.report.runs import Image, Media, RunLogs, Table

_IMAGE_INDEX = re.compile(r"^(.*)/(\d+)$")


def read_tensorboard(run_dir: Path, paths: list[Path]) -> RunLogs:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
    acc.Reload()
    tags = acc.Tags()
    logs = RunLogs(dir=run_dir, formats=["tensorboard"], name=run_dir.name, files=list(paths))
    times: list[float] = []
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        logs.scalars[tag] = [(int(e.step), float(e.value)) for e in events]
        times += [events[0].wall_time, events[-1].wall_time] if events else []
    logs.wall_clock = (min(times), max(times)) if times else None

    grids: dict[str, list[tuple[int, int, bytes]]] = {}  # key -> (step, index, png)
    for tag in tags.get("images", []):
        event = acc.Images(tag)[-1]
        m = _IMAGE_INDEX.match(tag)
        key, index = (m[1], int(m[2])) if m else (tag, 0)
        grids.setdefault(key, []).append((int(event.step), index, event.encoded_image_string))
    for key, entries in grids.items():
        last = max(step for step, _, _ in entries)  # an index seen only in an older validation is not shown
        images = [Image(png) for step, _, png in sorted(entries, key=lambda e: e[1]) if step == last]
        logs.media.append(Media(key, last, images=images))

    for tag in tags.get("tensors", []):
        if not tag.endswith("/text_summary"):
            continue
        event = acc.Tensors(tag)[-1]
        value = tensor_util.make_ndarray(event.tensor_proto)
        text = value.item() if value.size == 1 else b"\n".join(value.ravel().tolist())
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        key = tag.removesuffix("/text_summary")
        table = markdown_table(text)
        logs.media.append(Media(key, int(event.step), table=table, text="" if table else text))
    return logs


def markdown_table(text: str) -> Table | None:
    """A pipe table (`| a | b |`, a `|---|` rule, rows; `\\|` is a literal bar) -> Table; None for other text."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 2 or not all(line.startswith("|") for line in lines) or not re.fullmatch(r"\|[-:| ]+", lines[1]):
        return None

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|"))
        return [p.strip().replace("\\|", "|") for p in parts]

    columns = cells(lines[0])
    rows: list[list[str | Image]] = [list(cells(line)) for line in lines[2:]]
    return Table(columns, rows)
