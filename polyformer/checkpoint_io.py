"""Checkpoint files that are never half-written and never unpickle code.

Saving: the checkpoint is written to a temporary file in the same directory, flushed to disk (fsync), and renamed
over the target with `os.replace`, which is atomic on POSIX file systems. A process killed at any moment (SIGKILL,
node failure, a full disk) leaves either the previous complete file or the new complete file, never a truncated
`last.ckpt`; at worst a `<name>.tmp-<pid>` file is left behind, which the next save in that directory removes.

Loading: `torch.load(weights_only=True)` always, through `polyformer.checkpoint.read_checkpoint`, so a checkpoint
crafted to run code when unpickled is refused with a clear message instead of being trusted.

`PolyformerCLI` installs `AtomicCheckpointIO` in every Trainer it builds (see `with_atomic_checkpoint_io`).

Sharded FSDP checkpoints (`state_dict_type: sharded`) are directories written by every rank, and Lightning's
FSDPStrategy writes them itself, into the target path, without a CheckpointIO: a save killed halfway would leave the
previous `last.ckpt/` with some shards new and some old or truncated. `AtomicShardedSaves` writes into a temporary
sibling directory `<name>.tmp-<pid of rank 0>` (all ranks), waits for every rank (barrier), and rank 0 swaps it into
place with `swap_into_place`: an atomic exchange of the two paths where the file system has one (Linux
`renameat2(RENAME_EXCHANGE)`: the target is the complete old or the complete new directory at every instant), then
deletes the old one. Elsewhere it is two renames (old away to `<name>.old-<pid>`, new in); a kill between them
leaves the complete old directory under that name, which the next save (or load) in that directory puts back
(`remove_stale_temporaries`), as it removes temporaries that killed saves left behind. `AtomicShardedSaves` is the
mixin that does it for any FSDPStrategy subclass; `polyformer.strategies.FSDPStrategy` (configs/trainer/fsdp.yaml)
has it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.strategies.fsdp import _METADATA_FILENAME
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # a replaced checkpoint directory, for the moment between two renames (no atomic exchange)


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


def _left_by_dead_process(candidate: Path, mark: str) -> bool:
    pid = candidate.name.rsplit(mark, 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


def _remove(path: Path) -> None:
    """Delete a file, a link or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(path: Path) -> None:
    """Clean up after killed saves of this target (a live writer's files are left alone): delete partial files and
    directories, and put back a replaced directory that a swap killed between its two renames left aside (it is
    complete; the target is then missing)."""
    prefix = glob.escape(path.name)  # checkpoint names may hold glob characters ("[", "*")
    for tmp in path.parent.glob(f"{prefix}{TMP_MARK}*"):
        if _left_by_dead_process(tmp, TMP_MARK):
            _remove(tmp)
    for old in path.parent.glob(f"{prefix}{OLD_MARK}*"):
        if _left_by_dead_process(old, OLD_MARK):
            if os.path.lexists(path):
                _remove(old)
            else:
                os.rename(old, path)


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


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        os.fsync(f.fileno())


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Exchange two existing paths atomically (Linux >= 3.15, glibc >= 2.28); False where the system or the file
    system cannot (then nothing was changed)."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # e.g. NFS or an old kernel: fall back to two renames
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_into_place(new: Path, target: Path) -> None:
    """Put the complete `new` (a directory or a file) at `target`, replacing whatever is there, and delete the old.

    With an atomic exchange, `target` is the old or the new one at every instant; a kill before the old one is
    deleted leaves it at `new`'s temporary name. Without, the old one sits at `<target>.old-<pid>` between two
    renames; `remove_stale_temporaries` puts it back if the process died there. Both names end in a pid, not in
    ".ckpt", so Lightning's search for "last*.ckpt" never picks them.
    """
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _rename_exchange(new, target):
        _remove(new)  # holds the old one now
    else:
        old = target.with_name(f"{target.name}{OLD_MARK}{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        _remove(old)
    _fsync_dir(target.parent)


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> None:
    """`write(directory)` fills a fresh temporary directory, which then replaces `target` as a whole (one process;
    `AtomicShardedSaves` does the same with every rank writing)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_path(target)
    _remove(tmp)  # an earlier save of this same process that raised
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
    except BaseException:
        _remove(tmp)
        raise
    swap_into_place(tmp, target)


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


class AtomicShardedSaves:
    """Mixin for a Lightning FSDPStrategy (class AtomicX(AtomicShardedSaves, SomeFSDPStrategy)): sharded checkpoints
    replace the old directory as a whole.

    Local paths only; object-store paths (s3://, ...) and `state_dict_type: full` without a sharded directory at the
    target are saved by Lightning as before (full checkpoints go through the CheckpointIO, i.e. AtomicCheckpointIO).
    """

    _state_dict_type: str
    is_global_zero: bool
    broadcast: Callable[..., Any]
    barrier: Callable[..., None]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        parent: Any = super()
        if storage_options is not None or not _is_local_file_protocol(filepath):
            parent.save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # raises or uploads
            return
        target = Path(self.broadcast(filepath))
        if self._state_dict_type == "full" and not target.is_dir():
            parent.save_checkpoint(checkpoint, target)  # a file: AtomicCheckpointIO replaces it atomically
            return
        # A sharded directory, or a full file replacing one (Lightning would delete the directory first).
        tmp = Path(self.broadcast(temporary_path(target)))  # rank 0's pid names it: the same path on every rank
        if self.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(target)
            _remove(tmp)  # an earlier save of this same process that raised
        self.barrier("AtomicShardedSaves.save_checkpoint:prepared")
        parent.save_checkpoint(checkpoint, tmp)  # every rank writes its shard; the DCP writer fsyncs its files
        if self.is_global_zero and tmp.is_dir():
            _fsync_file(tmp / _METADATA_FILENAME)  # Lightning's meta.pt is a plain torch.save, never fsynced
            _fsync_dir(tmp)
        self.barrier("AtomicShardedSaves.save_checkpoint:written")  # every shard is on disk before the swap
        if self.is_global_zero:
            swap_into_place(tmp, target)
        self.barrier("AtomicShardedSaves.save_checkpoint:swapped")

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local_file_protocol(checkpoint_path):
            path = Path(self.broadcast(checkpoint_path))
            if self.is_global_zero:
                remove_stale_temporaries(path)  # a swap killed between its renames: the old directory comes back
            self.barrier("AtomicShardedSaves.load_checkpoint:recovered")
        parent: Any = super()
        return parent.load_checkpoint(checkpoint_path, weights_only=weights_only)
