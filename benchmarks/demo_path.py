"""The README's demo job (``prefixtune train``) with one attention path forced, to compare what
a kernel-path change does to a short, high-learning-rate training run (docs/training.md).

Run from the repository root:

    .venv/bin/python benchmarks/demo_path.py mask runs/mask-s1 --seed 1
    .venv/bin/python benchmarks/demo_path.py auto runs/auto-s1 --seed 1

The first argument is ``prefixtune.attention.FUSED_CAUSAL`` (``auto`` is the default path), the
second the output directory; anything after it goes to ``prefixtune train`` as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import attention  # noqa: E402
from prefixtune.cli import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    attention.FUSED_CAUSAL = sys.argv[1]
    sys.exit(main(["train", "--output-dir", sys.argv[2], *sys.argv[3:]]))
