"""Every GPU measurement in one run of a few minutes: step time, peak memory, generation, mixed batches, SDPA kernels.

Run from the repository root on a CUDA machine (bf16, random-weight models of the bundled
SmolLM2-135M's shape and of a ~1B Llama, ``benchmarks/shapes.py``; timings do not depend on
the weight values):

    PYTHONUNBUFFERED=1 python -m benchmarks.gpu --json /tmp/bench/gpu.json

and ``python -m benchmarks.gpu --smoke`` on a CPU to check the script (tiny model, tiny sizes,
float32). Sections, each written to the JSON as soon as it is done:

1. ``check``: the logits of each attention policy of ``benchmarks/arms.py`` (``auto``, ``pad``,
   ``grouped``) against ``mask``'s (the model's own kernel, the reference), with and without
   padding, and the routes each took.
2. ``kernels``: which SDPA backend runs (flash / efficient / cudnn / math), read from the
   profiler's aten op names, for the training arms of ``benchmarks/arms.py`` (each attention
   policy, padded batches with and without their mask), two prefixes in one batch, and
   decoding with and without padding.
3. ``train``: one training step (forward + backward) at 128, 512, 1024, 2048 tokens (batch =
   ``--tokens`` // length) for the arms :data:`TRAIN_ARMS` of ``benchmarks/arms.py``; prefix
   length 10, MLP width 512. Median seconds, paired ratios, and peak memory
   (``max_memory_allocated`` above what was resident before the step, plus the arm's own
   parameters). ``prefixtune_grouped`` and ``prefixtune_pad`` are left out: CUDA has no
   grouped route, so both run as ``prefixtune`` there.
3b. ``padded``: the same at 512 and 2048 tokens with right-padded batches (every other row
   padded after 3/4 of its length, the padding unscored, as real text gives), arms
   :data:`PADDED_ARMS`.
4. ``generate``: greedy, 64 new tokens, batch 1 and 8: plain / prefixtune / PEFT, and at
   batch 8 eight different prefixes in one call vs one after another (``benchmarks.generate``'s
   arms and measurement).
5. ``scaling``: ``benchmarks.scaling``'s three sweeps.
6. ``profile``: torch.profiler over 3 calls each of the ``floor``, ``prefixtune`` and
   ``prefixtune_logits`` training steps (512 tokens) for each of ``--profile-shapes``, and of
   plain and prefixtune batch-1 decoding (16 new tokens, the first shape): wall time vs summed
   CUDA kernel time and launches, i.e. whether an overhead is GPU work or host work.

``--sections`` picks some of them (e.g. ``--sections train generate``).

Arms are interleaved (rotating order), every arm has its own copy of the model.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

from prefixtune import PrefixModel

from . import generate as gen_bench
from . import scaling, train_step
from .arms import POLICIES, build, build_all, padding_mask, prefix_config
from .common import (
    first_line,
    paired_ratio,
    settings,
    start,
    sync,
    token_batch,
    write_json,
)
from .shapes import random_model

TRAIN_ARMS = ("floor", "prefixtune", "prefixtune_logits", "prefixtune_chunk28", "prefixtune_mask", "peft",
              "prefixtune_gc")
PADDED_ARMS = ("floor", "prefixtune", "prefixtune_keep_mask", "peft")
"""The ``padded`` section's arms: ``prefixtune`` drops the mask of a right-padded batch as
``prefixtune train`` does (mask-free kernels); ``prefixtune_keep_mask`` keeps it (transformers'
masked kernel, key/values copied per head)."""
TRAIN_RATIOS = (("prefixtune", "floor"), ("prefixtune", "peft"), ("prefixtune_logits", "floor"),
                ("prefixtune_chunk28", "prefixtune"), ("prefixtune_mask", "prefixtune"), ("prefixtune_gc", "prefixtune"),
                ("prefixtune", "prefixtune_keep_mask"), ("prefixtune_keep_mask", "floor"))
PEAK_RATIOS = ("prefixtune", "prefixtune_logits", "prefixtune_chunk28", "prefixtune_gc", "prefixtune_mask")
"""Arms whose peak memory (with parameters) is also given as a ratio to PEFT's."""


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ------------------------------------------------------------------------ 1. check
@torch.no_grad()
def check_policies(base, device) -> dict:
    """Relative difference of each policy's logits to ``mask``'s, and the routes taken (train mode,
    no padding, and with padding); one model, one prefix, the policy switched between calls."""
    wrapped = PrefixModel.wrap(copy.deepcopy(base), prefix_config()).train()
    ids = token_batch(base.config.vocab_size, 2 * 64, 64, device)
    out = {}
    for padded in (False, True):
        mask = torch.ones_like(ids)
        if padded:
            mask[0, :7] = 0
        logits, routes = {}, {}
        for name, policy in POLICIES.items():
            wrapped.attention = policy
            prefix = wrapped.prefix_batch("default", ids.shape[0])
            logits[name] = wrapped(input_ids=ids, attention_mask=mask, prefix=prefix).logits.float()
            routes[name] = sorted(set(prefix.routes.values()))
        ref, keep = logits["mask"], mask.bool()
        out["padded" if padded else "no_padding"] = {
            name: {"relative_difference": float((logits[name] - ref)[keep].norm() / ref[keep].norm()),
                   "routes": routes[name]} for name in POLICIES}
    return out


