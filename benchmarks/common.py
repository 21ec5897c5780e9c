"""What every benchmark shares: how a run is started and recorded, and how arms are compared.

A results file must say how to get it again: :func:`start` returns its header, the command
(``python -m benchmarks.NAME ...``), the machine and the code version, and every ``--json``
file begins with it. Arms are compared interleaved (:func:`rotated`: every round runs every
arm, the order shifted by one), so that a machine that slows down or speeds up during a run
moves every arm alike, and ratios are medians of per-round pairs (:func:`paired_ratio`), given with
the interval a bootstrap of the rounds puts around them (:func:`ratio_interval`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from prefixtune.messages import first_line

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: where ``python -m benchmarks.NAME`` runs, and where git is asked."""


# ---------------------------------------------------------------------------- the header of a run
def start(script: str, argv: list[str] | None, threads: int | None = None) -> dict:
    """Start a benchmark: torch threads (unless ``None``), FutureWarnings quiet, the machine printed;
    returns the header of its results (:func:`header`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    top = header(script, argv)
    print("  ".join(f"{key}={value}" for key, value in top["machine"].items()), flush=True)
    return top


def header(script: str, argv: list[str] | None) -> dict:
    """``{"command", "machine", "code_version"}`` for the results of ``script`` (its ``__file__``)
    run with ``argv`` (``None``: this process's arguments)."""
    return {"command": command(script, argv), "machine": machine_info(), "code_version": code_version()}


def command(script: str, argv: list[str] | None) -> str:
    """The command line that runs ``script`` with ``argv`` again, from the repository root."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", f"benchmarks.{Path(script).stem}", *map(str, args)])


def machine_info() -> dict:
    """Date, CPU, torch threads, and the versions of Python and the libraries measured."""
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
    }


def code_version() -> str | None:
    """``git rev-parse --short HEAD``, plus ``-dirty`` when the library or the benchmarks differ
    from it; ``None`` where git cannot say (no git, no checkout)."""
    def git(*args: str) -> str:  # --no-optional-locks: never write the index, which a commit may hold
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "prefixtune", "benchmarks")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def settings(args) -> dict:
    """Parsed arguments as JSON values (paths as strings)."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def write_json(path: Path | str | None, results: dict) -> None:
    """Write ``results`` to ``path`` (nothing if ``None``); called after every part of a long run,
    so that an interrupted run keeps what it measured."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


# ---------------------------------------------------------------------------- comparing arms
def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` in round ``shift``'s order: each round starts one arm later."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def round_ratios(times: dict, top: str, bottom: str) -> list[float] | None:
    """``times[top][i] / times[bottom][i]`` for each round; ``None`` if either arm is missing."""
    if top not in times or bottom not in times:
        return None
    return [a / b for a, b in zip(times[top], times[bottom])]


def paired_ratio(times: dict, top: str, bottom: str) -> float | None:
    """Median over rounds of ``times[top][i] / times[bottom][i]``; ``None`` if either arm is missing."""
    ratios = round_ratios(times, top, bottom)
    return None if ratios is None else statistics.median(ratios)


def ratio_interval(times: dict, top: str, bottom: str, level: float = 0.95, draws: int = 2000) -> list[float] | None:
    """A ``level`` bootstrap interval of :func:`paired_ratio`: the rounds drawn again with replacement
    ``draws`` times, each draw's median ratio, and the middle ``level`` of those medians (``None`` if
    either arm is missing). On a shared machine one round's ratio can be off by several percent, and one
    run's median by about one; a ratio is read against a target only with its interval, which says how
    far this run can tell them apart. The draws use a fixed seed: the same times give the same interval."""
    ratios = round_ratios(times, top, bottom)
    if ratios is None:
        return None
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(draws))
    tail = int(draws * (1 - level) / 2)
    return [medians[tail], medians[-tail - 1]]


def ratio_text(ratio: float | None) -> str:
    """A paired ratio as the tables print it: ``0.97x``, or ``-`` where an arm was missing."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def interval_text(interval: list[float] | None) -> str:
    """A :func:`ratio_interval` as the tables print it: ``0.951-0.990``, or ``-``."""
    return "-" if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}"


def print_arm_rows(arms: dict, name_width: int, cells) -> None:
    """One line per arm of a results table: its name, then ``cells(row)`` (its measured columns), or
    ``FAILED`` and the error of an arm that could not run."""
    for name, row in arms.items():
        print(f"{name:<{name_width}}" + (f"{'FAILED':>15}  {row['error']}" if "error" in row else cells(row)))


def build_each(builders: dict) -> tuple[dict, dict]:
    """Call each arm builder: ``({name: built}, {name: error line})``; a failing arm does not stop the others."""
    arms, failed = {}, {}
    for name, build in builders.items():
        try:
            arms[name] = build()
        except Exception as error:  # noqa: BLE001 - a failing arm must not stop the others
            failed[name] = first_line(error)
    return arms, failed


def sync() -> None:
    """Wait for the GPU (if any), so that a timer read after it includes the queued work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_tokens(vocab_size: int, rows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[rows, seq_len]`` random token ids, the same for the same seed (timings do not depend on them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, seq_len), generator=generator)


def token_batch(vocab_size: int, tokens: int, seq_len: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """Random rows of ``seq_len`` tokens, ``tokens`` in all (at least one row), on ``device``."""
    return random_tokens(vocab_size, max(1, tokens // seq_len), seq_len, seed).to(device)


@contextlib.contextmanager
def chunk_elements(elements: int | None):
    """``prefixtune.lm_loss.CHUNK_ELEMENTS`` set to ``elements`` (unless ``None``) for the block,
    so that arms differing only in the loss's chunk size run side by side in one process."""
    from prefixtune import lm_loss

    old = lm_loss.CHUNK_ELEMENTS
    lm_loss.CHUNK_ELEMENTS = elements or old
    try:
        yield
    finally:
        lm_loss.CHUNK_ELEMENTS = old
