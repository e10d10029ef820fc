"""The installed package stands alone: `polyformer` never imports the repository's `benchmarks/` folder or anything
under `tests/`, and none of its files builds a path into `tests/`. Both live beside the package in the repository
but are not installed (pyproject's `packages.find` includes `polyformer*` only), so such an import would work in a
checkout and break for every user of the wheel.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "polyformer"
OUTSIDE = ("benchmarks", "tests")  # repository folders that are not part of the installed package

# Imports every module of the package (or the modules named after the root) in a fresh interpreter, then reports the
# modules loaded from outside it.
# benchmarks/ and tests/ are put on the path on purpose: an import of them must succeed to be seen, not fail as a
# ModuleNotFoundError that a `try` in the package could swallow.
_PROBE = """
import importlib, json, pkgutil, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path[:0] = [str(root), str(root / "tests")]
import polyformer
names = sys.argv[2:] or [m.name for m in pkgutil.walk_packages(polyformer.__path__, "polyformer.")]
failed = {}
for name in names:
    if name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI on import
        continue
    try:
        importlib.import_module(name)
    except Exception as e:  # reported, so a broken module cannot hide an import behind it
        failed[name] = repr(e)
outside = {}
for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    paths = [file] if file else list(getattr(module, "__path__", []))
    for p in map(Path, paths):
        if p.resolve().is_relative_to(root) and p.resolve().relative_to(root).parts[0] in ("benchmarks", "tests"):
            outside[name] = str(p)
print(json.dumps({"failed": failed, "outside": outside}))
"""


def _probe(cwd: Path, *modules: str) -> dict[str, dict[str, str]]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT), *modules], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_every_module_loads_nothing_from_benchmarks_or_tests(tmp_path: Path) -> None:
    result = _probe(tmp_path)
    assert result["failed"] == {}, f"modules of polyformer that do not import: {result['failed']}"
    assert result["outside"] == {}, f"importing polyformer loaded modules from outside the package: {result['outside']}"


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes: prose may name a test file (`tests/...` checks this), code must not."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


_TESTS_PATH = re.compile(r"(^|[/\\])tests([/\\]|$)")


def _violations(path: Path, base: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    prose = _docstrings(tree)
    where = path.relative_to(base)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if _TESTS_PATH.search(node.value):  # "tests/golden", Path(...) / "tests"
                found.append(f"{where}:{node.lineno}: path into tests/: {node.value!r}")
            continue
        else:
            continue
        for name in names:
            if name.split(".")[0] in OUTSIDE:
                found.append(f"{where}:{node.lineno}: imports {name}")
    return found


def test_no_file_of_the_package_imports_or_names_a_path_outside_it() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, PACKAGE
    problems = [v for f in files for v in _violations(f)]
    assert problems == [], "\n".join(problems)


def test_the_static_check_catches_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "module.py"
    bad.write_text(
        '"""Prose may name tests/golden/lm.json."""\n'
        "import benchmarks.run\n"
        "from helpers import ROOT\n"  # not flagged by name: the import probe sees where such a module comes from
        'GOLDEN = ROOT / "tests" / "golden"\n'
    )
    found = _violations(bad, tmp_path)
    assert found == ["module.py:2: imports benchmarks.run", "module.py:4: path into tests/: 'tests'"], found


def test_the_import_probe_sees_benchmarks_and_tests(tmp_path: Path) -> None:
    result = _probe(tmp_path, "polyformer.backbone", "benchmarks.timing", "golden")
    assert result["failed"] == {} and {"benchmarks.timing", "golden"} <= result["outside"].keys(), result
    assert not any(name.startswith("polyformer") for name in result["outside"]), result


# ---- layers: backbone <- models <- tasks ------------------------------------------------------------------------
# In a fresh interpreter: import the plain-PyTorch layers, build every model from its config, run a forward and a
# backward pass, and report which third-party top-level packages got loaded. Lightning (and torchmetrics, which
# Lightning's tasks use) must not be among them: a model is usable from a notebook, an export script or another
# trainer without our training stack; so is an exported model (`polyformer.weights.native`).
_LAYERS_PROBE = """
import json, sys
import torch
import polyformer.backbone, polyformer.models
from polyformer.backbone import TransformerConfig
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from polyformer.models.vit import ViT, ViTConfig
from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig

torch.manual_seed(0)
small = dict(width=16, depth=1, heads=2, dropout=0.0)
gpt = GPT(GPTConfig(TransformerConfig(**small, position="learned", max_len=8, causal=True), vocab_size=50))
seq2seq = EncoderDecoder(EncoderDecoderConfig(TransformerConfig(**small), vocab_size=40, source_vocab_size=40))
vit = ViT(ViTConfig(TransformerConfig(**small), image_size=8, patch_size=4, channels=1, num_classes=3))
clip = CLIP(CLIPConfig(
    image=ImageEncoderConfig(backbone=TransformerConfig(**small, position="none"), image_size=8, patch_size=4,
                             channels=1),
    text=TextEncoderConfig(backbone=TransformerConfig(**small, position="learned", max_len=6, causal=True)),
    embed_dim=8, vocab_size=30, eos_id=1))
tokens, images = torch.randint(2, 30, (2, 6)), torch.randn(2, 1, 8, 8)
outputs = {
    "gpt": gpt(tokens),
    "encoder_decoder": seq2seq(tokens, tokens != 0, tokens),
    "vit": vit(images),
    "clip": torch.cat([t.flatten() for t in clip(images, tokens)]),
}
grads = {}
for name, (model, out) in zip(outputs, [(gpt, outputs["gpt"]), (seq2seq, outputs["encoder_decoder"]),
                                        (vit, outputs["vit"]), (clip, outputs["clip"])]):
    out.float().square().mean().backward()
    grads[name] = all(p.grad is not None for p in model.parameters() if p.requires_grad)
# polyformer's own export is for the same users: written and read back, and fine-tuned from, without Lightning.
from polyformer.weights import load_weights
from polyformer.weights.native import export_safetensors, load_model
export_safetensors(clip, "export")
load_weights(load_model("export"), "export/model.safetensors")
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"grads": grads, "loaded": loaded}))
"""


def test_backbone_and_models_run_without_lightning(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _LAYERS_PROBE], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grads"] == {"gpt": True, "encoder_decoder": True, "vit": True, "clip": True}, result["grads"]
    training_stack = {"lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "wandb"}
    assert not training_stack & set(result["loaded"]), sorted(training_stack & set(result["loaded"]))


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module if node.level == 0 else f"polyformer.{path.parent.name}.{node.module}")
    return found


def test_each_layer_imports_only_the_layers_below_it() -> None:
    """backbone: torch only; models: torch + backbone + models; weights: no task (the old timm_vit cycle)."""
    allowed = {
        "backbone": ("torch", "polyformer.backbone", "__future__", "math", "dataclasses", "typing", "collections"),
        "models": ("torch", "polyformer.backbone", "polyformer.models", "__future__", "math", "dataclasses", "typing"),
    }
    problems = []
    for layer, prefixes in allowed.items():
        for file in sorted((PACKAGE / layer).glob("*.py")):
            for name in _imports_of(file):
                if not any(name == p or name.startswith(p + ".") for p in prefixes):
                    problems.append(f"{file.relative_to(ROOT)} imports {name}")
    for file in sorted((PACKAGE / "weights").glob("*.py")):
        problems += [
            f"{file.relative_to(ROOT)} imports {n}" for n in _imports_of(file) if n.startswith("polyformer.tasks")
        ]
    assert problems == [], "\n".join(problems)
