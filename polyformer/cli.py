"""The `polyformer` command: LightningCLI's fit / validate / test / predict, plus task verbs.

Subclass mode: a YAML file picks the task (`model.class_path`) and the data (`data.class_path`); several
`--config` files compose and dotted flags override (`--model.backbone.depth=12`).
"""

from __future__ import annotations

import importlib
import os
import sys

VERBS = {
    "generate": ("polyformer.commands.generate", "continue prompts with a language-model checkpoint"),
    "translate": ("polyformer.commands.translate", "translate lines with a translation checkpoint"),
    "classify": ("polyformer.commands.classify", "print the top classes of image files with a ViT checkpoint"),
    "score": ("polyformer.commands.score", "score images against texts with a CLIP checkpoint"),
}

DESCRIPTION = "polyformer: one transformer backbone for language modelling, translation, ViT and CLIP.\n\n" + (
    "Task verbs (each has its own --help):\n" + "\n".join(f"  {verb:<10} {doc}" for verb, (_, doc) in VERBS.items())
)


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("POLYFORMER_DEBUG", "") not in ("", "0")


def run_lightning_cli(argv: list[str] | None) -> None:
    """argv None = sys.argv: Lightning's DDP launcher re-runs sys.argv for the other ranks, so it must stay intact."""
    from argparse import RawDescriptionHelpFormatter

    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from polyformer.tasks.base import TaskModule

    LightningCLI(
        TaskModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "formatter_class": RawDescriptionHelpFormatter},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    from_sys = argv is None
    if from_sys and "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["POLYFORMER_DEBUG"] = "1"  # inherited by the DDP ranks Lightning launches from sys.argv
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(args)
    args = [a for a in args if a != "--debug"]
    try:
        if args and args[0] in VERBS:
            return importlib.import_module(VERBS[args[0]][0]).main(args[1:]) or 0
        run_lightning_cli(None if from_sys else args)
        return 0
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as e:
        if debug:
            raise
        # One readable line instead of a traceback; --debug or POLYFORMER_DEBUG=1 shows the traceback.
        print(f"polyformer: error: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
