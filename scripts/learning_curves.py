"""Learning quality per token and per second: the GPT-2 recipe (configs/lm/tiny.yaml) against the modern one
(configs/lm/modern-tiny.yaml) at the same shape and token budget, on two corpora, plus an ablation that adds one
modern change per row to the GPT-2 recipe (cumulative). Writes docs/learning.md and two plots.

    python scripts/learning_curves.py                      # everything in one process (2 CPU cores: hours)
    python scripts/learning_curves.py --parts compare      # only the two-corpus comparison
    python scripts/learning_curves.py --rows 0 1 2 --parts ablation --json a.json   # some rows (split over processes)
    python scripts/learning_curves.py --from-json a.json b.json    # the report from earlier raw results, merged

Every run trains in fp32 on the CPU with the same seed, data order and number of tokens, and is scored by one
function, `bits_per_byte`: held-out nats / (ln 2 * UTF-8 bytes), which does not depend on the tokenizer. Step times
are measured apart from training, round robin over the recipes (A B C A B C ...) so a machine whose speed drifts
slows every recipe alike; they are reported as ratios to the GPT-2 recipe, not as seconds.

The second corpus was not used to choose anything: the WordNet glosses that ship with timm
(`timm/data/_info/imagenet_synset_to_definition.txt`, 21.8k one-line English definitions, ~1.7 MB): plain
dictionary English, unlike the built-in corpus's Python reference prose, and present wherever timm is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from polyformer.backbone import TransformerConfig
from polyformer.data.text import TextDataModule
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.language_model import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
GPT2_PRESET = ROOT / "configs" / "lm" / "tiny.yaml"
MODERN_PRESET = ROOT / "configs" / "lm" / "modern-tiny.yaml"
CORPORA = ("builtin", "wordnet")


@dataclass(frozen=True)
class Recipe:
    """What a preset says about the model and its optimizer; the data shape comes from the GPT-2 preset."""

    backbone: TransformerConfig
    optimizer: OptimizerConfig
    tie_embeddings: bool = True
    logit_softcap: float | None = None


@dataclass
class Curve:
    """One training run: train loss per step, held-out bits/byte at eval points, against tokens and seconds."""

    name: str
    corpus: str
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training time only (evaluation excluded)
    loss: list[float] = field(default_factory=list)
    eval_tokens: list[int] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    eval_bpb: list[float] = field(default_factory=list)

    @property
    def bpb(self) -> float:
        return self.eval_bpb[-1]


def read_preset(path: Path) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and the data module's arguments of an LM preset."""
    cfg = yaml.safe_load(path.read_text())
    model = cfg["model"]["init_args"]
    opt = dict(model.get("optimizer") or {})
    if "betas" in opt:
        opt["betas"] = tuple(opt["betas"])
    recipe = Recipe(
        TransformerConfig(**model["backbone"]),
        OptimizerConfig(**opt),
        model.get("tie_embeddings", True),
        model.get("logit_softcap"),
    )
    return recipe, dict(cfg["data"]["init_args"])


