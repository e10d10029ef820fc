"""Speed of polyformer against the reference implementations, measured side by side in one run.

    python scripts/benchmark.py                                  # CPU, fp32, 2 threads, tiny matched configs
    python scripts/benchmark.py --output docs/benchmarks.md      # regenerate the published tables
    python scripts/benchmark.py --device cuda --precision bf16 --compile   # GPU: GPT-2 124M, ViT-S/16, ...

See `python scripts/benchmark.py --help`; the code lives in `polyformer.bench`.
"""

import sys

from polyformer.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
