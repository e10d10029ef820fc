"""Golden loss curves: each task's fixed-seed tiny CPU run must reproduce its stored per-step training losses.

A failure means a change altered the numerics (backbone, task, data pipeline, optimizer schedule). If that is
intended, regenerate with `python scripts/golden_curves.py` and commit tests/golden/*.json.
"""

import warnings

import pytest
from golden.curves import RUNS, compare, read_golden, run_curve


@pytest.mark.parametrize("task", list(RUNS))
def test_golden_curve(task: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging is noise here
        losses = run_curve(task)
    problem = compare(task, losses, read_golden(task))
    if problem:
        pytest.fail(problem, pytrace=False)


def test_compare_names_the_step_and_the_command() -> None:
    assert compare("lm", [1.0, 2.0], [1.0, 2.0]) is None
    assert compare("lm", [1.0, 2.0 + 1e-7], [1.0, 2.0]) is None  # within tolerance
    message = compare("lm", [1.0, 2.01], [1.0, 2.0])
    assert message is not None and "step 1" in message and "python scripts/golden_curves.py" in message
    assert "regenerate" in (compare("lm", [1.0], [1.0, 2.0]) or "")
