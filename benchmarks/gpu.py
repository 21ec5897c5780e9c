"""Every GPU measurement of issue 7 in one run of a few minutes: step time, peak memory, generation, mixed batches, SDPA kernels.

Run from the repository root on a CUDA machine (bf16, random-weight models of the bundled
SmolLM2-135M's shape and of a ~1B Llama; timings do not depend on the weight values):

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --json /tmp/bench/gpu.json

and ``.venv/bin/python benchmarks/gpu.py --smoke`` on a CPU to check the script (tiny model,
tiny sizes, float32). Sections, each written to the JSON as soon as it is done:

1. ``check``: logits of the ways a padding-free causal prefixed call can reach SDPA
   (``prefixtune.attention.FUSED_CAUSAL``: ``pad``, ``bias``, ``bias_gqa``, ``mask``) agree.
2. ``kernels``: which SDPA backend runs (flash / efficient / cudnn / math), read from the
   profiler's aten op names, for plain and prefixed training and decoding, with and without
   padding, and for each ``FUSED_CAUSAL`` choice.
3. ``train``: one training step (forward + backward, ``labels = input_ids``) at 128, 512,
   1024, 2048 tokens (batch = ``--tokens`` // length) for the arms ``floor`` (the frozen
   model's forward + backward to its input embeddings), ``prefixtune`` (``pad``, what the default ``auto`` takes on CUDA,
   called as ``prefixtune train`` calls it: the loss without the full logits, lm_loss.py),
   ``prefixtune_logits`` (the same with the model's own loss over the full logits),
   ``prefixtune_chunk28`` (the chunked loss with chunks of up to 2^28 logits, not 2^26),
   ``prefixtune_bias``, ``prefixtune_bias_gqa`` (the lower-right bias with grouped heads read as
   they are: no padded query rows, no per-head copies), ``prefixtune_mask`` (the explicit-mask
   path before the change),
   ``peft`` and ``prefixtune_gc`` (gradient checkpointing); prefix length 10, MLP width 512.
   Median seconds, paired ratios, and peak memory (``max_memory_allocated`` above what was
   resident before the step, plus the arm's own parameters).
3b. ``padded``: the same at 512 and 2048 tokens with right-padded batches (every other row
   padded after 3/4 of its length, the padding unscored, as real text gives), arms ``floor``,
   ``prefixtune`` (the mask dropped, as ``prefixtune train`` does: ``causal_batch``),
   ``prefixtune_keep_mask`` (the mask kept: transformers' masked kernel) and ``peft``.
4. ``generate``: greedy, 64 new tokens, batch 1 and 8: plain / prefixtune / PEFT, and at
   batch 8 eight different prefixes in one call vs one after another (benchmarks/generate.py's
   measurement, with a CUDA sync at the end of each call).
5. ``scaling``: benchmarks/scaling.py's three sweeps.
6. ``profile``: torch.profiler over 3 calls each of the floor and prefixtune training steps
   (512 tokens; prefixtune with the chunked loss and with the model's own) for each of
   ``--profile-shapes``, and of plain and prefixtune batch-1 decoding (16 new tokens, the first
   shape): wall time vs summed CUDA kernel time and launches, i.e. whether an overhead is GPU
   work or host work.

``--sections`` picks some of them (e.g. ``--sections train generate``).

Arms are interleaved (rotating order), every arm has its own copy of the model.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import PrefixConfig, PrefixModel  # noqa: E402

import generate as gen_bench  # noqa: E402  (benchmarks/generate.py)
import scaling  # noqa: E402  (benchmarks/scaling.py)
import train_step  # noqa: E402  (benchmarks/train_step.py)
from common import build_each, machine_info, peft_prefix_model, use_variant, write_json  # noqa: E402

PREFIX_LENGTH = 10
HIDDEN = 512
VARIANTS = ("pad", "bias", "bias_gqa", "mask")
BIG_CHUNK = 1 << 28
"""The ``prefixtune_chunk28`` arm's loss chunks (1 GiB of float32 logits): does the default
2^26 (chosen on the CPU, where the head's per-row cost flattens at ~1024 rows) cost the GPU
time, with 32 chunks of 512 rows on a 128k vocabulary?"""


def prefix_config(**kw) -> PrefixConfig:
    return PrefixConfig(prefix_length=PREFIX_LENGTH, reparameterize=True, reparam_hidden_size=HIDDEN, **kw)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ------------------------------------------------------------------------ 1. check
@torch.no_grad()
def check_variants(base, device) -> dict:
    """Relative difference of each variant's logits to ``mask``'s (train mode, no padding, and with padding)."""
    wrapped = PrefixModel.wrap(copy.deepcopy(base), prefix_config()).train()
    ids = scaling.batch(base.config.vocab_size, 2 * 64, 64, device)
    out = {}
    for padded in (False, True):
        mask = torch.ones_like(ids)
        if padded:
            mask[0, :7] = 0
        logits = {}
        for variant in VARIANTS:
            with use_variant(variant):
                logits[variant] = wrapped(input_ids=ids, attention_mask=mask).logits.float()
        ref = logits["mask"]
        keep = mask.bool()
        out["padded" if padded else "no_padding"] = {
            v: float((logits[v] - ref)[keep].norm() / ref[keep].norm()) for v in VARIANTS if v != "mask"
        }
    del wrapped
    return out


# ------------------------------------------------------------------------ 2. kernels
def classify(name: str) -> str | None:
    if not name.startswith(("aten::_scaled_dot_product_", "aten::_efficient_attention", "aten::_flash_attention")):
        return None
    for kind in ("flash", "efficient", "cudnn", "math"):
        if kind in name:
            return kind
    return "other:" + name


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
        if kind is None:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if classify(parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        if "backward" in event.name:
            phase = "bwd"
        else:
            shape = event.input_shapes[0] if event.input_shapes else []
            axis = 1 if event.name.startswith(("aten::_efficient_attention", "aten::_flash_attention")) else 2
            phase = "q1" if len(shape) == 4 and shape[axis] == 1 else "fwd"
        counts[f"{phase}:{kind}"] += 1
    return dict(sorted(counts.items()))


def kernel_cases(base, device) -> dict:
    vocab = base.config.vocab_size
    ids = scaling.batch(vocab, 2 * 256, 256, device)
    full = torch.ones_like(ids)
    padded = full.clone()
    padded[0, :16] = 0
    plain = copy.deepcopy(base).train().requires_grad_(False)
    wrapped = PrefixModel.wrap(copy.deepcopy(base), prefix_config()).train()
    wrapped.add_prefix("other", prefix_config())
    peft_model, peft_error = None, None
    try:
        peft_model = peft_prefix_model(copy.deepcopy(base), PREFIX_LENGTH, HIDDEN).train()
    except Exception as error:  # noqa: BLE001
        peft_error = f"{type(error).__name__}: {error}"

    def floor(mask):
        return lambda: scaling_floor(plain, ids, mask)

    def prefixed(mask, variant="pad", prefix="default"):
        def run():
            with use_variant(variant):
                wrapped.zero_grad(set_to_none=True)
                wrapped(input_ids=ids, attention_mask=mask, labels=ids, prefix=prefix).loss.backward()
        return run

    gen_kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)
    prompt = ids[:, :32]

    def decode(model, mask, **kw):
        def run():
            with torch.inference_mode():
                model.generate(input_ids=prompt, attention_mask=mask[:, -32:], **gen_kw, **kw)
        return run

    cases = {
        "train plain (floor), no padding": floor(full),
        "train plain (floor), padding": floor(padded),
        "train prefixtune pad, no padding": prefixed(full, "pad"),
        "train prefixtune bias, no padding": prefixed(full, "bias"),
        "train prefixtune bias_gqa, no padding": prefixed(full, "bias_gqa"),
        "train prefixtune mask, no padding": prefixed(full, "mask"),
        "train prefixtune, padding": prefixed(padded),
        "train prefixtune, 2 prefixes in one batch": prefixed(full, prefix=["default", "other"]),
        "decode plain, no padding": decode(plain, full),
        "decode plain, padding": decode(plain, padded),
        "decode prefixtune, no padding": decode(wrapped, full),
        "decode prefixtune, padding": decode(wrapped, padded),
        "decode prefixtune, 2 prefixes": decode(wrapped, full, prefix=["default", "other"]),
    }
    if peft_model is not None:
        def peft_train():
            peft_model.zero_grad(set_to_none=True)
            peft_model(input_ids=ids, attention_mask=full, labels=ids).loss.backward()
        cases["train peft, no padding"] = peft_train
        cases["decode peft, no padding"] = decode(peft_model, full)
    results = {}
    for name, fn in cases.items():
        try:
            fn()  # warm up (lazy init, first-call dispatch)
            results[name] = sdpa_backends(fn)
        except Exception as error:  # noqa: BLE001
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        print(f"  {name:<45} {results[name]}")
    if peft_error:
        results["peft"] = {"error": peft_error}
    del plain, wrapped, peft_model
    return results


def scaling_floor(model, ids, mask):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, attention_mask=mask, labels=ids, use_cache=False).loss.backward()


# ------------------------------------------------------------------------ 3. train
TRAIN_ARMS = ("floor", "prefixtune", "prefixtune_logits", "prefixtune_chunk28", "prefixtune_bias", "prefixtune_bias_gqa",
              "prefixtune_mask",
              "peft", "prefixtune_gc")
PADDED_ARMS = ("floor", "prefixtune", "prefixtune_keep_mask", "peft")
"""The ``padded`` section's arms: right-padded batches, as real text gives. ``prefixtune`` drops
their mask as ``prefixtune train`` does (``prefixtune.train.causal_batch``: mask-free kernels);
``prefixtune_keep_mask`` keeps it (transformers' masked kernel, key/values copied per head)."""


def train_arms(base, memory: dict, wanted=TRAIN_ARMS) -> tuple[dict, dict]:
    """``{name: (step, module)}`` in train_step.py's format; each step records its peak in ``memory[name]``."""

    def measured(name, fn, module):
        def step(ids, mask):
            sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            fn(ids, mask)
            sync()
            if torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated() - resident
                memory[name] = max(memory.get(name, 0), peak)
        return step, module

    def floor():
        model = copy.deepcopy(base).train().requires_grad_(False)
        return measured("floor", lambda ids, mask: scaling_floor(model, ids, mask), model)

    def prefixed(variant, checkpointing=False, logits=False, chunk=None, keep_mask=False):
        """``logits=False`` is what ``prefixtune train`` runs: the loss without the full logits (lm_loss.py);
        ``keep_mask``: the padding mask kept, which ``prefixtune train`` drops (``causal_batch``)."""
        def build():
            wrapped = PrefixModel.wrap(copy.deepcopy(base), prefix_config()).train()
            if checkpointing:
                wrapped.gradient_checkpointing_enable()
            name = "prefixtune" + ("_gc" if checkpointing else "" if variant == "pad" else f"_{variant}")
            name += ("_logits" if logits else "") + ("_chunk28" if chunk else "") + ("_keep_mask" if keep_mask else "")

            def fn(ids, mask):
                with use_variant(variant, chunk):
                    train_step.prefixtune_loss(wrapped, ids, mask, keep_mask, logits).backward()
            return measured(name, fn, wrapped)
        return build

    def peft():
        model = peft_prefix_model(copy.deepcopy(base), PREFIX_LENGTH, HIDDEN).train()
        return measured("peft", lambda ids, mask: model(input_ids=ids, attention_mask=mask,
                                                        labels=train_step.scored(ids, mask)).loss.backward(), model)

    builders = {"floor": floor, "prefixtune": prefixed("pad"), "prefixtune_logits": prefixed("pad", logits=True),
                "prefixtune_chunk28": prefixed("pad", chunk=BIG_CHUNK),
                "prefixtune_bias": prefixed("bias"), "prefixtune_bias_gqa": prefixed("bias_gqa"),
                "prefixtune_mask": prefixed("mask"), "peft": peft,
                "prefixtune_gc": prefixed("pad", True), "prefixtune_keep_mask": prefixed("pad", keep_mask=True)}
    return build_each({name: builders[name] for name in wanted})


def paired(times: dict, top: str, bottom: str):
    if top not in times or bottom not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[top], times[bottom]))


