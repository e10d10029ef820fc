"""The `polyformer` command: LightningCLI's fit / validate / test / predict, plus task verbs.

Subclass mode: a YAML file picks the task (`model.class_path`) and the data (`data.class_path`); several
`--config` files compose and dotted flags override (`--model.backbone.depth=12`).

Every run from here gets, whatever the presets say: atomic checkpoint writes and weights-only loads
(`polyformer.checkpointing.io`), and the callbacks in `ALWAYS_ON`, each configurable as `--<name>.<arg>`.
Mistakes in the config or on the command line end in one short message before anything trains.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import textwrap
import typing
import warnings
from pathlib import Path
from typing import Any

VERBS = {
    "generate": ("polyformer.commands.generate", "continue prompts with a language-model checkpoint"),
    "translate": ("polyformer.commands.translate", "translate lines with a translation checkpoint"),
    "classify": ("polyformer.commands.classify", "print the top classes of image files with a ViT checkpoint"),
    "score": ("polyformer.commands.score", "score images against texts with a CLIP checkpoint"),
    "export": (
        "polyformer.commands.export",
        "write a checkpoint's model as safetensors, transformers, timm, open_clip or ONNX",
    ),
    "report": ("polyformer.commands.report", "render a run directory's curves, media and config as one HTML page"),
}

# Callbacks registered for every run, by config key: `--guards.on_nonfinite=skip`. One line per callback.
ALWAYS_ON = {
    "run_directory": "polyformer.callbacks.run_directory.RunDirectory",  # first: the others write into it
    "guards": "polyformer.callbacks.guards.TrainingGuards",
    "rng_state": "polyformer.checkpointing.rng.RNGState",  # before slurm_requeue: snapshot, then the HPC save
    "slurm_requeue": "polyformer.callbacks.slurm_requeue.SlurmRequeue",
    "run_metadata": "polyformer.loggers.RunMetadata",
    "stats": "polyformer.callbacks.stats.TrainingStats",
    "lr": "polyformer.callbacks.stats.LearningRate",
    "media": "polyformer.callbacks.media.TaskMedia",
    "summary": "polyformer.callbacks.run_summary.RunSummary",
}

DESCRIPTION = "polyformer: one transformer backbone for language modelling, translation, ViT and CLIP.\n\n" + (
    "Task verbs (each has its own --help):\n" + "\n".join(f"  {verb:<10} {doc}" for verb, (_, doc) in VERBS.items())
)


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("POLYFORMER_DEBUG", "") not in ("", "0")


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_cli_class() -> type:
    """PolyformerCLI, built on first use so that `polyformer generate` does not pay for importing Lightning's CLI."""
    from argparse import ArgumentError

    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

    from polyformer.checkpointing.io import with_atomic_checkpoint_io

    class StrictParser(LightningArgumentParser):
        """No prefix matching, also in the parsers jsonargparse builds for class_path arguments (it makes them of
        the parent's type): a typo such as `--model.backbone.dept=2` must not silently mean `depth`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

    class SaveRunConfig(SaveConfigCallback):
        """LightningCLI's config.yaml, in the run directory also when the run has no logger (Lightning then writes it
        to `default_root_dir`, shared by every run there)."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            from polyformer.callbacks.run_directory import RunDirectory

            run_dir = next((cb.run_dir for cb in trainer.callbacks if isinstance(cb, RunDirectory)), None)
            if self.already_saved or trainer.loggers or run_dir is None:
                return super().setup(trainer, pl_module, stage)
            if trainer.is_global_zero:
                path = str(run_dir / self.config_filename)
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            self.already_saved = trainer.strategy.broadcast(True)

    class PolyformerCLI(LightningCLI):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parser_class", StrictParser)
            kwargs.setdefault("save_config_callback", SaveRunConfig)
            super().__init__(*args, **kwargs)

        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
            # Raise ArgumentError instead of printing the whole usage and exiting: `main` prints one line.
            kwargs.setdefault("exit_on_error", False)
            return super().init_parser(**kwargs)

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as e:
                argv = list(args if args is not None else sys.argv[1:])
                sub = next((a for a in argv if a in self.subcommands()), None)
                raise ConfigError(explain_config_error(e, self._subcommand_parsers.get(sub, parser), argv)) from e

        def before_instantiate_classes(self) -> None:
            # Checked here, before the model and data are built: Lightning only finds out when a logger first writes.
            root = self._get(self.config, "trainer", default={}).get("default_root_dir")
            if root is not None:
                check_directory("trainer.default_root_dir", root)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except ValueError as e:  # a constructor's check (TransformerConfig, a data module, ...) inside a wrapper
                raise ConfigError(explain_config_error(e, None)) from e

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            for name, class_path in ALWAYS_ON.items():
                parser.add_lightning_class_args(_import(class_path), name)

        def _parse_ckpt_path(self) -> None:
            # Lightning's version reads the checkpoint's hyperparameters into the model config, so a checkpoint of
            # another architecture would silently replace the one the user asked for. Instead, only check early that
            # the file is a safe, readable checkpoint; TaskModule.on_load_checkpoint then names any mismatching field.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path == "last":
                ckpt_path = self._latest_run_checkpoint(subcommand) or ckpt_path
                self.config[subcommand]["ckpt_path"] = ckpt_path
            if ckpt_path and os.path.isfile(ckpt_path):
                from polyformer.checkpointing.files import load_checkpoint

                load_checkpoint(ckpt_path, mmap=True)  # mmap: tensors are not read, only the structure is checked
                # Through `latest` the path would name the new run's directory once the run sets up: fix it now.
                self.config[subcommand]["ckpt_path"] = os.path.realpath(ckpt_path)

        def _latest_run_checkpoint(self, subcommand: str) -> str | None:
            """`--ckpt_path last`: the last checkpoint of the newest run, `<default_root_dir>/latest/checkpoints`.
            Lightning would look in this run's own checkpoint folder, which is new and empty (one directory per run),
            unless a checkpoint callback pins a `dirpath`: then Lightning's own lookup is left to find it."""
            trainer = self.config[subcommand].get("trainer") or {}
            callbacks = trainer.get("callbacks") or []
            for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
                init_args = cb.get("init_args") if hasattr(cb, "get") else None  # a Namespace or dict from the config
                if init_args is not None and init_args.get("dirpath"):
                    return None
            root = trainer.get("default_root_dir") or os.getcwd()
            last = Path(root) / "latest" / "checkpoints" / "last.ckpt"  # a folder for sharded (FSDP) checkpoints
            return os.path.realpath(last) if last.exists() else None

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            from lightning.pytorch.callbacks import ProgressBar

            from polyformer.callbacks.progress import StepProgressBar
            from polyformer.loggers import TensorBoard

            config = self._get(self.config_init, "trainer", default={})
            # Merged here, not via trainer_defaults: a preset setting trainer.plugins would replace a default.
            kwargs["plugins"] = with_atomic_checkpoint_io(kwargs.get("plugins", config.get("plugins")))
            if config.get("logger") in (None, True):  # Lightning's default, but in the run directory
                kwargs["logger"] = TensorBoard()
            if config.get("enable_model_summary") is None:  # RunSummary prints the size (tied weights once)
                kwargs["enable_model_summary"] = False
            given = config.get("callbacks") or []
            callbacks = list(given) if isinstance(given, (list, tuple)) else [given]
            wants_bar = config.get("enable_progress_bar") is not False
            if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, StepProgressBar()]
            return super().instantiate_trainer(**kwargs)

    return PolyformerCLI


