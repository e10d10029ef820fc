"""Loggers that write into the run directory, and Weights & Biases logging that is safe in batch jobs and continues
runs across resumes.

Every run writes into one directory, `<trainer.default_root_dir>/version_N` (`polyformer.callbacks.run_directory`):
the loggers here leave `save_dir` unset (None) and are placed there when training sets up. `TensorBoard` and `CSV`
are Lightning's `TensorBoardLogger` and `CSVLogger` with that default and no experiment-name level (`name=""`); given
a `save_dir`, they behave exactly as Lightning's. (Other names than Lightning's: `--trainer.logger=CSVLogger` must
keep naming one class.)

`WandbLogger` is Lightning's logger with three changes:
- with no W&B credentials (no `WANDB_API_KEY`, identity token or netrc entry) and no `WANDB_MODE`, the run goes
  offline instead of prompting for a login or failing, and says once where the run lives and how to upload it;
- the run starts when something is first logged, not when Lightning sets up, so `RunMetadata` can hand it the run
  id stored in the checkpoint being resumed (a requeued SLURM job continues its run instead of starting a new one);
- the full resolved CLI config becomes the run's config.

`RunMetadata` is the callback that carries that state: it stores the W&B run id and the resolved config in every
checkpoint (plain values, so checkpoints still load with `torch.load(weights_only=True)`) and restores the id on
resume. It does nothing harmful with other loggers or none.
"""

from __future__ import annotations

import netrc
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning.pytorch as pl
import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.logger import _convert_params, _sanitize_callable_params
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

_OFFLINE_MODES = ("offline", "dryrun")


def has_wandb_credentials() -> bool:
    """True when wandb could log in without a prompt: an API key, an identity token file, or a netrc entry for the
    server. Checked by hand (not by `wandb.login`) because wandb's own check prompts when a terminal is attached."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def new_run_id() -> str:
    """Eight lowercase letters and digits, the form of the ids wandb makes itself."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class _Unplaced:
    """Stands in for a logger's writer until the run directory is known. Lightning touches `logger.experiment` before
    any callback's `setup` (`_call_setup_hook`), which would make the writer, and its directory, at the placeholder.
    Used for anything else, it places the logger in the working directory (Lightning's own default root): a Trainer
    built without the CLI's `RunDirectory` callback still logs."""

    def __init__(self, logger: _Placeable) -> None:
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        self._logger.place(os.getcwd())
        return getattr(self._logger.experiment, name)


class _Placeable:
    """What TensorBoard and CSV add to Lightning's loggers: without a save_dir they wait for `place` (the run
    directory) and hand out an `_Unplaced` stand-in until then. Mixed in before the Lightning class."""

    placed: bool
    _version_arg: int | str | None

    def place(self, root: str | Path, version: str | None = None) -> None:
        """Write under `root` (as `version`, when given) instead of the placeholder; called before the first write."""
        self._root_dir = os.fspath(root)
        if hasattr(self, "_save_dir"):  # Lightning's CSVLogger keeps the root a second time
            self._save_dir = self._root_dir
        self._fs = get_filesystem(self._root_dir)
        self._version = version if version is not None else self._version_arg
        self._experiment = None  # made on first use, in the placed directory
        self.placed = True

    @property
    def experiment(self) -> Any:
        return super().experiment if self.placed else _Unplaced(self)  # type: ignore[misc]


class TensorBoard(_Placeable, LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, by default in the run directory (`<default_root_dir>/version_N`).

    Args:
        save_dir: None = `trainer.default_root_dir`, resolved when training sets up; a path = Lightning's behaviour
            (`<save_dir>/<name>/version_N`).
        name: a level between save_dir and version_N; empty by default, so the run directory is `.../version_N`.
        default_hp_metric: Lightning's placeholder `hp_metric = -1`; off, since it only clutters the dashboard.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = False,
        prefix: str = "",
        sub_dir: str | None = None,
    ) -> None:
        self.placed, self._version_arg = save_dir is not None, version
        super().__init__(save_dir or ".", name, version, log_graph, default_hp_metric, prefix, sub_dir)