def train_section(base, seq_lens, tokens, repeats, warmup, padded: bool = False) -> dict:
    """Training steps of every arm; ``padded``: the batches right-padded (``train_step.padding_mask``:
    every other row after 3/4 of its length) and only :data:`PADDED_ARMS`."""
    memory: dict = {}
    arms, failed = train_arms(base, memory, PADDED_ARMS if padded else TRAIN_ARMS)
    for name, error in failed.items():
        print(f"  arm {name} failed to build: {error}")
    weights = {name: param_bytes(module) for name, (_, module) in arms.items()}
    out = {"tokens_per_batch": tokens, "param_bytes": weights, "seq_len": {}}
    for seq_len in seq_lens:
        ids = scaling.batch(base.config.vocab_size, tokens, seq_len, "cpu").to(base.device)
        mask = train_step.padding_mask(ids, padded)
        memory.clear()
        times = train_step.run_interleaved(arms, failed, ids, mask, repeats, warmup)
        rows = {}
        for name in PADDED_ARMS if padded else TRAIN_ARMS:
            if name in times:
                rows[name] = {"median_s": statistics.median(times[name]), "vs_floor": paired(times, name, "floor"),
                              "times_s": times[name], "peak_bytes": memory.get(name),
                              "peak_with_params_bytes": None if name not in memory else memory[name] + weights[name]}
            elif name in failed:
                rows[name] = {"error": failed[name]}
        ratios = {
            "prefixtune/floor": paired(times, "prefixtune", "floor"),
            "prefixtune/peft": paired(times, "prefixtune", "peft"),
            "prefixtune_logits/floor": paired(times, "prefixtune_logits", "floor"),
            "prefixtune_chunk28/prefixtune": paired(times, "prefixtune_chunk28", "prefixtune"),
            "prefixtune_mask/prefixtune (time of the old mask path)": paired(times, "prefixtune_mask", "prefixtune"),
            "prefixtune_bias/prefixtune": paired(times, "prefixtune_bias", "prefixtune"),
            "prefixtune_bias_gqa/prefixtune": paired(times, "prefixtune_bias_gqa", "prefixtune"),
            "prefixtune_bias_gqa/floor": paired(times, "prefixtune_bias_gqa", "floor"),
            "prefixtune_gc/prefixtune": paired(times, "prefixtune_gc", "prefixtune"),
            "prefixtune/prefixtune_keep_mask": paired(times, "prefixtune", "prefixtune_keep_mask"),
            "prefixtune_keep_mask/floor": paired(times, "prefixtune_keep_mask", "floor"),
        }
        for top in ("prefixtune", "prefixtune_logits", "prefixtune_chunk28", "prefixtune_gc", "prefixtune_mask"):
            if top in memory and "peft" in memory:
                ratios[f"peak {top}/peft"] = (memory[top] + weights[top]) / (memory["peft"] + weights["peft"])
        out["seq_len"][str(seq_len)] = {"batch": ids.shape[0], "arms": rows, "ratios": ratios}
        print(f"  seq {seq_len:>5} batch {ids.shape[0]:>4}: " + "  ".join(
            f"{n} {r['median_s'] * 1e3:.1f}ms/{(r['peak_with_params_bytes'] or 0) / 2**30:.2f}GiB"
            for n, r in rows.items() if "median_s" in r))
        print("      " + "  ".join(f"{k}={v:.3f}" for k, v in ratios.items() if v is not None))
    del arms
    return out


