"""The README's main job as a user runs it: `polyformer fit --config configs/lm/tiny.yaml` (a few dozen steps), then
`polyformer generate` from its checkpoint; fine-tuning from GPT-2 weights (`--model.init_from=hf:<folder>`); plus the
config interface (print, override, typo) and readable errors."""

import csv
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_cli

TINY = str(ROOT / "configs" / "lm" / "tiny.yaml")


@pytest.mark.slow
def test_tiny_preset_trains_samples_and_generates(tmp_path):
    fit = run_cli(
        ["fit", "--config", TINY, "--trainer.max_steps=30", "--trainer.val_check_interval=10",
         "--data.init_args.batch_size=16", "--trainer.logger=CSVLogger", "--trainer.logger.save_dir=logs",
         "--model.init_args.samples.max_new_tokens=20"],
        cwd=tmp_path, env={"POLYFORMER_CACHE": str(tmp_path / "cache")}, timeout=1200,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    with open(next(Path(tmp_path, "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 3 and val[-1] < val[0] - 0.3, val  # validation loss falls over a few dozen steps
    ppl = [(float(r["val/loss"]), float(r["val/ppl"])) for r in rows if r.get("val/ppl")]
    assert all(abs(p - 2.718281828**loss) < 1e-3 * p for loss, p in ppl)
    assert "Samples (temperature 0.8" in fit.stdout and "If the" in fit.stdout
    assert "Run summary:" in fit.stdout and "best checkpoint:" in fit.stdout and "logs (CSV):" in fit.stdout
    best = next(line.split(": ", 1)[1].split(" (")[0] for line in fit.stdout.splitlines() if "best checkpoint:" in line)
    ckpt = tmp_path / best
    assert ckpt.is_file()

    gen = run_cli(
        ["generate", "--ckpt", str(ckpt), "--prompt", "The ", "--prompt", "A class is", "--max-new-tokens", "15",
         "--temperature", "0"],
        cwd=tmp_path,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-2000:]
    outputs = gen.stdout.split("-" * 80 + "\n")
    assert len(outputs) == 2 and outputs[0].startswith("The ") and outputs[1].startswith("A class is")
    assert len(outputs[0]) > len("The ") + 5  # 15 tokens of a 2048-token BPE is more than a few characters


def test_print_config_override_and_typo(tmp_path):
    shown = run_cli(["fit", "--config", TINY, "--model.init_args.backbone.depth=2", "--print_config"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    config = yaml.safe_load(shown.stdout)
    backbone = config["model"]["init_args"]["backbone"]
    assert backbone["depth"] == 2 and backbone["width"] == 192 and backbone["causal"] is True
    assert config["data"]["init_args"]["bpe_vocab_size"] == 2048
    # --print_config: if a typo were accepted the command would print and exit 0 instead of training for minutes.
    typo = run_cli(["fit", "--config", TINY, "--model.init_args.backbone.detph=2", "--print_config"], cwd=tmp_path)
    assert typo.returncode != 0 and "detph" in typo.stderr
    bad_yaml = tmp_path / "typo.yaml"
    bad_yaml.write_text("model:\n  init_args:\n    tie_embedings: false\n")
    typo = run_cli(["fit", "--config", TINY, "--config", str(bad_yaml), "--print_config"], cwd=tmp_path)
    assert typo.returncode != 0 and "tie_embedings" in typo.stderr
    big = run_cli(["fit", "--config", str(ROOT / "configs" / "lm" / "gpt2-124m.yaml"), "--print_config"], cwd=tmp_path)
    assert big.returncode == 0, big.stderr[-2000:]
    assert yaml.safe_load(big.stdout)["model"]["init_args"]["backbone"]["width"] == 768


def test_generate_errors_are_one_line(tmp_path):
    missing = run_cli(["generate", "--ckpt", str(tmp_path / "nope.ckpt"), "--prompt", "x"], cwd=tmp_path)
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr and "Traceback" not in missing.stderr


def test_fine_tunes_from_a_local_gpt2_folder_and_says_what_does_not_fit(tmp_path):
    import torch
    import transformers  # a dev dependency (the [dev] extra)

    torch.manual_seed(0)
    folder = tmp_path / "tiny-gpt2"  # not "gpt2": a folder of that name in the working directory is what hf:gpt2 reads
    # GPT-2's layout at the preset's context and BPE size, small: what `hf:gpt2` is at full size.
    config = transformers.GPT2Config(vocab_size=2048, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    gpt2 = ["--model.init_args.backbone.width=64", "--model.init_args.backbone.depth=2",
            "--model.init_args.backbone.heads=4", "--model.init_args.backbone.activation=gelu_tanh"]  # fmt: skip
    env = {"POLYFORMER_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    fit = run_cli(
        ["fit", "--config", TINY, *gpt2, f"--model.init_args.init_from=hf:{folder}", "--trainer.max_steps=2",
         "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--model.init_args.samples.prompts=[]",
         "--trainer.logger=false"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]

    # vocab_size given: the model is built (and the weights checked) before any data is prepared.
    sized = [*gpt2[:2], "--model.init_args.backbone.heads=8", "--model.init_args.vocab_size=2048"]
    source = f"--model.init_args.init_from=hf:{folder}"
    wrong = run_cli(["fit", "--config", TINY, *sized, source], cwd=tmp_path, env=env)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr[-2000:]
    assert "--model.backbone.heads=4 (here 8), --model.backbone.activation='gelu_tanh' (here 'gelu')" in wrong.stderr
    offline = run_cli(["fit", "--config", TINY, *sized, "--model.init_args.init_from=hf:gpt2"], cwd=tmp_path, env=env)
    assert offline.returncode == 1 and "it needs the network once" in offline.stderr, offline.stderr[-2000:]
    old = run_cli(["fit", "--config", TINY, *sized, "--model.init_args.init_from=gpt2"], cwd=tmp_path, env=env)
    assert old.returncode == 1 and "names no weight source" in old.stderr and "hf:gpt2" in old.stderr