# Lightning's start-up lines that say nothing about this run (an advertisement, accelerators it does not use: the
# run's own header names the device), and a deprecation inside Lightning that users cannot act on.
_QUIET_PREFIXES = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "Seed set to",
                   "Loading `train_dataloader` to estimate")  # fmt: skip
_QUIET_ENDINGS = ("` reached.",)  # "`Trainer.fit` stopped: `max_steps=600` reached.": the bar's last state says so
_QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"\s*skip_none parameter was deprecated")


class _QuietStartup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg).rpartition("] ")[2]  # "[rank: 1] Seed set to 0"
        return not (text.startswith(_QUIET_PREFIXES) or text.endswith(_QUIET_ENDINGS))


def quiet_startup() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed"):  # fmt: skip
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietStartup) for f in logger.filters):
            logger.addFilter(_QuietStartup())
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def run_lightning_cli(argv: list[str] | None) -> None:
    """argv None = sys.argv: Lightning's DDP launcher re-runs sys.argv for the other ranks, so it must stay intact."""
    from argparse import RawDescriptionHelpFormatter

    import lightning as L

    from polyformer.tasks.base import TaskModule

    quiet_startup()
    make_cli_class()(
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
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        # One readable line instead of a traceback; --debug or POLYFORMER_DEBUG=1 shows the traceback.
        # One write, so that the lines of several DDP ranks failing together do not interleave.
        sys.stderr.write(f"polyformer: error: {describe_error(e)}\n(run with --debug for the traceback)\n")
        sys.stderr.flush()
        return 1


class ConfigError(ValueError):
    """A mistake in the config or on the command line, already phrased for the user."""


def is_user_error(e: BaseException) -> bool:
    from argparse import ArgumentError

    # RuntimeError covers NonFiniteLossError and out-of-memory; anything else unexpected keeps its traceback.
    return isinstance(e, (ValueError, FileNotFoundError, ConnectionError, RuntimeError, ArgumentError))


def describe_error(e: BaseException) -> str:
    hint = getattr(e, "polyformer_hint", None)  # set by the guards callback on out-of-memory errors in training
    # Out of memory is a RuntimeError raised by torch: without torch loaded it cannot be one, and importing the
    # guards (torch, Lightning) would add seconds to a one-line error of a light verb such as `report`.
    if hint is None and isinstance(e, RuntimeError) and "torch" in sys.modules:
        from polyformer.callbacks.guards import is_out_of_memory, out_of_memory_hint

        if is_out_of_memory(e):
            hint = out_of_memory_hint(None)
    return f"{hint} ({first_line(e)})" if hint else " ".join(str(e).split("\n")).strip()


def first_line(e: BaseException | str) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# ---- config errors: jsonargparse's nested messages -> "key: what is wrong; what is accepted" -----------------------
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_UNKNOWN = [
    re.compile(r"^unrecognized arguments: --([\w.]+)(?:=(.*))?"),
    re.compile(r"^Group '([\w.]+)' does not accept option '([\w.]+)'"),
    re.compile(r"^Option '([\w.]+)' is not accepted"),
    re.compile(r"^Subcommand '\w+' does not accept option '([\w.]+)'"),
    re.compile(r"^Key '([\w.]+)' is not expected"),
]
_EXPECTED = re.compile(r"^Expected an? (.+?)\. Got value: (.*)$", re.S)


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return seen


def _error_texts(error: BaseException) -> list[str]:
    """The messages from outermost to innermost. jsonargparse chains the first alternative of a union; where that one
    failed trivially ("Expected a <class 'str'>") and a class_path alternative failed for a reason, follow that."""
    texts = []
    for e in _chain(error):
        texts.append(str(e).strip())
        if "Does not validate against any of the Union subtypes" in texts[-1]:
            items = _union_items(texts[-1])
            reasons = [i for i in items if i.startswith("Problem with given class_path")]
            if reasons and items and re.fullmatch(r"Expected an? <class '[\w.]+'>", items[0]):
                rest = reasons[0].partition("\n")[2]
                return [*texts, reasons[0], textwrap.dedent(rest).strip()]
    return texts


def _union_items(text: str) -> list[str]:
    """The "- ..." entries under "Errors:" of a jsonargparse union message, each dedented."""
    block = text.split("Errors:\n", 1)[-1].split("\nGiven value type:", 1)[0]
    block = textwrap.dedent(block)
    return [textwrap.dedent(item).strip() for item in re.split(r"^- ", block, flags=re.M) if item.strip()]


def explain_config_error(error: BaseException, parser: Any, argv: list[str] | None = None) -> str:
    """One line naming the key, the value given and what is accepted, from jsonargparse's error chain. argv: the
    command line, to name the --config file a YAML error is in (jsonargparse's message does not)."""
    keys: list[str] = []  # "model", then "backbone.depth" inside the model's class
    class_path, unknown, value, literals = None, None, None, []
    texts = _error_texts(error)
    for text in texts:
        if m := _PARSER_KEY.match(text):
            if not keys or keys[-1] != m[1]:
                keys.append(m[1])
        elif m := _CLASS_PATH.match(text):
            class_path = m[1]
        if "Does not validate against any of the Union subtypes" in text:  # e.g. precision: several Literals
            subtypes = text.split("Subtypes:", 1)[1].split("\n", 1)[0]
            for group in re.findall(r"Literal\[([^\]]*)\]", subtypes):
                literals += [v for v in (v.strip(" '") for v in group.split(",")) if v not in literals]
            if value is None and (m := re.search(r"NestedArg\(key='[^']*', val='(.*)'\)", text)):
                value = m[1]
        for pattern in _UNKNOWN:
            if m := pattern.match(text):
                groups = [g for g in m.groups() if g is not None]
                if pattern is _UNKNOWN[1]:
                    unknown = f"{groups[0]}.{groups[1]}"
                else:
                    unknown, value = groups[0], (groups[1] if len(groups) > 1 else value)
    leaf = texts[-1]
    prefix = ".".join(keys)
    if unknown is not None:
        inside = keys[0] if keys and class_path else ""  # the key whose class_path the unknown key belongs to
        return _unknown_key(f"{inside}.{unknown}" if inside else unknown, unknown, value, class_path, parser)
    if class_path and re.search(r"No module named|has no attribute", leaf):
        return f"{prefix}.class_path: cannot import {class_path!r} ({first_line(leaf)})"
    if m := _EXPECTED.match(leaf):
        return f"{prefix}: {_expected(m[1], m[2].strip(), literals)}"
    text = " ".join(line.strip() for line in leaf.splitlines() if line.strip())
    if text.startswith("the following arguments are required:"):
        missing = ", ".join(k.split(".", 1)[-1] for k in text.split(":", 1)[1].split(","))
        return (
            f"missing required value(s): {missing}. Pass a preset, e.g. --config configs/lm/tiny.yaml, or set "
            "--model.class_path / --data.class_path (polyformer --help lists the commands)"
        )
    if m := re.match(r"argument subcommand: invalid choice: '([^']*)'", text):
        text += _did_you_mean(m[1], ["fit", "validate", "test", "predict", *VERBS])
    if text.startswith('expected "subcommand"'):
        text = f"no command given: use one of fit, validate, test, predict, or a task verb: {', '.join(VERBS)}"
    if any(str(e).startswith("Problems parsing config") for e in _chain(error)):
        fallback = "a --config file is not valid YAML: " + text.replace('"<unicode string>", ', "")
        text = _invalid_yaml(error, argv or []) or fallback
        if "could not determine a constructor" in text:
            text += " (configs are plain YAML: tags that build Python objects are refused)"
    return f"{prefix}: {text}" if prefix else text


def _invalid_yaml(error: BaseException, argv: list[str]) -> str | None:
    """The YAML mistake as `<file>: not valid YAML at line L, column C: <problem> (<context> at ...)`, or None where
    the file is not known (a config given inline as a string, or one from an environment variable)."""
    import yaml

    mistake = next((e for e in _chain(error) if isinstance(e, yaml.MarkedYAMLError)), None)
    if mistake is None:
        return None
    # jsonargparse reads each file and parses its text, so the error only says "<unicode string>". The files are
    # loaded in command-line order and the first broken one stops the parse: that is the first that fails here.
    # Syntax and tag errors do not depend on the loader, so safe_load finds the same one.
    path = None
    for candidate in _config_paths(argv):
        try:
            yaml.safe_load(Path(candidate).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            path = candidate
            break
        except (OSError, UnicodeDecodeError):
            continue
    if path is None:
        return None

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"  # marks count from 0; editors and PyYAML from 1

    where = f" at {at(mistake.problem_mark)}" if mistake.problem_mark else ""
    text = f"{path}: not valid YAML{where}: {mistake.problem or first_line(mistake)}"
    if mistake.context:
        text += f" ({mistake.context}{f' at {at(mistake.context_mark)}' if mistake.context_mark else ''})"
    return text


def _config_paths(argv: list[str]) -> list[str]:
    """The existing files given as `--config PATH` or `--config=PATH`, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.partition("=")[2])
    return [p for p in paths if os.path.isfile(p)]


def check_directory(key: str, path: str | os.PathLike) -> None:
    """A ConfigError unless `path` is a directory or can be made one. Lightning creates it (and missing parents) only
    when a logger or checkpoint first writes, and a file in the way then ends in a long traceback mid-setup."""
    text = os.fspath(path)
    if "://" in text:  # a remote location (s3://, gs://, ...): fsspec's business, not checkable here
        return
    existing = next((p for p in (Path(text), *Path(text).absolute().parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return
    if existing == Path(text):
        raise ConfigError(f"{key}: {text} is a file; it must be a directory (it is created if missing)")
    raise ConfigError(f"{key}: {text} must be a directory, but {existing} is a file")


def _expected(typ: str, got: str, literals: list[str]) -> str:
    choices = literals
    if not choices and "Literal[" in typ:
        choices = [v.strip(" '") for v in re.findall(r"Literal\[(.*)\]", typ)[0].split(",")]
    if choices:
        return f"{got!r} is not accepted; choose one of {', '.join(choices)}{_did_you_mean(got, choices)}"
    typ = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", typ)
    return f"expected {typ}, got {got!r}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, relative: str, value: str | None, class_path: str | None, parser: Any) -> str:
    """key: as the user would write it (model.backbone.widht); relative: within class_path's signature, if any."""
    group, name = key.rpartition(".")[0], key.rpartition(".")[2]
    accepted = _accepted_keys(relative.rpartition(".")[0] if class_path else group, class_path, parser)
    given = f" (given {value!r})" if value is not None else ""
    listing = f"; {group or 'the top level'} accepts: {', '.join(accepted)}" if accepted else ""
    return f"{key}: unknown key{given}{_did_you_mean(name, accepted)}{listing}"


def _accepted_keys(group: str, class_path: str | None, parser: Any) -> list[str]:
    """Names valid directly under `group`: from the task/data class's signature, else from the parser."""
    if class_path:
        try:
            cls: Any = _import(class_path)
        except (ImportError, AttributeError):
            return []
        for part in filter(None, group.split(".")):  # "backbone" -> the type of the model's `backbone` argument
            cls = _param_types(cls).get(part)
        return sorted(_param_types(cls)) if cls is not None else []
    if parser is None:
        return []
    prefix = f"{group}." if group else ""
    names = {a.dest[len(prefix) :].split(".")[0] for a in parser._actions if a.dest.startswith(prefix)}
    return sorted(n for n in names if n and n != "help")


def _param_types(cls: Any) -> dict[str, Any]:
    """Constructor parameters of a class (or fields of a dataclass) -> their type, with Optional unwrapped."""
    if not isinstance(cls, type):
        return {}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: still list the names
        hints = {}
    params = inspect.signature(cls.__init__).parameters
    out = {}
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(name)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if len(args) == 1 else hint
    return out


if __name__ == "__main__":
    sys.exit(main())
