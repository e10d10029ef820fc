"""Checkpoint files that are never half-written and never unpickle code: the bytes-on-disk layer under Lightning's
CheckpointIO (`polyformer.checkpointing.io`) and `load_task` (`polyformer.checkpointing.loading`).

Reading: `torch.load(weights_only=True)` always (`read_checkpoint`, `load_checkpoint`), so a checkpoint crafted to
run code when unpickled is refused with a clear message instead of being trusted.

Writing a file (`atomic_torch_save`): the checkpoint is written to a temporary file in the same directory, flushed
to disk (fsync), and renamed over the target with `os.replace`, which is atomic on POSIX file systems. A process
killed at any moment (SIGKILL, node failure, a full disk) leaves either the previous complete file or the new
complete file, never a truncated `last.ckpt`; at worst a `<name>.tmp-<pid>` file is left behind, which the next save
in that directory removes.

Writing a directory (sharded FSDP checkpoints, `write_directory_atomically` and `AtomicShardedSaves`): it is filled
under a temporary sibling name and `swap_into_place` puts it at the target: an atomic exchange of the two paths where
the file system has one (Linux `renameat2(RENAME_EXCHANGE)`: the target is the complete old or the complete new
directory at every instant), then deletes the old one. Elsewhere it is two renames (old away to `<name>.old-<pid>`,
new in); a kill between them leaves the complete old directory under that name, which the next save (or load) in
that directory puts back (`remove_stale_temporaries`), as it removes temporaries that killed saves left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    pass


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` with one clear error per way a file can be wrong. Never unpickles objects:
    a file that holds anything but tensors and plain values (e.g. a pickle crafted to run code) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # torch's older, non-zip format cannot be mapped: read it whole instead
            return read_checkpoint(path, map_location)
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, which could run code "
            f"when unpickled ({_first_line(e)}). Only load checkpoints from sources you trust."
        ) from None
    except (EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _first_line(e: BaseException) -> str:
    # torch's unpickling errors run to a page of advice about weights_only=False, which is exactly what not to do;
    # the one line worth showing names the refused object ("Unsupported global: GLOBAL io.open ...").
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    named = [line for line in lines if "WeightsUnpickler error" in line]
    return (named or lines or [type(e).__name__])[0].split(". Please use")[0][:300]


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a Lightning checkpoint without unpickling arbitrary objects (mmap: map the tensors, don't read them)."""
    ckpt = read_checkpoint(path, mmap=mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


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


def remove_path(path: Path) -> None:
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
            remove_path(tmp)
    for old in path.parent.glob(f"{prefix}{OLD_MARK}*"):
        if _left_by_dead_process(old, OLD_MARK):
            if os.path.lexists(path):
                remove_path(old)
            else:
                os.rename(old, path)


def fsync_dir(directory: Path) -> None:
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
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
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
        remove_path(new)  # holds the old one now
    else:
        old = target.with_name(f"{target.name}{OLD_MARK}{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        remove_path(old)
    fsync_dir(target.parent)


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> None:
    """`write(directory)` fills a fresh temporary directory, which then replaces `target` as a whole (one process;
    `AtomicShardedSaves` does the same with every rank writing)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_path(target)
    remove_path(tmp)  # an earlier save of this same process that raised
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
    except BaseException:
        remove_path(tmp)
        raise
    swap_into_place(tmp, target)