# ------------------------------------------------------------------------ 2. kernels
def classify(name: str) -> str | None:
    if not name.startswith(("aten::_scaled_dot_product_", "aten::_efficient_attention", "aten::_flash_attention")):
        return None
    for kind in ("flash", "efficient", "cudnn", "math"):
        if kind in name:
            return kind
    return "other:" + name


def nested(event) -> bool:
    """Whether an SDPA op runs inside another (count only the outermost)."""
    parent = event.cpu_parent
    while parent is not None:
        if classify(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def sdpa_backends(fn) -> dict:
    """Count the outermost SDPA backend ops that ``fn()`` runs: ``{"fwd:flash": 30, "bwd:flash": 30, "q1:efficient": ...}``
    (``q1`` = one query row, i.e. a decoding step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
        sync()
    counts = collections.Counter()
    for event in prof.events():
        kind = classify(event.name)
        if kind is None or nested(event):
            continue
        if "backward" in event.name:
            phase = "bwd"
        else:
            shape = event.input_shapes[0] if event.input_shapes else []
            axis = 1 if event.name.startswith(("aten::_efficient_attention", "aten::_flash_attention")) else 2
            phase = "q1" if len(shape) == 4 and shape[axis] == 1 else "fwd"
        counts[f"{phase}:{kind}"] += 1
    return dict(sorted(counts.items()))


KERNEL_ARMS = ("floor", "prefixtune", "prefixtune_pad", "prefixtune_grouped", "prefixtune_mask", "prefixtune_keep_mask",
               "peft")
PADDED_KERNEL_ARMS = ("floor", "prefixtune", "prefixtune_keep_mask")


def kernel_cases(base, device) -> tuple[dict, dict]:
    """``({case: fn}, {arm: error})``: a training step of each of :data:`KERNEL_ARMS` (and, on a
    right-padded batch, of :data:`PADDED_KERNEL_ARMS`), a step with two prefixes in one batch, and
    decoding (plain, prefixtune with one and two prefixes, PEFT), with and without left padding."""
    ids = token_batch(base.config.vocab_size, 2 * 256, 256, device)
    full, right_padded = torch.ones_like(ids), padding_mask(ids, True)
    arms, failed = build_all(KERNEL_ARMS, lambda: copy.deepcopy(base))
    cases = {f"train {name}, no padding": lambda arm=arm: arm.step(ids, full) for name, arm in arms.items()}
    cases.update({f"train {name}, padding": lambda arm=arms[name]: arm.step(ids, right_padded)
                  for name in PADDED_KERNEL_ARMS if name in arms})
    two = build("prefixtune", copy.deepcopy(base))
    two.module.add_prefix("other", prefix_config())

    def two_prefixes():
        two.module.zero_grad(set_to_none=True)
        two.loss(ids, full, prefix=["default", "other"]).backward()

    cases["train prefixtune, 2 prefixes in one batch"] = two_prefixes
    left_padded = full.clone()
    left_padded[0, :16] = 0
    prompt = ids[:, :32]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)

    def decode(model, mask, **more):
        def run():
            with torch.inference_mode():
                model.generate(input_ids=prompt, attention_mask=mask[:, -32:], **kw, **more)
        return run

    plain = copy.deepcopy(base).eval()
    cases.update({"decode plain, no padding": decode(plain, full), "decode plain, padding": decode(plain, left_padded),
                  "decode prefixtune, no padding": decode(two.module, full),
                  "decode prefixtune, padding": decode(two.module, left_padded),
                  "decode prefixtune, 2 prefixes": decode(two.module, full, prefix=["default", "other"])})
    if "peft" in arms:
        cases["decode peft, no padding"] = decode(arms["peft"].module, full)
    return cases, failed


def kernels_section(base, device) -> dict:
    cases, failed = kernel_cases(base, device)
    results = {f"train {name}": {"error": error} for name, error in failed.items()}
    for name, fn in cases.items():
        try:
            fn()  # warm up (lazy init, first-call dispatch)
            results[name] = sdpa_backends(fn)
        except Exception as error:  # noqa: BLE001
            results[name] = {"error": first_line(error)}
        print(f"  {name:<45} {results[name]}")
    return results


# ------------------------------------------------------------------------ 3. train
def memory_timer(memory: dict):
    """A ``train_step.run_interleaved`` timer that also keeps each arm's CUDA peak above resident in ``memory``."""
    def timer(arm, ids, mask) -> float:
        sync()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        begin = time.perf_counter()
        arm.step(ids, mask)
        sync()
        seconds = time.perf_counter() - begin
        if cuda:
            memory[arm.name] = max(memory.get(arm.name, 0), torch.cuda.max_memory_allocated() - resident)
        return seconds
    return timer


def train_section(base, seq_lens, tokens, repeats, warmup, padded: bool = False) -> dict:
    """Training steps of :data:`TRAIN_ARMS`; ``padded``: the batches right-padded
    (``arms.padding_mask``) and the arms :data:`PADDED_ARMS`."""
    names = PADDED_ARMS if padded else TRAIN_ARMS
    memory: dict = {}
    arms, failed = build_all(names, lambda: copy.deepcopy(base))
    for name, error in failed.items():
        print(f"  arm {name} failed to build: {error}")
    weights = {name: param_bytes(arm.module) for name, arm in arms.items()}
    out = {"tokens_per_batch": tokens, "param_bytes": weights, "seq_len": {}}
    for seq_len in seq_lens:
        ids = token_batch(base.config.vocab_size, tokens, seq_len, base.device)
        mask = padding_mask(ids, padded)
        memory.clear()
        taken = train_step.routes(arms, ids, mask)
        times = train_step.run_interleaved(arms, failed, ids, mask, repeats, warmup, timer=memory_timer(memory))
        rows = train_rows(names, times, failed, memory, weights, taken)
        ratios = {f"{top}/{bottom}": paired_ratio(times, top, bottom) for top, bottom in TRAIN_RATIOS}
        ratios.update({f"peak {top}/peft": rows[top]["peak_with_params_bytes"] / rows["peft"]["peak_with_params_bytes"]
                       for top in PEAK_RATIOS if top in memory and "peft" in memory})
        out["seq_len"][str(seq_len)] = {"batch": ids.shape[0], "arms": rows, "ratios": ratios}
        print(f"  seq {seq_len:>5} batch {ids.shape[0]:>4}: " + "  ".join(
            f"{n} {r['median_s'] * 1e3:.1f}ms/{(r['peak_with_params_bytes'] or 0) / 2**30:.2f}GiB"
            for n, r in rows.items() if "median_s" in r))
        print("      " + "  ".join(f"{k}={v:.3f}" for k, v in ratios.items() if v is not None))
    del arms
    return out


def train_rows(names, times: dict, failed: dict, memory: dict, weights: dict, taken: dict) -> dict:
    """Per arm: median seconds, ratio to the floor, peak memory, routes; or its error."""
    rows = {}
    for name in names:
        if name in times:
            peak = memory.get(name)
            rows[name] = {"median_s": statistics.median(times[name]), "vs_floor": paired_ratio(times, name, "floor"),
                          "times_s": times[name], "peak_bytes": peak, "routes": taken.get(name),
                          "peak_with_params_bytes": None if peak is None else peak + weights[name]}
        elif name in failed:
            rows[name] = {"error": failed[name]}
    return rows


# ------------------------------------------------------------------------ 4. generate
def generate_section(base, batch_sizes, new_tokens, prompt_len, repeats, warmup) -> dict:
    arms, failed = gen_bench.build_arms(batch_sizes, 1, gen_bench.ARMS, lambda: copy.deepcopy(base))
    return gen_bench.measure(arms, failed, gen_bench.ARMS, batch_sizes, new_tokens=new_tokens, prompt_len=prompt_len,
                             repeats=repeats, warmup=warmup, seed=0, pad_token_id=2, device=base.device)


# ------------------------------------------------------------------------ 6. profile
def device_profile(fn, steps: int) -> dict:
    """Wall ms per call, and the CUDA kernels' summed device ms and count per call, over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall = time.perf_counter() - begin
    kernels = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = (getattr(event, "self_device_time_total", None) or event.self_cuda_time_total, event.count)
    return {"wall_ms": wall * 1e3 / steps, "kernel_ms": sum(t for t, _ in kernels.values()) / 1e3 / steps,
            "kernels": sum(c for _, c in kernels.values()) / steps,
            "by_kernel_us": {k: t / steps for k, (t, _) in kernels.items()}}


PROFILED_ARMS = ("floor", "prefixtune", "prefixtune_logits")


def profile_section(base, seq_len: int, tokens: int, new_tokens: int | None) -> dict:
    """Where prefixtune's extra time goes: GPU work (kernel time) or host overhead (wall - kernel).
    The training steps of :data:`PROFILED_ARMS` (no padding mask); batch-1 decoding of ``new_tokens``
    tokens unless ``None``."""
    ids = token_batch(base.config.vocab_size, tokens, seq_len, base.device)
    arms, _ = build_all(PROFILED_ARMS, lambda: copy.deepcopy(base))
    cases = {f"train {name}": lambda arm=arm: arm.step(ids) for name, arm in arms.items()}
    pairs = [("train prefixtune", "train floor"), ("train prefixtune_logits", "train floor")]
    if new_tokens:
        plain = copy.deepcopy(base).eval()
        served = PrefixModel.wrap(copy.deepcopy(base), prefix_config()).eval()
        served.materialize()
        prompt = ids[:1, :32]
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)

        def decode(model):
            def run():
                with torch.inference_mode():
                    model.generate(input_ids=prompt, **kw)
            return run

        cases.update({f"generate plain b1 {new_tokens}": decode(plain),
                      f"generate prefixtune b1 {new_tokens}": decode(served)})
        pairs.append((f"generate prefixtune b1 {new_tokens}", f"generate plain b1 {new_tokens}"))
    out = {}
    for name, fn in cases.items():
        r = device_profile(fn, 3)
        top = sorted(r.pop("by_kernel_us").items(), key=lambda kv: -kv[1])[:12]
        out[name] = {**r, "top_kernels_us": dict(top)}
        print(f"  {name:<32} wall {r['wall_ms']:8.1f} ms  kernels {r['kernel_ms']:8.1f} ms  ({r['kernels']:.0f} launches)")
    for a, b in pairs:
        diff = {k: out[a]["top_kernels_us"].get(k, 0) - out[b]["top_kernels_us"].get(k, 0)
                for k in set(out[a]["top_kernels_us"]) | set(out[b]["top_kernels_us"])}
        print(f"  {a} - {b}: " + "; ".join(f"{k[:60]} {v:+.0f}us" for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:6]))
    return out


# ------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (on the CPU if there is no GPU)")
    parser.add_argument("--json", type=Path, help="write the results here (after every section)")
    parser.add_argument("--sections", nargs="+",
                        default=["check", "kernels", "train", "padded", "generate", "scaling", "profile"])
    parser.add_argument("--gen-repeats", type=int, default=3,
                        help="timed generate calls per arm (3 resolve about +-10 %% on an H200: host-bound)")
    parser.add_argument("--train-shapes", nargs="+", default=["smollm2-135m", "llama-1b"])
    parser.add_argument("--profile-shapes", nargs="+", default=["smollm2-135m", "llama-1b"],
                        help="shapes whose training step is profiled (decoding: the first one's)")
    return parser.parse_args(argv)


def sizes_for(smoke: bool, gen_repeats: int) -> dict:
    """The sizes of every section: the real ones, or tiny ones that check the script in minutes on a CPU."""
    return dict(
        seq_lens=[16, 32] if smoke else [128, 512, 1024, 2048],
        padded_seq_lens=[32] if smoke else [512, 2048],
        tokens=64 if smoke else 16384,
        repeats=1 if smoke else 5,
        warmup=1 if smoke else 2,
        gen_batches=[1, 8],
        new_tokens=4 if smoke else 64,
        gen_repeats=1 if smoke else gen_repeats,
        scaling=dict(prefix_lengths=[1, 10], seq_lens=[16, 32], layer_counts=[1, 4], base_seq=16, repeats=1) if smoke
        else dict(prefix_lengths=[1, 10, 50, 100, 200], seq_lens=[64, 128, 256, 512, 1024, 2048],
                  layer_counts=[1, 8, 15, 23, 30], base_seq=512, repeats=3),
        profile=dict(seq_len=16, tokens=64, new_tokens=4) if smoke else dict(seq_len=512, tokens=16384, new_tokens=16),
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = "tiny" if args.smoke else "smollm2-135m"
    results = start(__file__, argv)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        results["machine"].update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                                  cuda=torch.version.cuda)
        print(f"gpu={props.name}  cuda={torch.version.cuda}")
    sizes = sizes_for(args.smoke, args.gen_repeats)
    results.update(args=settings(args), dtype=str(dtype), sizes=sizes, sections={})
    base = random_model(shape, device, dtype)
    started = time.perf_counter()

    def model_of(other: str):
        return base if other == shape else random_model(other, device, dtype)

    def section(name, fn):
        if name.split(":")[0] not in args.sections:
            return
        print(f"\n== {name}  (t={time.perf_counter() - started:.0f}s)", flush=True)
        try:
            results["sections"][name] = fn()
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
            traceback.print_exc()
            results["sections"][name] = {"error": f"{type(error).__name__}: {error}"}
        write_json(args.json, results)
        if device == "cuda":
            torch.cuda.empty_cache()

    train_shapes = ["tiny"] if args.smoke else args.train_shapes
    section("check", lambda: check_policies(base, device))
    section("kernels", lambda: kernels_section(base, device))
    for train_shape in train_shapes:
        section(f"train:{train_shape}", lambda s=train_shape: train_section(
            model_of(s), sizes["seq_lens"], sizes["tokens"], sizes["repeats"], sizes["warmup"]))
    for train_shape in train_shapes:
        section(f"padded:{train_shape}", lambda s=train_shape: train_section(
            model_of(s), sizes["padded_seq_lens"], sizes["tokens"], sizes["repeats"], sizes["warmup"], padded=True))
    section("generate", lambda: generate_section(base, sizes["gen_batches"], sizes["new_tokens"], 32,
                                                 sizes["gen_repeats"], 1))
    section("scaling", lambda: scaling.sweep(base, device, tokens=sizes["tokens"], warmup=1, **sizes["scaling"],
                                             log=lambda line: print("  " + line, flush=True)))
    profile = sizes["profile"]
    for i, profile_shape in enumerate(["tiny"] if args.smoke else args.profile_shapes):
        section(f"profile:{profile_shape}", lambda s=profile_shape, decode=i == 0: profile_section(
            model_of(s), profile["seq_len"], profile["tokens"], profile["new_tokens"] if decode else None))
    print(f"\ndone in {time.perf_counter() - started:.0f}s")
    print_summary(results)


def print_summary(results: dict) -> None:
    print("\n==== summary (ratios; medians of paired per-repeat ratios)")
    for name, sec in results["sections"].items():
        if not name.startswith(("train:", "padded:")) or "seq_len" not in sec:
            continue
        for seq_len, row in sec["seq_len"].items():
            print(f"{name} seq {seq_len} batch {row['batch']}: " + "  ".join(
                f"{k}={v:.3f}" for k, v in row["ratios"].items() if v is not None))
    gen = results["sections"].get("generate", {})
    for batch_size, row in gen.items() if isinstance(gen, dict) and "error" not in gen else []:
        arms = row["arms"]
        line = "  ".join(f"{n}/plain={arms[n]['vs_plain']:.3f}" for n in arms if arms[n].get("vs_plain"))
        mix = row.get("mixed_vs_sequential")
        print(f"generate batch {batch_size}: {line}" + (f"  mixed/sequential={mix:.2f}" if mix else ""))


if __name__ == "__main__":
    main()