def ablation(base: Recipe) -> list[tuple[str, Recipe]]:
    """The GPT-2 recipe, then one modern change per row, each on top of the rows before it (cumulative)."""

    def backbone(r: Recipe, **kw: Any) -> Recipe:
        return replace(r, backbone=replace(r.backbone, **kw))

    def optimizer(r: Recipe, **kw: Any) -> Recipe:
        return replace(r, optimizer=replace(r.optimizer, **kw))

    steps: list[tuple[str, Any]] = [
        ("GPT-2 recipe (tiny.yaml at fp32)", lambda r: r),
        ("+ rotary positions", lambda r: backbone(r, position="rotary")),
        ("+ RMSNorm", lambda r: backbone(r, norm="rmsnorm")),
        ("+ no biases", lambda r: backbone(r, bias=False)),
        ("+ QK-norm", lambda r: backbone(r, qk_norm=True)),
        ("+ ReLU²", lambda r: backbone(r, activation="relu2")),
        ("+ untied head", lambda r: replace(r, tie_embeddings=False)),
        ("+ logit soft-cap 15", lambda r: replace(r, logit_softcap=15.0)),
        ("+ Muon (hidden matrices)", lambda r: optimizer(r, name="muon")),
        ("+ WSD schedule (1-sqrt, last 30%)", lambda r: optimizer(
            r, schedule="wsd", decay_fraction=0.3, decay_shape="1-sqrt", min_lr_ratio=0.0)),
    ]  # fmt: skip
    rows, recipe = [], base
    for name, change in steps:
        recipe = change(recipe)
        rows.append((name, recipe))
    # Beside the cumulative line: SwiGLU instead of ReLU² at the same parameters (3 matrices of 8/3 D, not 2 of 4 D).
    relu2 = dict(rows)["+ ReLU²"]
    rows.insert(
        6, ("  (SwiGLU at matched params instead of ReLU²)", backbone(relu2, activation="swiglu", mlp_ratio=8 / 3))
    )
    return rows


# ---- data ------------------------------------------------------------------------------------------------------
def wordnet_file(cache_dir: Path) -> Path:
    """The WordNet glosses as a .txt of paragraphs (20 definitions each): the data module takes a paragraph as a
    document, and the held-out documents are chosen by a hash of their text."""
    import timm

    source = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synset_to_definition.txt"
    glosses = [line.split("\t", 1)[-1].strip() for line in source.read_text().splitlines() if line.strip()]
    out = cache_dir / "wordnet-glosses.txt"
    text = "\n\n".join(" ".join(glosses[i : i + 20]) for i in range(0, len(glosses), 20)) + "\n"
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return out


def data_module(corpus: str, data_args: dict[str, Any], cache_dir: Path) -> TextDataModule:
    source = "builtin" if corpus == "builtin" else str(wordnet_file(cache_dir))
    keep = {k: data_args[k] for k in ("tokenizer", "bpe_vocab_size", "block_size", "batch_size") if k in data_args}
    dm = TextDataModule(source=source, cache_dir=str(cache_dir), **keep)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(dm: TextDataModule) -> Iterator[torch.Tensor]:
    while True:  # epochs, reshuffled by the loader
        yield from dm.train_dataloader()


# ---- training and scoring --------------------------------------------------------------------------------------
def build(recipe: Recipe, dm: TextDataModule, steps: int, seed: int) -> tuple[LanguageModel, Any, Any]:
    torch.manual_seed(seed)
    task = LanguageModel(
        backbone=recipe.backbone,
        tie_embeddings=recipe.tie_embeddings,
        logit_softcap=recipe.logit_softcap,
        optimizer=replace(recipe.optimizer, max_steps=steps),
    )
    task.connect_data(dm.info())
    task.configure_model()
    conf = task.configure_optimizers()
    return task.train(), conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def train_step(task: LanguageModel, opt: Any, sched: Any, batch: torch.Tensor, clip: float = 1.0) -> float:
    """One optimizer step as `polyformer fit` takes it (fp32, gradient norm clipped at 1 like the presets)."""
    nats, _ = task.token_losses(batch)
    loss = nats.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
    opt.step()
    sched.step()
    return loss.item()


@torch.no_grad()
def bits_per_byte(task: LanguageModel, dm: TextDataModule) -> float:
    """THE score: held-out nats / (ln 2 * UTF-8 bytes of the targets) over the whole validation split."""
    was_training = task.training
    task.eval()
    nats, num_bytes = 0.0, 0
    for batch in dm.val_dataloader():
        n, b = task.token_losses(batch)
        nats, num_bytes = nats + n.double().sum().item(), num_bytes + int(b.sum())
    task.train(was_training)
    return nats / (math.log(2) * max(num_bytes, 1))


