"""What a task writes into its checkpoints beside Lightning's own keys, how a checkpoint is checked against the task
that loads it, and how older checkpoints are brought up to the current format.

A task's checkpoint holds `polyformer: {format, task, hyper_parameters}` (and Lightning's `hyper_parameters`, the
same values): the task's import path and its constructor arguments as plain dicts, lists and strings, so that
`load_task` can rebuild it and `torch.load(weights_only=True)` can read it.

`CHECKPOINT_FORMAT` is the version of what a checkpoint's contents mean. `upgrade` turns a checkpoint of an older
format into the current one, in memory, before Lightning or `load_task` reads it (`AtomicCheckpointIO` and
`load_task` call it): one step per format, each saying what changed, so a checkpoint written by an older polyformer
still loads and resumes. tests/fixtures/format1/ holds checkpoints of format 1 written by that code.

- 1 -> 2: the language model's metrics took the slash names every other task uses (`val_loss` -> `val/loss`, ...).
  Lightning keys the saved state of a callback that monitors a metric (ModelCheckpoint, EarlyStopping) by that
  metric's name, so without the rename a resumed run warns and its checkpoint callback starts with no best score.
  (Optimizer groups without `param_names`, another format-1 difference, load as they are.)
- 2 -> 3: tasks hold their network as `self.model` (a `polyformer.models` module), so every weight's key gained
  the prefix `model.` (`embed.weight` -> `model.embed.weight`), in the state dict and in the optimizer groups'
  `param_names`. Format 2 task state dicts held only the network's weights (metric states are not persistent).
  CLIP checkpoints written before its logit scale became a (1,) parameter (FSDP shards no 0-d parameters) get it
  reshaped here, so every reader sees it: `load_task`, `--ckpt_path` and `init_from=<.ckpt>` alike.
"""

from __future__ import annotations

from typing import Any, Protocol

from polyformer.checkpointing.files import CheckpointError
from polyformer.plain_data import flatten, to_primitive


class TaskModule(Protocol):
    """What this module reads of a task (`polyformer.tasks.base.TaskModule` has it): described here rather than
    imported, because the tasks import this module."""

    hparams: Any
    architecture_hparams: tuple[str, ...]
    not_architecture: tuple[str, ...]


CHECKPOINT_FORMAT = 3


def task_path(task: TaskModule | type) -> str:
    """The import path that names a task class in checkpoints: `polyformer.tasks.language_model.LanguageModel`."""
    cls = task if isinstance(task, type) else type(task)
    return f"{cls.__module__}.{cls.__qualname__}"


def write_metadata(task: TaskModule, checkpoint: dict[str, Any]) -> None:
    """Put the task's hyperparameters (as plain values) and polyformer's metadata into a checkpoint being saved."""
    hp = to_primitive(dict(task.hparams))
    checkpoint["hyper_parameters"] = hp
    checkpoint["polyformer"] = {"format": CHECKPOINT_FORMAT, "task": task_path(task), "hyper_parameters": hp}


def check_compatible(task: TaskModule, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint of another task or architecture with the mismatching field named."""
    meta = checkpoint.get("polyformer")
    if meta is None:
        raise ValueError("this is not a polyformer checkpoint (no 'polyformer' metadata); was it made by polyformer?")
    ours = task_path(task)
    if meta["task"] != ours:
        raise ValueError(f"the checkpoint is a {meta['task'].rsplit('.', 1)[-1]}, not a {type(task).__name__}")
    theirs = flatten(meta["hyper_parameters"])
    mine = flatten(to_primitive(dict(task.hparams)))
    for key in sorted(theirs.keys() | mine.keys()):
        if not key.startswith(task.architecture_hparams) or mine.get(key) is None:
            continue
        if key.rsplit(".", 1)[-1] in task.not_architecture or key not in theirs:
            continue  # a field newer than the checkpoint: it was saved with that field's default behaviour
        if theirs.get(key) != mine.get(key):
            raise ValueError(
                f"checkpoint does not fit this model: {key} is {theirs.get(key)!r} in the checkpoint but "
                f"{mine.get(key)!r} in the config; use the checkpoint's value or start without it"
            )


_LM = "polyformer.tasks.language_model.LanguageModel"
_LM_METRICS_1 = {f"{split}_{name}": f"{split}/{name}" for split in ("train", "val") for name in ("loss", "ppl", "bpb")}


def _from_1(checkpoint: dict[str, Any]) -> None:
    callbacks = checkpoint.get("callbacks")
    if checkpoint["polyformer"].get("task") != _LM or not isinstance(callbacks, dict):
        return
    for key in list(callbacks):
        for old, new in _LM_METRICS_1.items():
            if f"'monitor': '{old}'" in key:  # state_key of ModelCheckpoint / EarlyStopping: "Name{'monitor': ...}"
                state = callbacks.pop(key)
                if isinstance(state, dict) and state.get("monitor") == old:
                    state["monitor"] = new
                callbacks[key.replace(f"'monitor': '{old}'", f"'monitor': '{new}'")] = state
                break


_CLIP = "polyformer.tasks.contrastive.CLIP"


def _from_2(checkpoint: dict[str, Any]) -> None:
    if "state_dict" in checkpoint:
        state = {f"model.{k}": v for k, v in checkpoint["state_dict"].items()}
        scale = state.get("model.logit_scale")
        if checkpoint["polyformer"].get("task") == _CLIP and scale is not None and scale.ndim == 0:
            state["model.logit_scale"] = scale.reshape(1)  # format 1's CLIP stored a scalar; FSDP needs shape (1,)
        checkpoint["state_dict"] = state
    for optimizer in checkpoint.get("optimizer_states", []):
        for group in optimizer.get("param_groups", []):
            if "param_names" in group:
                group["param_names"] = [f"model.{n}" for n in group["param_names"]]


_UPGRADES = {1: _from_1, 2: _from_2}  # format -> the step that makes it format + 1


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint in the current format (changed in place and returned). A checkpoint of a newer format than this
    code knows is refused, since its contents may mean something else; one without polyformer metadata is left as
    it is (`check_compatible` says so where it matters)."""
    meta = checkpoint.get("polyformer")
    if not isinstance(meta, dict):
        return checkpoint
    version = meta.get("format", 1)
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"the checkpoint has polyformer format {version!r}; this polyformer reads formats 1 to "
            f"{CHECKPOINT_FORMAT}: use a newer polyformer to load it"
        )
    for step in range(version, CHECKPOINT_FORMAT):
        _UPGRADES[step](checkpoint)
    meta["format"] = CHECKPOINT_FORMAT
    return checkpoint
