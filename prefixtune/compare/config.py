"""What ``prefixtune compare`` runs: one dataclass, so the command line, ``--config FILE`` and
the ``config`` block of ``compare.json`` are the same thing."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import EVAL_WHERE, TRAIN_WHERE, DataOptions, StepOptions, names, option_field
from ..data import filters
from ..options import split_list

QUICK = dict(max_steps=8, batch_size=4, train_limit=400, eval_prompts=6, max_new_tokens=40, warmup_steps=2)
"""What ``--quick`` changes (options given explicitly on the command line or in --config win)."""

MAX_THREADS = 1024
"""The most torch threads a method takes: more than any CPU's cores (torch would start them all, for each method,
and fail late)."""


@dataclass
class CompareConfig(StepOptions, DataOptions):
    """The same task, data, step budget and seed under several fine-tuning methods."""

    data: str | None = option_field(None, "training data (same formats as train; default: the built-in demo task)",
                                    check=names("a data file or a datasets name"))
    eval_data: str | None = option_field(None, "held-out data scored after training (default: the demo's held-out set)",
                                         check=names("a data file or a datasets name"))
    output_dir: str = option_field("runs/compare", "where compare.md, compare.json, compare.png and each method's folder go",
                                   check=names("a folder"))
    methods: str = option_field("base,prefix-mup,prefix,peft-prefix,prompt,lora,adapter,full,qlora",
                        "comma-separated methods (see --list-methods); 'base' scores the untuned model")
    seeds: tuple[int, ...] | None = option_field(None, "run every method once per seed, e.g. 0,1,2 (the methods of a seed "
                                         "share its data order); the table gives the mean ± sd over seeds and the "
                                         "paired differences from --reference. Without it, --seed alone", min_length=1)
    reference: str | None = option_field(None, "the method the paired differences are taken from (method - reference, seed by "
                                 "seed; default: the first of --methods)")
    quick: bool = option_field(False, "a few-minute smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                       + " (options you give still win)")
    max_steps: int = option_field(120, "optimizer steps per method (the same for every method)", ge=1)
    lr: str | None = option_field(None, "peak learning rates: one number for every method, or method=value pairs such as "
                          "'prefix=1e-2,lora=1e-2' (the rest keep their defaults, see --list-methods)")
    train_limit: int | None = option_field(None, "use only the first N training rows", ge=1)
    train_sample: int | None = option_field(None, "train on N rows drawn at random (seeded by --seed) from the training "
                                    "data: the paper's low-data setting", ge=1)
    eval_limit: int | None = option_field(None, "read only the first N evaluation rows", ge=1)
    train_where: str | None = option_field(None, TRAIN_WHERE)
    eval_where: str | None = option_field(None, EVAL_WHERE)
    eval_sets: str | None = option_field(None, "score on several named subsets of --eval-data instead, 'NAME:FILTER;NAME:FILTER' "
                                 "such as 'seen:category!=City,Food,Monument;unseen:category=City,Food,Monument' (each "
                                 "its first --eval-prompts inputs; the table shows the first set, compare.json each "
                                 "under its row's 'sets')")
    eval_prompts: int = option_field(50, "distinct evaluation prompts decoded and scored (all their references count)", ge=1)
    eval_sample: int | None = option_field(None, "score N distinct evaluation prompts drawn at random instead of the first "
                                   "--eval-prompts (the same draw for every method and seed: evaluation files sorted "
                                   "by category or length then still give a fair sample)", ge=1)
    eval_batch_size: int | None = option_field(None, "prompts decoded at once when scoring (default: --batch-size)", ge=1)
    metrics: str = option_field("bleu,rouge_l", "comma-separated generation metrics (bleu, nist, meteor, rouge_l, cider, ter, "
                        "...; ter is lower-is-better)")
    prefix_length: int = option_field(10, "prefix / virtual-token length of prefix, peft-prefix and prompt", ge=1)
    reparam_hidden_size: int = option_field(512, "width of the prefix reparameterization MLP (prefix and peft-prefix)", ge=1)
    init_text: str = option_field("table-to-text:", "the real words whose activations seed 'prefix-words' (the paper's "
                          "initialization for low-data table-to-text)")
    lora_r: int = option_field(8, "LoRA rank (lora, qlora)", ge=1)
    lora_alpha: int = option_field(8, "LoRA alpha (lora, qlora; PEFT's default)", ge=1)
    lora_targets: str = option_field("q_proj,v_proj", "modules LoRA adapts (lora, qlora)")
    adapter_size: int = option_field(64, "bottleneck width of the Houlsby adapters", ge=1)
    threads: int | None = option_field(None, "torch CPU threads per method (default: torch's choice; on a machine shared with "
                                "other jobs, 1 can be several times faster than oversubscribed threads)", ge=1,
                                le=MAX_THREADS)
    isolate: bool = option_field(True, "run each method in its own process (clean peak-memory numbers; a crash "
                         "costs one row, not the run)")
    keep_checkpoints: bool = option_field(False, "keep checkpoints over 100 MB (full fine-tuning) instead of deleting "
                                  "them once measured")
    quiet: bool = option_field(False, "no per-step loss lines (the progress bar of each method stays)")

    def problems(self):
        """``(option, message)`` for each rule between options that is broken (``options.check``)."""
        yield from filters.problems(self, "train_where", "eval_where", named=("eval_sets",))
        if self.eval_sets and self.eval_where:
            yield "eval_sets", "give --eval-sets or --eval-where, not both (each set is its own filter)"
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            yield "seeds", f"names a seed twice: {','.join(map(str, self.seeds))}"
        if self.reference and self.reference not in split_list(self.methods):
            yield "reference", f"must be one of --methods ({self.methods}), got {self.reference!r}"
        if self.data is not None and not self.eval_data:
            yield "eval_data", "is required with --data: the held-out examples to score"
