"""Op totals from torch.profiler, and the table that sets two arms' totals side by side.

``decode_profile`` and ``step_profile`` ask the same question of different calls: which ops
make up the difference between two arms. Self CPU time per op answers it; the call counts say
whether an op is new (only one arm runs it, or runs it more often) or the machine's
step-to-step spread (both run it equally often).
"""

from __future__ import annotations

import collections

import torch


def op_times(call, by_shape: str | None = None) -> tuple[collections.Counter, collections.Counter]:
    """Self CPU ms and call count per op during ``call()``; the op named ``by_shape`` (e.g.
    ``aten::mm``) is split by its input shapes, so that its calls can be told apart."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=bool(by_shape)) as prof:
        call()
    times, counts = collections.Counter(), collections.Counter()
    for event in prof.key_averages(group_by_input_shape=bool(by_shape)):
        key = f"{event.key} {event.input_shapes}" if event.key == by_shape else event.key
        times[key] += event.self_cpu_time_total / 1e3
        counts[key] += event.count
    return times, counts


def print_op_table(results: dict, top: int, width: int = 50) -> None:
    """Two arms' ``{name: (ms per op, calls per op)}``, the ops whose time differs most first."""
    (base, (bt, bn)), (other, (ot, on)) = results.items()
    total_b, total_o = sum(bt.values()), sum(ot.values())
    print(f"{base}: {total_b:.0f} ms self CPU time; {other}: {total_o:.0f} ms ({total_o / total_b:.3f}x)")
    print(f"{'op':{width}s} {base + ' ms':>13s} {other + ' ms':>15s} {'diff ms':>8s} {'% of ' + base:>12s} "
          f"{'calls':>13s}")
    for op in sorted(set(bt) | set(ot), key=lambda k: -abs(ot.get(k, 0) - bt.get(k, 0)))[:top]:
        diff = ot.get(op, 0.0) - bt.get(op, 0.0)
        print(f"{op[:width]:{width}s} {bt.get(op, 0):13.1f} {ot.get(op, 0):15.1f} {diff:+8.1f} "
              f"{100 * diff / total_b:+11.2f}% {bn.get(op, 0):6d}/{on.get(op, 0):<6d}")


def as_json(results: dict) -> dict:
    """``{arm: {"total_ms", "ops": {op: {"ms", "calls"}}}}`` of :func:`print_op_table`'s input."""
    return {name: {"total_ms": sum(times.values()),
                   "ops": {op: {"ms": ms, "calls": counts.get(op, 0)} for op, ms in sorted(times.items(), key=lambda kv: -kv[1])}}
            for name, (times, counts) in results.items()}
