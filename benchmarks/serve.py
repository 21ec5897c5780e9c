"""Serving throughput: N concurrent requests over N different prefixes, mixed in one batch
vs the same requests served one prefix at a time.

Run from the repository root:

    python -m benchmarks.serve --prefixes 4 8 16 --new-tokens 32 --repeats 3

The server is the real one (``prefixtune.serve``: the OpenAI-compatible app and its
continuous batcher) on a loopback port of this process, over the bundled
SmolLM2-135M-Instruct (float32). It serves ``N`` prefixes (length 10, reparameterized with
hidden 512 and random weights, materialized at load as the server always does). Each
request is a ``/v1/completions`` call with ``temperature=0``, ``max_tokens=T`` and
``ignore_eos=true``, so every request generates exactly ``T`` tokens; its prompt is one of
the demo task's prompts (different lengths, so rows are padded). Arms (``--arms``), each on the same
``N * --per-prefix`` requests:

* ``mixed``: all requests sent at once (one client thread each); the batcher decodes them
  together, one forward per step for all prefixes.
* ``one-at-a-time``: the prefixes in turn; a prefix's requests are sent together (with
  ``--per-prefix 1``, a single request), and the next prefix only once they are answered.
  This is what a server that batches one adapter at a time can do at best.
* ``base``: the same requests, all sent at once, to the base model (no prefix): the floor
  of ``mixed``, i.e. what carrying ``N`` different prefixes costs the batch.

Arms are interleaved (each repeat runs every arm, rotating the order) after one untimed
warm-up each; the table shows median seconds, generated tokens per second (requests x T /
seconds) and the median of the per-repeat paired ratios to ``mixed``. The warm-up outputs of
``mixed`` and ``one-at-a-time`` are compared text for text (greedy: they must be identical). ``--via batcher`` measures the batcher alone,
without HTTP; ``--random-weights`` builds ``--model`` (a folder with its config and tokenizer)
with random weights, for a GPU machine without a copy of the weights (speed does not depend on
their values). ``--json PATH`` writes the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import queue
import statistics
import time
from pathlib import Path

import torch

from prefixtune import PrefixModel
from prefixtune.base_models import load_model
from prefixtune.demo import examples
from prefixtune.serve.batcher import Batcher, Request
from prefixtune.serve.limits import Limits
from prefixtune.serve.prometheus import Metrics
from prefixtune.serve.sampling import SamplingParams

from .arms import HIDDEN, PREFIX_LENGTH, prefix_config
from .common import paired_ratio, rotated, settings, start, write_json

BASE = "base"
ARMS = ("mixed", "one-at-a-time", "base")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, nargs="+", default=[4, 8, 16], help="values of N")
    parser.add_argument("--per-prefix", type=int, default=1, help="requests per prefix")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (T)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per arm and N")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:2]),
                        help="arms to run; 'mixed' always runs (the others are compared with it)")
    parser.add_argument("--via", choices=["http", "batcher"], default="http")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="base model (default: the bundled one)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --model (a folder with config.json and the tokenizer) with random weights: "
                        "same shapes and speed, no weights file to carry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def load_base(args):
    if not args.random_weights:
        return load_model(args.model)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(args.model)


def build_batcher(count: int, args) -> Batcher:
    model, tokenizer = load_base(args)
    pm = PrefixModel(model.to(args.device), tokenizer=tokenizer)
    torch.manual_seed(args.seed)
    for i in range(count):
        pm.add_prefix(f"p{i}", prefix_config())
    return Batcher(pm, tokenizer, BASE, Limits(max_batch=256, max_queue=1024), on_step=Metrics().step)


class HTTPClient:
    """Sends requests to the server, one thread per request in flight."""

    def __init__(self, url: str, workers: int):
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)

    def run(self, jobs: list[tuple[str, str]], tokens: int) -> list[str]:
        def one(job):
            model, prompt = job
            out = self.client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                 extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == tokens
            return out.choices[0].text

        return list(self.pool.map(one, jobs))


class DirectClient:
    """Submits to the batcher directly (no HTTP)."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def run(self, jobs: list[tuple[str, str]], tokens: int) -> list[str]:
        done, texts = queue.Queue(), [""] * len(jobs)
        requests = []
        for i, (model, prompt) in enumerate(jobs):
            def sink(event, i=i):
                texts[i] += event.text
                if event.finish_reason or event.error:
                    done.put(event.error)
            ids = self.batcher.tokenizer(prompt).input_ids
            requests.append(Request(ids, model, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                                    sink))
        self.batcher.submit(requests)
        errors = [done.get() for _ in requests]
        assert not any(errors), errors
        return texts


