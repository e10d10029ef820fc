"""Run as a subprocess: a checkpoint-directory save into `TARGET` (see `write_directory_atomically`) that dies.

`die-writing TARGET`: the writer has written one complete file and half of another when the process is killed
(`os._exit`, no clean-up, as SIGKILL).
`die-swapping TARGET`: the file system cannot exchange two paths atomically, and the process dies between the two
renames of the fallback (the old directory moved away, the new one not yet in place).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from polyformer.checkpointing import files


def write_new(directory: Path) -> None:
    (directory / "shard-0").write_text("new 0")
    with open(directory / "shard-1", "w") as f:
        f.write("ne")
        f.flush()
        if sys.argv[1] == "die-writing":
            os._exit(3)
        f.write("w 1")


def main(mode: str, target: Path) -> None:
    if mode == "die-swapping":
        files._rename_exchange = lambda a, b: False  # type: ignore[assignment]
        real_rename, calls = os.rename, []

        def rename(src: object, dst: object) -> None:
            calls.append(src)
            if len(calls) == 2:  # the second rename of the swap: the new directory into place
                os._exit(4)
            real_rename(src, dst)  # type: ignore[arg-type]

        os.rename = rename  # type: ignore[assignment]
    files.write_directory_atomically(target, write_new)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