def train(name: str, corpus: str, recipe: Recipe, dm: TextDataModule, steps: int, eval_every: int, seed: int) -> Curve:
    task, opt, sched = build(recipe, dm, steps, seed)
    curve, data, elapsed = Curve(name, corpus), batches(dm), 0.0
    tokens_per_step = dm.batch_size * dm.block_size
    for step in range(1, steps + 1):
        batch = next(data)
        start = time.perf_counter()
        loss = train_step(task, opt, sched, batch)
        elapsed += time.perf_counter() - start
        curve.tokens.append(step * tokens_per_step)
        curve.seconds.append(elapsed)
        curve.loss.append(loss)
        if not math.isfinite(loss):
            print(f"  {name}: loss {loss} at step {step}; stopping this run", file=sys.stderr)
            break
        if step % eval_every == 0 or step == steps:
            curve.eval_tokens.append(step * tokens_per_step)
            curve.eval_seconds.append(elapsed)
            curve.eval_bpb.append(bits_per_byte(task, dm))
    if not curve.eval_bpb or curve.eval_tokens[-1] != curve.tokens[-1]:
        curve.eval_tokens.append(curve.tokens[-1])
        curve.eval_seconds.append(curve.seconds[-1])
        curve.eval_bpb.append(bits_per_byte(task, dm) if math.isfinite(curve.loss[-1]) else float("nan"))
    print(f"  {corpus:8s} {name:48s} bpb {curve.bpb:.4f}  ({curve.seconds[-1]:.0f} s training)", flush=True)
    return curve


