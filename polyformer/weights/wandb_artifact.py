"""An export folder as a W&B model artifact (`polyformer export --log_model`).

The artifact joins the W&B run that trained the checkpoint when the checkpoint names one (`RunMetadata` stores the
run id and project), so the model sits next to the curves it came from; otherwise a new run of job type "export"
holds it. Without credentials the run is written offline, like training runs (`polyformer.loggers`): the artifact
is recorded in the run's files and `wandb sync <dir>` uploads it later.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from polyformer.loggers import _OFFLINE_MODES, has_wandb_credentials


def artifact_name(task: str, fmt: str, run_id: str | None) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.': e.g. "languagemodel-onnx-ab12cd34"."""
    name = "-".join(p for p in (task.lower(), fmt, run_id) if p)
    return re.sub(r"[^\w.-]", "_", name)


def check_wandb_enabled() -> None:
    """Checked before exporting: a refused --log_model must not leave an export behind that the user did not want."""
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        raise ValueError("--log_model: W&B is disabled (WANDB_MODE=disabled); unset it to log the export")


def log_export_artifact(
    out: Path, fmt: str, ckpt: str | os.PathLike, checkpoint_meta: dict[str, Any], task_name: str, wandb_dir: Path
) -> str:
    """Log `out` as a model artifact; returns where the run lives (for the message). `checkpoint_meta`: the
    checkpoint's "wandb" entry ({"run_id", "project"}) or {}; `wandb_dir`: where W&B writes its files."""
    import wandb

    check_wandb_enabled()
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    offline = env_mode in _OFFLINE_MODES or (not env_mode and not has_wandb_credentials())
    run_id = checkpoint_meta.get("run_id")
    wandb_dir.mkdir(parents=True, exist_ok=True)
    init: dict[str, Any] = {
        "project": checkpoint_meta.get("project") or "polyformer",
        "dir": str(wandb_dir),
        "mode": "offline" if offline else "online",
        "job_type": "export",
    }
    if run_id:
        init.update(id=run_id, resume="allow")  # the training run: the artifact lands beside its curves
    run = wandb.init(**init)
    try:
        artifact = wandb.Artifact(
            artifact_name(task_name, fmt, run_id),
            type="model",
            metadata={"format": fmt, "checkpoint": os.fspath(ckpt), "task": task_name},
        )
        artifact.add_dir(str(out))
        run.log_artifact(artifact, aliases=["latest", fmt])
        where = str(Path(run.dir).parent.resolve())
    finally:
        run.finish()
    if offline:
        print(f"polyformer: W&B is offline; the artifact is kept with the run in {where}\n"
              f"  upload it with: wandb sync {where}", file=sys.stderr)  # fmt: skip
    return where
