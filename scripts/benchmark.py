"""Speed of polyformer against the reference implementations, measured side by side in one run.

    python scripts/benchmark.py                                  # CPU, fp32, 2 threads, tiny matched configs
    python scripts/benchmark.py --output docs/benchmarks.md      # regenerate the published tables
    python scripts/benchmark.py --device cuda --precision bf16 --compile   # GPU: GPT-2 124M, ViT-S/16, ...

See `python scripts/benchmark.py --help`; the code lives in the top-level `benchmarks/` folder, which is not part
of the installed package.
"""

import sys
from pathlib import Path

# `benchmarks` is a folder of the repository, not an installed package: import it from the repository root whatever
# the current directory (Python puts only this script's folder, scripts/, on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