def step_time_ratios(recipes: dict[str, Recipe], dm: TextDataModule, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each recipe over of `rounds` round-robin turns of `steps` steps, divided by the
    first recipe's. Each turn starts with one untimed step (caches, allocator) on the same fixed batch."""
    built = {name: build(r, dm, 1000, 0) for name, r in recipes.items()}
    batch = next(batches(dm))
    times: dict[str, list[float]] = {name: [] for name in recipes}
    for _ in range(rounds):
        for name, (task, opt, sched) in built.items():
            train_step(task, opt, sched, batch)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(task, opt, sched, batch)
            times[name].append((time.perf_counter() - start) / steps)
    base = statistics.median(times[next(iter(recipes))])
    return {name: statistics.median(t) / base for name, t in times.items()}


# ---- report ----------------------------------------------------------------------------------------------------
def plot(curves: list[Curve], x: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = sorted({c.corpus for c in curves}, key=CORPORA.index)
    fig, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 4.8), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for c, color in zip([c for c in curves if c.corpus == corpus], ("tab:blue", "tab:red", "tab:green")):
            xs = [t / 1e6 for t in c.eval_tokens] if x == "tokens" else c.eval_seconds
            ax.plot(xs, c.eval_bpb, "o-", color=color, label=f"{c.name} (final {c.bpb:.3f})", lw=2, ms=4)
        ax.set_title(f"{corpus} corpus: held-out bits per byte", fontsize=12)
        ax.set_xlabel(
            "training tokens (millions)" if x == "tokens" else "training seconds (fp32, CPU; evaluation excluded)"
        )
        ax.set_ylabel("bits per byte (lower is better)")
        points = [b for c in curves if c.corpus == corpus for b in c.eval_bpb if math.isfinite(b)]
        ax.set_ylim(min(points) - 0.05, min(max(points), min(points) + 1.5) + 0.05)  # a diverged run stays readable
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per corpus: the final bits/byte of the GPT-2 and the modern recipe, and the modern one's step-time ratio."""
    table: dict[str, dict[str, float]] = {}
    for corpus in CORPORA:
        final = {c["recipe"]: c["eval_bpb"][-1] for c in results["curves"] if c["corpus"] == corpus}
        gpt2, modern = (final.get(results["recipes"][k]) for k in ("gpt2", "modern"))
        if gpt2 is not None and modern is not None:
            time_ = results["times"].get(results["recipes"]["modern"], float("nan"))
            table[corpus] = {"gpt2": gpt2, "modern": modern, "time": time_}
    return table


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    commands = meta.get("commands", [meta["command"]])
    lines = [
        "# Learning quality: the GPT-2 recipe and the modern one",
        "",
        "Written by `scripts/learning_curves.py` (rerun it rather than editing this page). Every run: fp32 on the CPU, "
        f"seed {meta['seed']}, {meta['steps']} optimizer steps of {meta['batch_size']} x {meta['block_size']} tokens "
        f"({meta['steps'] * meta['batch_size'] * meta['block_size'] / 1e6:.2f}M tokens), the tiny shape "
        f"({meta['shape']}), BPE {meta['vocab']}, each preset's warmup scaled to the budget. Score: held-out bits per "
        "byte (`bits_per_byte`, the whole validation split). Step time: median of round-robin turns on one batch, "
        "as a ratio to the GPT-2 recipe (below 1 = faster). One seed per row: differences of a few hundredths of a "
        "bit are within run-to-run noise at this budget, and step-time ratios on a shared machine within ~10%.",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in commands],
        "",
    ]
    if results["ablation"]:
        rows = results["ablation"]
        base = rows[0]["bpb"]
        lines += [
            "## Ablation (built-in corpus; each row adds its change to every row above it)",
            "",
            "| change | bits/byte | vs GPT-2 recipe | step time vs GPT-2 recipe |",
            "|---|---:|---:|---:|",
        ]
        for r in rows:
            time_ = results["times"].get(r["recipe"], float("nan"))
            lines.append(f"| {r['name']} | {r['bpb']:.4f} | {100 * (r['bpb'] / base - 1):+.1f}% | {time_:.2f} |")
        lines.append("")
    if table := comparison(results):
        lines += [
            "## Two corpora: tiny.yaml's recipe against modern-tiny.yaml's",
            "",
            "| corpus | GPT-2 recipe bits/byte | modern bits/byte | change | step time (modern / GPT-2) |",
            "|---|---:|---:|---:|---:|",
        ]
        for corpus, r in table.items():
            change = 100 * (r["modern"] / r["gpt2"] - 1)
            lines.append(f"| {corpus} | {r['gpt2']:.4f} | {r['modern']:.4f} | {change:+.1f}% | {r['time']:.2f} |")
        lines += [
            "",
            "![held-out bits per byte against training tokens](learning-tokens.png)",
            "",
            "![held-out bits per byte against training seconds](learning-seconds.png)",
            "",
        ]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.md").write_text(markdown(results))
    wanted = {
        results["recipes"]["gpt2"]: "GPT-2 recipe (tiny.yaml)",
        results["recipes"]["modern"]: "modern (modern-tiny.yaml)",
    }
    curves = [
        Curve(**{**{k: v for k, v in c.items() if k != "recipe"}, "name": wanted[c["recipe"]]})
        for c in results["curves"]
        if c["recipe"] in wanted
    ]
    curves.sort(key=lambda c: (c.corpus, c.name))
    if curves:
        plot(curves, "tokens", out / "learning-tokens.png")
        plot(curves, "seconds", out / "learning-seconds.png")


# ---- main ------------------------------------------------------------------------------------------------------
def scaled(recipe: Recipe, steps: int, preset_steps: int) -> Recipe:
    """The preset's warmup as the same fraction of a shorter (or longer) budget."""
    warmup = max(1, round(recipe.optimizer.warmup_steps * steps / preset_steps))
    return replace(recipe, optimizer=replace(recipe.optimizer, warmup_steps=warmup))


