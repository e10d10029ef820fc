"""Test-wide environment: offline hubs and W&B, set before anything imports datasets or wandb."""

import os
import warnings

# The hub libraries read these at import time: without them a hub name retries for ~23 s instead of failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port: nothing can leave the machine
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

warnings.filterwarnings("ignore", message="The srun command is available")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep wandb's and HF's caches out of the user's home."""
    base = tmp_path_factory.getbasetemp()
    # An in-process wandb run leaves WANDB_SERVICE set; later CLI subprocesses would join that run's service.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    for var, sub in [
        ("WANDB_DIR", "wandb"),
        ("WANDB_CACHE_DIR", "wandb-cache"),
        ("WANDB_CONFIG_DIR", "wandb-config"),
        ("WANDB_DATA_DIR", "wandb-data"),
    ]:
        monkeypatch.setenv(var, str(base / sub))