# ------------------------------------------------------------------------ 4. generate
def synced(run):
    def call(ids, mask, kw):
        out = run(ids, mask, kw)
        sync()
        return out
    return call


def generate_section(base, batch_sizes, new_tokens, prompt_len, repeats, warmup) -> dict:
    def plain():
        model = copy.deepcopy(base).eval()
        return synced(lambda ids, mask, kw: model.generate(input_ids=ids, attention_mask=mask, **kw)), model

    def prefixtune():
        wrapped = PrefixModel.wrap(copy.deepcopy(base), prefix_config()).eval()
        wrapped.materialize()
        return synced(lambda ids, mask, kw: wrapped.generate(input_ids=ids, attention_mask=mask, **kw)), wrapped

    def peft():
        model = peft_prefix_model(copy.deepcopy(base), PREFIX_LENGTH, HIDDEN).eval()
        return synced(lambda ids, mask, kw: model.generate(input_ids=ids, attention_mask=mask, **kw)), model

    def multi():
        torch.manual_seed(1)
        names = [f"p{i}" for i in range(gen_bench.NUM_MIXED)]
        wrapped = PrefixModel.wrap(copy.deepcopy(base), prefix_config(), name=names[0])
        for name in names[1:]:
            wrapped.add_prefix(name, prefix_config())
        wrapped.eval()
        wrapped.materialize()
        return wrapped, names

    def mixed():
        wrapped, names = multi()
        return synced(lambda ids, mask, kw: wrapped.generate(input_ids=ids, attention_mask=mask, prefix=names, **kw)), wrapped

    def sequential():
        wrapped, names = multi()

        def run(ids, mask, kw):
            return torch.cat([wrapped.generate(input_ids=ids[i: i + 1], attention_mask=mask[i: i + 1], prefix=n, **kw)
                              for i, n in enumerate(names)])
        return synced(run), wrapped

    builders = {"plain": plain, "prefixtune": prefixtune, "peft": peft}
    if gen_bench.NUM_MIXED in batch_sizes:
        builders.update(mixed=mixed, sequential=sequential)
    arms, failed = build_each(builders)
    gen_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 2}
    args = argparse.Namespace(prompt_len=prompt_len, new_tokens=new_tokens)
    out = {}
    for batch_size in batch_sizes:
        names = [n for n in gen_bench.ARMS if n not in gen_bench.MULTI_ARMS or batch_size == gen_bench.NUM_MIXED]
        here = {n: arms[n] for n in names if n in arms}
        failed_here = {n: failed[n] for n in names if n in failed}
        ids, mask = gen_bench.make_prompts(0, batch_size, prompt_len, base.config.vocab_size)
        ids, mask = ids.to(base.device), mask.to(base.device)
        times, outputs = gen_bench.run_interleaved(here, failed_here, ids, mask, gen_kwargs, repeats, warmup)
        summary = gen_bench.summarize(times, failed_here, outputs, batch_size * new_tokens, names)
        summary["prefixtune/peft"] = gen_bench.paired_speedup(times, "prefixtune", "peft")
        gen_bench.print_table(batch_size, args, summary)
        out[str(batch_size)] = summary
    del arms
    return out