def run(args: argparse.Namespace) -> dict[str, Any]:
    gpt2, data_args = read_preset(args.gpt2)
    modern, _ = read_preset(args.modern)
    preset_steps = yaml.safe_load(args.gpt2.read_text())["trainer"]["max_steps"]
    gpt2, modern = scaled(gpt2, args.steps, preset_steps), scaled(modern, args.steps, preset_steps)
    if args.width:  # a smaller shape for the test; both recipes shrink alike
        shape = dict(width=args.width, depth=args.depth, heads=args.heads, max_len=args.block_size or 128)
        gpt2 = replace(gpt2, backbone=replace(gpt2.backbone, **shape))
        modern = replace(modern, backbone=replace(modern.backbone, **shape))
    for key in ("block_size", "batch_size", "bpe_vocab_size"):
        if getattr(args, key):
            data_args[key] = getattr(args, key)
    b = gpt2.backbone
    results: dict[str, Any] = {
        "meta": {
            "seed": args.seed, "steps": args.steps, "batch_size": data_args["batch_size"],
            "block_size": data_args["block_size"], "vocab": data_args.get("bpe_vocab_size"),
            "shape": f"width {b.width}, depth {b.depth}, heads {b.heads}",
            "command": "python scripts/learning_curves.py " + " ".join(args.argv),
        },
        "recipes": {"gpt2": repr(gpt2), "modern": repr(modern)},
        "curves": [], "ablation": [], "times": {},
    }  # fmt: skip
    cache = Path(args.cache_dir)
    rows = ablation(gpt2)
    chosen = [(i, name, r) for i, (name, r) in enumerate(rows) if args.rows is None or i in args.rows]
    pairs = {"GPT-2 recipe (tiny.yaml)": gpt2, "modern (modern-tiny.yaml)": modern}
    for corpus in args.corpora:
        dm = data_module(corpus, data_args, cache)
        todo: list[tuple[str, Recipe, int | None]] = []
        if "ablation" in args.parts and corpus == "builtin":
            todo += [(name, r, i) for i, name, r in chosen]
        if "compare" in args.parts:  # a recipe the ablation trains on this corpus is not trained twice
            todo += [(name, r, None) for name, r in pairs.items() if all(r != t[1] for t in todo)]
        for name, recipe, index in todo:
            c = train(name, corpus, recipe, dm, args.steps, args.eval_every, args.seed)
            results["curves"].append({**c.__dict__, "recipe": repr(recipe)})
            if index is not None:
                results["ablation"].append({"index": index, "name": name, "bpb": c.bpb, "recipe": repr(recipe)})
        if "timing" in args.parts and corpus == "builtin":
            timed = {name: r for _, name, r in chosen} | {"modern (modern-tiny.yaml)": modern}
            ratios = step_time_ratios(timed, dm, args.time_rounds, args.time_steps)
            results["times"] = {repr(timed[name]): ratio for name, ratio in ratios.items()}
    return results


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs split over processes (`--rows`, `--parts`): curves, ablation rows and times joined."""
    out = {**parts[0], "curves": [], "ablation": [], "times": {}}
    for p in parts:
        out["curves"] += p["curves"]
        out["ablation"] += p["ablation"]
        out["times"].update(p["times"])
    out["meta"]["commands"] = [p["meta"]["command"] for p in parts]
    out["ablation"].sort(key=lambda r: r["index"])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["ablation", "compare", "timing"],
                   default=["ablation", "compare", "timing"])  # fmt: skip
    p.add_argument("--rows", type=int, nargs="+", help="only these ablation rows (0 = the GPT-2 recipe)")
    p.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (the token budget)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    p.add_argument("--time-rounds", type=int, default=5, help="round-robin turns of the step-time measurement")
    p.add_argument("--time-steps", type=int, default=3, help="timed steps per turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpt2", type=Path, default=GPT2_PRESET, help="the baseline preset")
    p.add_argument("--modern", type=Path, default=MODERN_PRESET, help="the modern preset")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="where learning.md and the plots go")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "learning" / "results.json", help="raw results")
    p.add_argument("--from-json", type=Path, nargs="+", help="only write the report from earlier raw results (merged)")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "learning" / "cache"), help="tokenized corpora")
    shape = p.add_argument_group("shape overrides (tests)")
    for key in ("width", "depth", "heads", "block_size", "batch_size", "bpe_vocab_size"):
        shape.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    args = p.parse_args(argv)
    args.argv = argv
    if args.from_json:
        results = merge([json.loads(path.read_text()) for path in args.from_json])
    else:
        results = run(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results))
    write_report(results, args.out)
    print(f"wrote {args.out / 'learning.md'} (raw results: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