def run_arm(arm: str, client, jobs: list[tuple[str, str]], tokens: int) -> tuple[float, list[str]]:
    begin = time.perf_counter()
    if arm in ("mixed", "base"):
        texts = client.run(jobs if arm == "mixed" else [(BASE, prompt) for _, prompt in jobs], tokens)
    else:
        texts, order = [""] * len(jobs), list(dict.fromkeys(model for model, _ in jobs))
        for model in order:
            mine = [i for i, job in enumerate(jobs) if job[0] == model]
            for i, text in zip(mine, client.run([jobs[i] for i in mine], tokens)):
                texts[i] = text
    return time.perf_counter() - begin, texts


def measure(client, count: int, args) -> dict:
    arms = list(dict.fromkeys(["mixed", *args.arms]))
    prompts = [ex.prompt for ex in examples(count * args.per_prefix, args.seed)]
    jobs = [(f"p{i % count}", prompt) for i, prompt in enumerate(prompts)]
    warm = {arm: run_arm(arm, client, jobs, args.new_tokens)[1] for arm in arms}
    times = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in rotated(arms, repeat):
            times[arm].append(run_arm(arm, client, jobs, args.new_tokens)[0])
    tokens = len(jobs) * args.new_tokens
    summary = {
        "requests": len(jobs), "tokens": tokens,
        "arms": {arm: {"seconds": times[arm], "median_s": statistics.median(times[arm]),
                       "tokens_per_s": tokens / statistics.median(times[arm]),
                       # mixed's throughput over this arm's, paired per repeat
                       "mixed_vs_arm": paired_ratio(times, arm, "mixed")}
                 for arm in arms},
    }
    if "one-at-a-time" in arms:
        summary["speedup_median"] = summary["arms"]["one-at-a-time"]["mixed_vs_arm"]
        summary["identical_outputs"] = warm["mixed"] == warm["one-at-a-time"]
    return summary


def print_table(count: int, summary: dict) -> None:
    same = summary.get("identical_outputs")
    print(f"\nN = {count} prefixes, {summary['requests']} requests, {summary['tokens']} tokens"
          + ("" if same is None else f" (mixed and one-at-a-time outputs identical: {'yes' if same else 'NO'})"))
    print(f"{'arm':<16}{'median s':>10}{'tokens/s':>12}{'mixed / arm':>14}")
    for arm, row in summary["arms"].items():
        print(f"{arm:<16}{row['median_s']:>10.2f}{row['tokens_per_s']:>12.1f}{row['mixed_vs_arm']:>13.3f}x")
    print("(mixed / arm: mixed's throughput over the arm's, median of paired ratios)")


def main(argv=None) -> None:
    args = parse_args(argv)
    results = start(__file__, argv, args.threads)
    print(f"via={args.via} repeats={args.repeats} per_prefix={args.per_prefix} new_tokens={args.new_tokens} "
          f"prefix_length={PREFIX_LENGTH} hidden={HIDDEN} device={args.device}")
    batcher = build_batcher(max(args.prefixes), args)
    results.update(args=settings(args), prefixes={})
    workers = max(args.prefixes) * args.per_prefix
    if args.via == "http":
        from prefixtune.serve.app import create_app
        from prefixtune.serve.background import BackgroundServer

        server = BackgroundServer(create_app(batcher)).start()
        client = HTTPClient(server.url, workers)
    else:
        server, client = None, DirectClient(batcher.start())
    try:
        for count in args.prefixes:
            summary = measure(client, count, args)
            print_table(count, summary)
            results["prefixes"][str(count)] = summary
            write_json(args.json, results)
    finally:
        if server is not None:
            server.stop()
        batcher.close()
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
