"""What the studies share (``e2e_study``, ``webnlg_study``, ``recipe_study``): resumable runs.

A study is a list of runs, each ``{"id", "method", "lr", "changes"}``: one
``prefixtune.compare.runner.run_method`` call (the code of ``prefixtune compare``) on the
study's base configuration with ``changes`` applied. Each run's row is written to
``OUT/runs/ID.json`` as soon as it finishes, and a run whose row exists is not run again, so a
study resumes where it stopped. A process claims a run before it starts it (``OUT/claims/ID``,
holding its process id, gone when the row is written): ``--workers N`` processes of this machine
then each take the next unclaimed run, so a long run never leaves another worker idle, and two
commands with overlapping plans and the same OUT folder never run one run twice. A claim whose
process is gone (a run killed part-way) is taken over. ``--shard I/N`` runs every N-th run from
the I-th (counted from 0), so N machines with the same OUT folder (or their row files copied
together afterwards) share a study.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prefixtune import data
from prefixtune.compare.config import CompareConfig


def load_rows(out: Path) -> dict:
    """Every finished run's row, by id."""
    folder = out / "runs"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``; ``None`` is the whole study."""
    if not text:
        return 0, 1
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise SystemExit(f"--shard: expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise SystemExit(f"--shard: I must be in 0..N-1, got {text!r}")
    return index, count


def execute(runs: list[dict], config_of: Callable[[dict], CompareConfig], out: Path, part: tuple[int, int],
            drop_losses: bool = False) -> None:
    """Run this part's runs that have no row yet and that no other live process has claimed, in this
    process, one row file each."""
    from prefixtune.compare.runner import run_method

    index, count = part
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs):
        target = folder / f"{run['id']}.json"
        if i % count != index or target.exists() or not claim(out, run["id"]):
            continue
        try:
            if target.exists():  # finished by another process between the check and the claim
                continue
            cfg = dataclasses.replace(config_of(run), **run["changes"])
            start = time.perf_counter()
            row = run_method(cfg, run["method"], run["lr"], out / "checkpoints" / run["id"])
            row.update(id=run["id"], changes=run["changes"], wall_seconds=time.perf_counter() - start)
            row.pop("losses", None) if drop_losses else None
            target.write_text(json.dumps(row, indent=1))
        finally:
            (out / "claims" / run["id"]).unlink(missing_ok=True)
        scores = " ".join(f"{k} {v:.1f}" for k, v in row.get("metrics", {}).items())
        print(f"[{os.getpid()}] {run['id']}: {row['status']} {row.get('reason', '')} {scores} "
              f"loss {row.get('final_loss', float('nan')):.3f} ({row['wall_seconds']:.0f} s)", flush=True)


def claim(out: Path, run_id: str) -> bool:
    """Whether this process may run ``run_id``: it has claimed it, or taken over the claim of a process
    that is gone. ``O_EXCL`` makes the first claim atomic among processes of one machine."""
    path = out / "claims" / run_id
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _alive(path.read_text().strip()):
            return False
        path.write_text(str(os.getpid()))  # the claimant died: its run is this process's now
        return True
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def _alive(pid: str) -> bool:
    """Whether the process ``pid`` (as a claim file holds it) runs on this machine."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def run_phase(runs: list[dict], args, module: str, config_of: Callable[[dict], CompareConfig]) -> None:
    """The runs of ``--shard`` (all by default), in this process or in ``args.workers`` processes that
    rerun ``python -m module`` with ``--worker I/N --plan PLAN`` and this command's own arguments, each
    taking the next run nobody has claimed."""
    part = shard(getattr(args, "shard", None))
    if args.workers <= 1:
        execute(runs, config_of, Path(args.out), part, args.drop_losses)
        return
    mine = [run for i, run in enumerate(runs) if i % part[1] == part[0]]
    plan = Path(args.out) / f"plan-{os.getpid()}.json"  # one per command: two commands may share OUT
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps(mine))
    workers = [subprocess.Popen([sys.executable, "-m", module, *sys.argv[1:], "--worker", f"{i}/{args.workers}",
                                 "--plan", str(plan)]) for i in range(args.workers)]
    for worker in workers:
        worker.wait()
    plan.unlink(missing_ok=True)


def worker(args, config_of: Callable[[dict], CompareConfig]) -> None:
    """A ``--workers`` process: the runs of the plan its parent wrote that nobody has claimed."""
    execute(json.loads(Path(args.plan).read_text()), config_of, Path(args.out), (0, 1), args.drop_losses)


def run_study(args, module: str, runs: Callable[[], list[dict]], config_of: Callable[[dict], CompareConfig],
              report: Callable[[], str]) -> int:
    """A study's command once its options are parsed: a ``--workers`` process runs its share; otherwise
    ``--phase run`` runs what has no row yet, and the report (``--phase report``: only the report) is printed."""
    if args.worker:
        worker(args, config_of)
        return 0
    if args.phase == "run":
        run_phase(runs(), args, module, config_of)
    print(report())
    return 0


def data_root(text: str | None) -> Path:
    """``--data-dir``, else ``$PREFIXTUNE_DATA``: the folder holding ``e2e/``, ``webnlg/`` and ``sst2/``
    as ``prefixtune data prepare`` lays them out (docs/data.md)."""
    try:
        return data.root(text, option="--data-dir")
    except data.NoDataRoot as err:
        raise SystemExit(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser, out: str, results: str | None = None) -> None:
    """The options every study has: where rows go, the data, the machine, the sharing of runs (and, for the
    studies that write one, the results file and the phase)."""
    if results is not None:
        parser.add_argument("--phase", choices=("run", "report"), default="run",
                            help="run: every missing run, then the report; report: the report alone")
        parser.add_argument("--results", default=results,
                            help="the rows with the command and machine, written by the report ('' for none)")
    parser.add_argument("--out", default=out, help="folder of the rows (OUT/runs/ID.json) and checkpoints")
    parser.add_argument("--data-dir", default=None, help=f"the data folder (e2e/, webnlg/, sst2/; default: "
                        f"${data.VARIABLE})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="base model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    parser.add_argument("--workers", type=int, default=1, help="processes of this machine sharing the runs")
    parser.add_argument("--shard", default=None, help="I/N: run every N-th run from the I-th (several machines)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="prompts decoded at once (GPU: 50)")
    parser.add_argument("--drop-losses", action="store_true", help="do not keep per-step losses in the rows")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", default=None, help=argparse.SUPPRESS)
