"""Config and command-line mistakes end in one short line naming the key, the value and what is accepted, with a
non-zero exit code, before anything trains; `--debug` / POLYFORMER_DEBUG=1 bring the traceback back.

Most cases call `polyformer.cli.main` in this process (the same function the `polyformer` command runs; one start-up
instead of ten); the exit code, the missing traceback and `--debug` are checked on real subprocesses.
"""

from __future__ import annotations

import os
import sys

import pytest
from faults.support import assert_one_line_error, run_main

from polyformer.cli import main

CASES = {
    # unknown keys: the key, the value given, a "did you mean" and the valid keys of that group
    "typo in a model key": (
        ["--model.backbone.widht=64"],
        ["model.backbone.widht: unknown key", "'64'", "did you mean 'width'", "heads,", "mlp_ratio"],
    ),
    "abbreviated key (no prefix matching)": (
        ["--model.init_args.backbone.dept=2"],
        ["model.backbone.dept: unknown key", "did you mean 'depth'"],
    ),
    "typo in a trainer key": (["--trainer.max_stpes=3"], ["trainer.max_stpes", "did you mean 'max_steps'", "'3'"]),
    "typo in a data key": (["--data.batch_sise=4"], ["data.batch_sise: unknown key", "did you mean 'batch_size'"]),
    # wrong types and values outside a fixed set
    "wrong type": (["--model.backbone.depth=abc"], ["model.backbone.depth: expected int, got 'abc'"]),
    "not one of the choices": (
        ["--model.backbone.activation=gleu"],
        ["model.backbone.activation: 'gleu' is not accepted", "relu, relu2, gelu, gelu_tanh", "did you mean 'gelu'"],
    ),
    "precision": (["--trainer.precision=17"], ["trainer.precision: '17' is not accepted", "bf16-mixed, 32-true"]),
    "guards mode": (["--guards.on_nonfinite=maybe"], ["guards.on_nonfinite: 'maybe'", "stop, skip, off"]),
    # values out of range, checked by the constructors (a ValueError inside jsonargparse's instantiation)
    "heads do not divide the width": (
        ["--model.backbone.heads=5"],
        ["TransformerConfig.width (32) must be divisible by heads (5)", "heads in [1, 2, 4, 8, 16, 32]"],
    ),
    "negative dropout": (["--model.backbone.dropout=-0.1"], ["TransformerConfig.dropout must be in [0, 1), got -0.1"]),
    "zero batch size": (["--data.batch_size=0"], ["data.batch_size must be >= 1", "0"]),
    "negative learning rate": (["--model.optimizer.lr=-1"], ["optimizer.lr must be a finite number > 0, got -1"]),
    # options that contradict each other
    "a language model that is not causal": (
        ["--model.backbone.causal=false"],
        ["backbone.causal=true", "causal=False"],
    ),
    "streaming the built-in corpus": (["--data.streaming=true"], ["data.streaming", "built-in"]),
    # class paths: only subclasses of the documented base classes
    "class path outside polyformer": (
        ["--model.class_path=subprocess.Popen"],
        ["model: Import path subprocess.Popen does not correspond to a subclass of TaskModule"],
    ),
    "class path that does not exist": (
        ["--model.class_path=polyformer.tasks.nope.Nope"],
        ["model.class_path: cannot import 'polyformer.tasks.nope.Nope'"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_message_naming_key_value_and_accepted(case, capsys, tiny_lm_config, tmp_path):
    extra, fragments = CASES[case]
    line = run_main(capsys, ["fit", "--config", str(tiny_lm_config()), *extra])
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not (tmp_path / "ckpts").exists()  # stopped before any training


def test_unknown_key_in_a_yaml_file(capsys, tiny_lm_config, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    backbone:\n      widht: 3\n")
    line = run_main(capsys, ["fit", "--config", str(tiny_lm_config()), "--config", str(bad)])
    assert "model.backbone.widht: unknown key (did you mean 'width'?)" in line


def test_unknown_argument_of_a_class_given_by_class_path(capsys, tiny_lm_config, tmp_path):
    """jsonargparse reports the `str` alternative of `trainer.strategy`; the class's own complaint is the useful one."""
    bad = tmp_path / "strategy.yaml"
    bad.write_text(
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DDPStrategy\n"
        "    init_args:\n      process_group_backen: gloo\n"
    )
    line = run_main(capsys, ["fit", "--config", str(tiny_lm_config()), "--config", str(bad)])
    assert "trainer.strategy.process_group_backen: unknown key" in line
    assert "did you mean 'process_group_backend'" in line and "start_method" in line


def test_missing_required_values(capsys):
    line = run_main(capsys, ["fit"])
    assert "missing required value(s): data, model" in line and "--config" in line


def test_unknown_command(capsys):
    assert "did you mean 'fit'" in run_main(capsys, ["fitt"])
    assert "no command given" in run_main(capsys, [])


def test_missing_config_file(capsys, tmp_path):
    line = run_main(capsys, ["fit", "--config", str(tmp_path / "nope.yaml")])
    assert "config: File does not exist" in line and "nope.yaml" in line


def test_yaml_is_loaded_safely(capsys, tiny_lm_config, tmp_path):
    """A YAML tag that would build a Python object (here: run a shell command) is refused, not executed."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"trainer:\n  max_steps: !!python/object/apply:os.system ['touch {marker}']\n")
    line = run_main(capsys, ["fit", "--config", str(tiny_lm_config()), "--config", str(evil)])
    assert "python/object/apply:os.system" in line and "refused" in line
    assert not marker.exists()


def test_debug_env_var_gives_the_traceback(tiny_lm_config, monkeypatch):
    monkeypatch.setenv("POLYFORMER_DEBUG", "1")
    with pytest.raises(ValueError, match="divisible by heads"):
        main(["fit", "--config", str(tiny_lm_config()), "--model.backbone.heads=5"])


def test_cli_subprocess_exit_code_and_no_traceback(polyformer, tiny_lm_config, tmp_path):
    result = polyformer("fit", "--config", str(tiny_lm_config()), "--model.backbone.widht=64")
    assert_one_line_error(result, "model.backbone.widht: unknown key", "did you mean 'width'")
    assert "usage:" not in result.stderr  # jsonargparse's full usage text is not printed
    assert not (tmp_path / "ckpts").exists()


def test_debug_flag_gives_the_traceback(tiny_lm_config, monkeypatch):
    """`polyformer ... --debug` as the command sees it (sys.argv); the flag is taken out before Lightning parses it
    and handed on to DDP ranks through the environment."""
    monkeypatch.setenv("POLYFORMER_DEBUG", "0")  # recorded, so the "1" that main() sets is undone afterwards
    monkeypatch.setattr(
        sys, "argv", ["polyformer", "fit", "--config", str(tiny_lm_config()), "--model.backbone.heads=5", "--debug"]
    )
    with pytest.raises(ValueError, match="divisible by heads"):
        main()
    assert "--debug" not in sys.argv and os.environ["POLYFORMER_DEBUG"] == "1"


def test_yaml_syntax_error_names_the_file_and_where(polyformer, tiny_lm_config, tmp_path):
    """Of several --config files, the one that is not valid YAML is named (not the first or the last one given),
    with the line and column of the mistake: here an unclosed `[` that the next key runs into."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: [2\n  logger: false\n")
    steps = tmp_path / "steps.yaml"
    steps.write_text("trainer:\n  max_steps: 2\n")
    result = polyformer("fit", "--config", str(tiny_lm_config()), "--config", str(broken), "--config", str(steps))
    line = assert_one_line_error(result, f"{broken}:", "not valid YAML", "line 3, column")
    assert "tiny.yaml" not in line and str(steps) not in line and "<unicode string>" not in line
    assert not (tmp_path / "ckpts").exists()


@pytest.mark.parametrize("where", ["the path", "a parent"])
def test_default_root_dir_that_is_a_file(where, polyformer, tiny_lm_config, tmp_path):
    """A file where the run directory should be: one line, before anything is created or trained (with a logger on,
    Lightning would otherwise fail in the logger's makedirs with a long traceback)."""
    a_file = tmp_path / "runs"
    a_file.write_text("not a directory\n")
    root = a_file if where == "the path" else a_file / "lm"
    result = polyformer(
        "fit", "--config", str(tiny_lm_config(**{"trainer.logger": True})), f"--trainer.default_root_dir={root}"
    )
    assert_one_line_error(result, "trainer.default_root_dir", str(root), "must be a directory", f"{a_file} is a file")
    assert not (tmp_path / "ckpts").exists() and a_file.read_text() == "not a directory\n"
