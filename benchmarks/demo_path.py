"""The README's demo job (``prefixtune train``) with one attention path forced, to compare what
a kernel-path change does to a short, high-learning-rate training run (docs/training.md).

Run from the repository root:

    .venv/bin/python benchmarks/demo_path.py mask runs/mask-s1 --seed 1
    .venv/bin/python benchmarks/demo_path.py auto runs/auto-s1 --seed 1
    .venv/bin/python benchmarks/demo_path.py auto runs/auto-t1 --torch-threads 1

The first argument is ``prefixtune.attention.FUSED_CAUSAL`` (``auto`` is the default path), the
second the output directory; anything after it goes to ``prefixtune train`` as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import attention  # noqa: E402
from prefixtune.cli import main  # noqa: E402

PATHS = ("auto", "pad", "bias", "bias_gqa", "mask")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=PATHS, help="prefixtune.attention.FUSED_CAUSAL for the run")
    parser.add_argument("output_dir", help="the run's --output-dir")
    parser.add_argument("--torch-threads", type=positive, help="torch's thread count (default: torch's, the core count)")
    args, rest = parser.parse_known_args()
    attention.FUSED_CAUSAL = args.path
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sys.exit(main(["train", "--output-dir", args.output_dir, *rest]))