class CSV(_Placeable, LightningCSVLogger):
    """Lightning's CSV logger (`metrics.csv`, `hparams.yaml`), by default in the run directory; see TensorBoard.

    Args:
        save_dir: None = `trainer.default_root_dir`, resolved when training sets up; a path = Lightning's behaviour.
        name: a level between save_dir and version_N; empty by default.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        self.placed, self._version_arg = save_dir is not None, version
        super().__init__(save_dir or ".", name, version, prefix, flush_logs_every_n_steps)


class _PendingRun:
    """Stands in for the W&B run until something uses it; the first attribute access starts the real run. Lightning
    touches `logger.experiment` during setup, before the checkpoint to resume is read: starting the run there would
    fix its id too early."""

    def __init__(self, logger: WandbLogger) -> None:
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger.start_run(), name)


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger` with automatic offline mode, run continuation from checkpoints and the CLI config.

    Args:
        offline: True = offline, False = online (wandb may then ask for a login), None = online if credentials exist,
            else offline. `WANDB_MODE` in the environment (offline, online, disabled) wins over None.
        log_model: checkpoints as W&B artifacts (True: the best and last at the end, "all": every save); offline
            runs keep them with the run and `wandb sync` uploads them.
        save_dir: None = the run directory (`<default_root_dir>/version_N`, the files in its `wandb/`), resolved
            when training sets up; a path = W&B's files there.
    """

    def __init__(
        self,
        project: str = "polyformer",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        save_dir: str | None = None,
        id: str | None = None,
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        prefix: str = "",
        checkpoint_name: str | None = None,
    ) -> None:
        env_mode = os.environ.get("WANDB_MODE", "").lower()
        if offline is None:
            self.auto_offline = not env_mode and not has_wandb_credentials()
            offline = self.auto_offline or env_mode in _OFFLINE_MODES
        else:
            self.auto_offline = False
        # Always explicit: wandb reads WANDB_MODE only once per process, so a later change of it would be missed.
        mode = "disabled" if env_mode == "disabled" else "offline" if offline else "online"
        extra = {
            k: v for k, v in dict(entity=entity, group=group, tags=tags, notes=notes, job_type=job_type).items() if v
        }
        # An id chosen now (not by wandb.init) names the checkpoint folder Lightning derives from the logger's version
        # before the run starts; RunMetadata replaces it with the checkpoint's id on resume.
        self.placed = save_dir is not None
        super().__init__(
            name=name,
            save_dir=save_dir or ".",
            id=id or new_run_id(),
            project=project,
            log_model=log_model,
            prefix=prefix,
            checkpoint_name=checkpoint_name,
            mode=mode,
            **extra,
        )
        self._wandb_init.pop("anonymous", None)  # Lightning passes it; wandb >= 0.19 warns that it does nothing

    def place(self, run_dir: str | Path) -> None:
        """Write the W&B files into `run_dir/wandb/` instead of the placeholder; called before the run starts."""
        if self._experiment is not None:
            raise RuntimeError(f"the W&B run has already started in {self._save_dir}; it cannot move to {run_dir}")
        self._save_dir = self._wandb_init["dir"] = os.fspath(run_dir)
        self.placed = True

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        return self._experiment if self._experiment is not None else _PendingRun(self)

    @property
    def started(self) -> bool:
        return self._experiment is not None

    def start_run(self) -> Any:
        """Start the W&B run now (on rank 0); the first use of `experiment` calls this."""
        if self._experiment is None:
            run = LightningWandbLogger.experiment.fget(self)  # type: ignore[attr-defined]
            if getattr(run.settings, "mode", None) in _OFFLINE_MODES or getattr(run.settings, "_offline", False):
                run_dir = Path(run.dir).parent.resolve()  # .../wandb/offline-run-<time>-<id>; run.dir is its files/
                why = "no W&B credentials found" if self.auto_offline else "W&B is offline"
                print(f"polyformer: {why}; the run is saved in {run_dir}\n  upload it with: wandb sync {run_dir}",
                      file=sys.stderr)  # fmt: skip
        return self._experiment

    def continue_run(self, run_id: str) -> bool:
        """Make the run (not started yet) continue W&B run `run_id`. False if another run has already started."""
        if self._experiment is not None:
            return self._experiment.id == run_id
        self._id = self._wandb_init["id"] = run_id
        self._wandb_init["resume"] = "allow"
        return True

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Any) -> None:
        # Held for wandb.init while the run has not started: logging them must not start the run before the
        # checkpoint has been read (strategies such as FSDP restore after Lightning logs the hyperparameters).
        if self._experiment is None:
            params = _sanitize_callable_params(_convert_params(params))
            self._wandb_init["config"] = {**self._wandb_init.get("config", {}), **params}
        else:
            super().log_hyperparams(params)

    def set_config(self, config: dict[str, Any]) -> None:
        """The run's config: passed to wandb.init, or merged into a run already started."""
        if self._experiment is None:
            self._wandb_init["config"] = {**self._wandb_init.get("config", {}), **config}
        else:
            self._experiment.config.update(config, allow_val_change=True)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_id"] = state.get("_id") or self._id  # ddp_spawn workers keep the chosen id of a run not started
        return state


def resolved_config(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The config LightningCLI resolved (what `--print_config` prints) as plain data; None outside the CLI."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, SaveConfigCallback):
            return yaml.safe_load(cb.parser.dump(cb.config, skip_none=False))
    return None


def wandb_loggers(trainer: pl.Trainer) -> list[LightningWandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, LightningWandbLogger)]


class RunMetadata(Callback):
    """Saves the resolved config and the W&B run id in every checkpoint; on resume the W&B run continues."""

    def __init__(self) -> None:
        self.config: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.config = resolved_config(trainer)
        for lg in wandb_loggers(trainer):
            if isinstance(lg, WandbLogger) and not lg.started:
                # Every rank adopts rank 0's id, so all derive the same checkpoint folder from it.
                lg.continue_run(trainer.strategy.broadcast(lg.version))
                if self.config is not None:
                    lg.set_config(self.config)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.config is not None:
            checkpoint["config"] = self.config
        loggers = wandb_loggers(trainer)
        if loggers:
            lg = loggers[0]
            checkpoint["wandb"] = {"run_id": str(lg.version), "project": lg.name}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        run_id = (checkpoint.get("wandb") or {}).get("run_id")
        if not run_id:
            return
        for lg in wandb_loggers(trainer):
            old = lg.version
            if not isinstance(lg, WandbLogger) or not lg.continue_run(run_id):
                rank_zero_warn(
                    f"the W&B run had already started as {old}; it cannot continue the checkpoint's run {run_id}"
                )
                continue
            # Lightning named the default checkpoint folder after the id chosen before the checkpoint was read.
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath).parent.name == old:
                    cb.dirpath = str(Path(cb.dirpath).parent.with_name(run_id) / Path(cb.dirpath).name)
