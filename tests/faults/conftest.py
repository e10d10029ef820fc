"""Fixtures of the fault tests: a tiny language-model config on the built-in corpus (byte tokenizer, one small
block), a token cache shared by the whole session, and the CLI run as a subprocess with tests/ on PYTHONPATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from faults.support import TINY_LM
from helpers import ROOT, run_cli

from polyformer.cli import main


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("polyformer-cache")


@pytest.fixture
def cli_env(token_cache) -> dict[str, str]:
    return {
        "POLYFORMER_CACHE": str(token_cache),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """In-process CLI runs: relative outputs (ckpts/) land in tmp_path, and pytest's own arguments are not
    mistaken for the CLI's (LightningCLI warns when sys.argv and args both carry arguments)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["polyformer"])


def write_tiny_lm_config(path: Path, cache: Path, **changes) -> Path:
    """The tiny LM config with `changes` merged in (dotted keys), its token cache in `cache`."""
    config = yaml.safe_load(yaml.safe_dump(TINY_LM))
    config["data"]["init_args"]["cache_dir"] = str(cache)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_lm_config(tmp_path, token_cache):
    """Write the tiny LM config (with `changes` merged in, dotted keys) to tmp_path/name and return its path."""

    def write(name: str = "tiny.yaml", **changes) -> Path:
        return write_tiny_lm_config(tmp_path / name, token_cache, **changes)

    return write


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory, token_cache) -> Path:
    """A real checkpoint of the tiny language model: 2 steps of `polyformer fit` (run in this process)."""
    work = tmp_path_factory.mktemp("lm-ckpt")
    config = write_tiny_lm_config(work / "tiny.yaml", token_cache, **{"trainer.max_steps": 2})
    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(work)
    sys.argv = ["polyformer"]
    try:
        assert main(["fit", "--config", str(config)]) == 0
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    return work / "ckpts" / "last.ckpt"


@pytest.fixture
def polyformer(tmp_path, cli_env):
    """Run the CLI in tmp_path as a user would; returns the CompletedProcess."""

    def run(*args: str, timeout: int = 300, env: dict | None = None):
        return run_cli(list(args), cwd=tmp_path, timeout=timeout, env={**cli_env, **(env or {})})

    return run