# ------------------------------------------------------------------------ 6. profile
def device_profile(fn, steps: int) -> dict:
    """Wall ms per call, and the CUDA kernels' summed device ms and count per call, over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall = time.perf_counter() - start
    kernels = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = (getattr(event, "self_device_time_total", None) or event.self_cuda_time_total, event.count)
    return {"wall_ms": wall * 1e3 / steps, "kernel_ms": sum(t for t, _ in kernels.values()) / 1e3 / steps,
            "kernels": sum(c for _, c in kernels.values()) / steps,
            "by_kernel_us": {k: t / steps for k, (t, _) in kernels.items()}}


def profile_section(base, seq_len: int, tokens: int, new_tokens: int | None) -> dict:
    """Where prefixtune's extra time goes: GPU work (kernel time) or host overhead (wall - kernel).
    The training step as ``prefixtune train`` runs it (chunked loss) and with the model's own
    loss (``_logits``); batch-1 decoding of ``new_tokens`` tokens unless ``None``."""
    ids = scaling.batch(base.config.vocab_size, tokens, seq_len, "cpu").to(base.device)
    floor_model = copy.deepcopy(base).train().requires_grad_(False)
    wrapped = PrefixModel.wrap(copy.deepcopy(base), prefix_config()).train()

    def pt_step(logits):
        def run():
            wrapped.zero_grad(set_to_none=True)
            wrapped(input_ids=ids, labels=ids, return_logits=logits).loss.backward()
        return run

    cases = {"train floor": lambda: scaling.floor_step(floor_model, ids), "train prefixtune": pt_step(False),
             "train prefixtune_logits": pt_step(True)}
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


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = "tiny" if args.smoke else "smollm2-135m"
    train_shapes = ["tiny"] if args.smoke else args.train_shapes
    info = machine_info(torch.get_num_threads())
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    print("  ".join(f"{k}={v}" for k, v in info.items()))
    sizes = dict(
        seq_lens=[16, 32] if args.smoke else [128, 512, 1024, 2048],
        padded_seq_lens=[32] if args.smoke else [512, 2048],
        tokens=64 if args.smoke else 16384,
        repeats=1 if args.smoke else 5,
        warmup=1 if args.smoke else 2,
        gen_batches=[1, 8],
        new_tokens=4 if args.smoke else 64,
        gen_repeats=1 if args.smoke else args.gen_repeats,
    )
    results = {"machine": info, "dtype": str(dtype), "sizes": sizes, "sections": {}}
    base = scaling.random_model(shape, device, dtype)
    started = time.perf_counter()

    def section(name, fn):
        if name.split(":")[0] not in args.sections:
            return
        print(f"\n== {name}  (t={time.perf_counter() - started:.0f}s)", flush=True)
        try:
            results["sections"][name] = fn()
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
            traceback.print_exc()
            results["sections"][name] = {"error": f"{type(error).__name__}: {error}"}
        if args.json:
            write_json(args.json, results)
        if device == "cuda":
            torch.cuda.empty_cache()

    section("check", lambda: check_variants(base, device))
    section("kernels", lambda: kernel_cases(base, device))
    for train_shape in train_shapes:
        def run_train(train_shape=train_shape):
            model = base if train_shape == shape else scaling.random_model(train_shape, device, dtype)
            return train_section(model, sizes["seq_lens"], sizes["tokens"], sizes["repeats"], sizes["warmup"])
        section(f"train:{train_shape}", run_train)
    for train_shape in train_shapes:
        def run_padded(train_shape=train_shape):
            model = base if train_shape == shape else scaling.random_model(train_shape, device, dtype)
            return train_section(model, sizes["padded_seq_lens"], sizes["tokens"], sizes["repeats"], sizes["warmup"],
                                 padded=True)
        section(f"padded:{train_shape}", run_padded)
    section("generate", lambda: generate_section(base, sizes["gen_batches"], sizes["new_tokens"], 32,
                                                 sizes["gen_repeats"], 1))
    section("scaling", lambda: scaling.sweep(
        base, device, prefix_lengths=[1, 10, 50, 100, 200] if not args.smoke else [1, 10],
        seq_lens=[64, 128, 256, 512, 1024, 2048] if not args.smoke else [16, 32],
        layer_counts=[1, 8, 15, 23, 30] if not args.smoke else [1, 4], base_seq=512 if not args.smoke else 16,
        tokens=sizes["tokens"], repeats=3 if not args.smoke else 1, warmup=1,
        log=lambda line: print("  " + line, flush=True)))
    profile_shapes = ["tiny"] if args.smoke else args.profile_shapes
    for i, profile_shape in enumerate(profile_shapes):
        def run_profile(profile_shape=profile_shape, decode=i == 0):
            model = base if profile_shape == shape else scaling.random_model(profile_shape, device, dtype)
            return profile_section(model, 16 if args.smoke else 512, 64 if args.smoke else 16384,
                                   (4 if args.smoke else 16) if decode else None)
        section(f"profile:{profile_shape}", run_profile)
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
