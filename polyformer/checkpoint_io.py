"""Checkpoint files that are never half-written and never unpickle code.

Saving: the checkpoint is written to a temporary file in the same directory, flushed to disk (fsync), and renamed
over the target with `os.replace`, which is atomic on POSIX file systems. A process killed at any moment (SIGKILL,
node failure, a full disk) leaves either the previous complete file or the new complete file, never a truncated
`last.ckpt`; at worst a `<name>.tmp-<pid>` file is left behind, which the next save in that directory removes.

Loading: `torch.load(weights_only=True)` always, through `polyformer.checkpoint.read_checkpoint`, so a checkpoint
crafted to run code when unpickled is refused with a clear message instead of being trusted.

`PolyformerCLI` installs `AtomicCheckpointIO` in every Trainer it builds (see `with_atomic_checkpoint_io`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

TMP_MARK = ".tmp-"


def temporary_path(path: Path) -> Path:
    # Same directory, so os.replace is a rename within one file system; the suffix is not ".ckpt", so Lightning's
    # search for "last*.ckpt" never mistakes a partial file for a checkpoint.
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete partial files a killed process left for this target; a live writer's file is left alone."""
    for tmp in path.parent.glob(f"{path.name}{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk too (matters on power loss, not on SIGKILL).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (e.g. some network mounts) cannot fsync a directory
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to `path` via a temporary file + fsync + `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with atomic, durable local saves and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(path):
            # Object stores (s3://, gs://) have no rename; Lightning's fsspec transaction uploads the whole file.
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        from polyformer.checkpoint import CheckpointError, read_checkpoint

        if weights_only is False:
            rank_zero_warn("polyformer loads checkpoints with weights_only=True only; ignoring weights_only=False")
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        checkpoint = read_checkpoint(path, map_location=map_location)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
        return checkpoint


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The Trainer's `plugins` with AtomicCheckpointIO added, keeping whatever a preset or the user set.

    - no CheckpointIO given: ours is appended next to the others (precision, cluster environment, ...);
    - a wrapper such as AsyncCheckpointIO without an inner IO: ours goes inside it;
    - plain TorchCheckpointIO: replaced by ours (same file format, only the write is atomic);
    - any other CheckpointIO: kept (the user asked for it), with a warning that its saves may not be atomic.
    """
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    plugins = list(plugins)
    ios = [i for i, p in enumerate(plugins) if isinstance(p, CheckpointIO)]
    if not ios:
        return [*plugins, AtomicCheckpointIO()]
    for i in ios:
        io = plugins[i]
        if isinstance(io, _WrappingCheckpointIO):  # e.g. AsyncCheckpointIO: ours does the writing inside it
            if io.checkpoint_io is None:
                io.checkpoint_io = AtomicCheckpointIO()
            io = io.checkpoint_io
        elif type(io) is TorchCheckpointIO:
            plugins[i] = io = AtomicCheckpointIO()
        if not isinstance(io, AtomicCheckpointIO):
            rank_zero_warn(
                f"trainer.plugins sets {type(io).__name__}: polyformer's atomic checkpoint writes are not used, so a "
                "run killed while saving may leave a partial checkpoint"
            )
    return plugins
