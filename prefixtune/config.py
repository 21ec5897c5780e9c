"""Typed configuration, as dataclasses: one prefix (:class:`PrefixConfig`) and what each command does.

The same objects drive construction, are written next to the weights and runs as JSON/YAML,
and are read back without any pickle. The command line is generated from them
(:mod:`prefixtune.options`): each field's ``help`` is its ``--help`` line, and a run's
``TrainConfig`` holds the ``PrefixConfig`` it trains, whose fields are options of their own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import options, recipe
from .data import filters

INITS = ("random", "text")
KINDS = ("kv", "memory")
DEMO_EVAL_EVERY, DEMO_EVAL_PROMPTS = 20, 8
"""How often, and on how many prompts, ``prefixtune train`` evaluates its built-in demo by default."""
TARGETS = ("encoder", "decoder", "cross")  # the attentions a prefix can enter (prefixtune.arch.GROUPS)
TRAIN_WHERE = ("train only on the rows whose FIELD matches: 'FIELD=V1,V2' keeps those values, 'FIELD!=V1,V2' drops "
               "them, e.g. 'category!=City,Food,Monument' (values as text, exact; --train-limit counts kept rows)")
EVAL_WHERE = ("evaluate only on the rows whose FIELD matches: 'FIELD=V1,V2' keeps those values, 'FIELD!=V1,V2' "
              "drops them, e.g. 'category=City,Food,Monument' (values as text, exact; --eval-limit counts kept rows)")


MAX_POSITIONS = 1 << 16
"""The longest prefix and the widest MLP a config accepts (65,536): longer than any supported model's context."""
MAX_BEAMS = 64
"""The widest beam search an option takes: each beam holds a copy of the cache, and beam search gains little
past a few beams."""
MAX_SEED = (1 << 63) - 1
"""The largest seed torch, Python's ``random`` and NumPy all take."""
MAX_LR = 1e30
"""The largest learning rate an option takes: float32, where the optimizer keeps its rates, holds no more
than about 3.4e38. Rates far above any that trains stay allowed: they diverge, and training stops on it."""


def device_problem(name: str) -> str | None:
    """What is wrong with ``--device name``, or ``None``: ``auto`` or a device torch can name. Whether the
    machine has it is checked where the run starts (``runtime.pick_device``): a config may travel."""
    if name == "auto":
        return None
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return "must be auto, cpu, cuda, cuda:N, mps or another torch device name"
    return None


def option_field(default=dataclasses.MISSING, help: str = "", factory=dataclasses.MISSING, **extra):
    """A dataclass field whose help text becomes the command line's ``--help`` line. ``option``
    in ``extra`` renames it on the command line and in YAML (``dropout`` is ``prefix_dropout``
    there); ``choices`` and ``unescape`` shape its parsing; ``ge``/``gt``/``le``/``lt``/``min_length``,
    ``unique`` (a list names each value once) and ``check`` (a function returning what is wrong with the
    value, or ``None``) are checked with its type (:mod:`prefixtune.options`)."""
    return field(default=default, default_factory=factory, metadata={"help": help, **extra})


def names(what: str):
    """The ``check`` of an option that names a file, folder, field or address: a blank one names nothing (a
    path of ``""`` is the current folder; a host of ``""`` is every interface), so it is refused. Unlike
    ``min_length``, it leaves the characters alone: a file name of bytes that are not UTF-8 stays usable."""
    return lambda value: f"must name {what}" if value is not None and not value.strip() else None


@dataclass
class PrefixConfig:
    """How to build one trainable prefix (Li & Liang 2021, arXiv:2101.00190).

    Args:
        kind: ``"kv"``: key/value positions in front of each attention's own (the paper's
            prefix). ``"memory"``: a term ``φ(q)ᵀ M`` added to each head's output, outside the
            softmax, so that the input's length does not dilute it (PrefixMemory-Tuning, Wang et
            al. 2026; :mod:`prefixtune.memory`). A memory starts at zero and trains directly:
            ``prefix_length``, the MLP options, ``init`` and ``shift_positions`` are for ``"kv"``.
        prefix_length: ``L_p``, the number of key/value positions put in front of every
            prefixed attention layer. The paper uses 5-10 for table-to-text and 200 for
            summarization.
        reparameterize: Produce the prefix through the paper's MLP (embedding ->
            Linear -> Tanh -> Linear) instead of training the key/values directly
            (P-Tuning v2 style). The paper reports that the MLP stabilises training; it
            can be folded away afterwards with ``PrefixModel.materialize``.
        reparam_hidden_size: Width of the embedding and of the MLP's hidden layer
            (the paper's ``mid_dim``, 512).
        reparam_lr: ``"width"`` (the default): the MLP's two weight matrices train at the rate
            divided by ``reparam_hidden_size`` (their fan-in), the embedding and the biases at the
            rate, as muP sets Adam's rates (Yang et al. 2021): each weight's step moves an output
            by the rate times the sum of its ``width`` inputs, so the division keeps the MLP's
            steps the size a flat prefix's are, and one rate suits both (:mod:`prefixtune.recipe`).
            ``"same"``: every MLP parameter trains at the learning rate, as in the paper.
        dropout: Dropout on the prefix key/values while training (the paper's
            ``prefix_dropout``). Has no effect in eval mode.
        init: ``"random"``, or ``"text"`` to start from the frozen model's own
            key/values for ``init_text`` (the paper's "initialize with real words",
            which matters most in low-data settings, section 7.2). Left ``None``, it is
            ``"text"`` when ``init_text`` is given, else ``"random"``.
        init_text: The text whose activations seed the prefix when ``init="text"``.
            Its tokens are repeated or cut to exactly ``prefix_length`` tokens.
        init_std: Standard deviation of the random initialization of a flat prefix.
        init_fit_steps: When ``init="text"`` and ``reparameterize=True``, the number of
            Adam steps used to fit the MLP so that it reproduces those activations.
        layers: Indices of the attention layers that get a prefix; ``None`` means all.
            Negative indices count from the end, as in Python.
        shift_positions: Give the real tokens positions ``L_p, L_p+1, ...`` (the
            original GPT-2 implementation and PEFT do so). Then a prefix equal to the
            model's own key/values for tokens ``p`` makes the model behave exactly as on
            ``p + x``. With ``False`` the real tokens keep positions ``0, 1, ...``.
            Models that number positions themselves (T5, BART, encoders) are never shifted.
        targets: Which attentions get a prefix, each with its own key/values: the
            encoder's self-attention, the decoder's self-attention and the decoder's
            cross-attention over the encoder (Li & Liang's BART setup uses all three). A
            model uses the ones it has: a decoder-only model only "decoder", an encoder
            only "encoder". ``layers`` applies within each target.
    """

    kind: str = option_field("kv", "kv: key/value positions in front of each attention's own | memory: a term added to "
                             "each head's output outside the softmax, which a long input does not dilute (starts at "
                             "zero; the length, MLP and init options are for kv)", option="prefix_kind", choices=KINDS)
    prefix_length: int = option_field(10, "trainable key/value positions per layer (the paper: 5-10 for table-to-text)", ge=1,
                                      le=MAX_POSITIONS)
    reparameterize: bool = option_field(True, "produce the prefix through the paper's MLP (--no-reparameterize: train it directly)")
    reparam_hidden_size: int = option_field(512, "width of the reparameterization MLP (the paper's mid_dim)", ge=1,
                                            le=MAX_POSITIONS)
    reparam_lr: str = option_field("width", "width: the MLP's weight matrices train at --lr divided by "
                                   "--reparam-hidden-size (muP), its embedding and biases at --lr | same: the whole MLP "
                                   "at --lr (the paper's; take a rate near 1e-3)", choices=("same", "width"))
    dropout: float = option_field(0.0, "dropout on the prefix key/values while training", option="prefix_dropout", ge=0, lt=1)
    init: str | None = option_field(None, "random, or text: start from the model's activations for --init-text (default: text "
                            "when --init-text is given)", choices=INITS)
    init_text: str | None = option_field(None, "initialize the prefix from the model's activations for this text (the paper's "
                                 "'real words')")
    init_std: float = option_field(0.02, "standard deviation of a flat prefix's random initialization", ge=0)
    init_fit_steps: int = option_field(400, "Adam steps that fit the MLP to the --init-text activations", ge=0)
    layers: tuple[int, ...] | None = option_field(None, "comma-separated layer indices that get a prefix (default: all)",
                                                  min_length=1, unique=True)
    shift_positions: bool = option_field(True, "give the real tokens positions L_p, L_p+1, ... as PEFT and the paper's code do")
    targets: tuple[str, ...] = option_field(TARGETS, "comma-separated attentions that get a prefix: encoder, decoder, cross "
                                    "(those the model has)", choices=TARGETS, min_length=1)

    def __post_init__(self) -> None:
        if self.init is None:
            self.init = "text" if self.init_text else "random"
        options.check(self)

    def problems(self):
        """``(option, message)`` for each rule between fields that is broken (:func:`options.check`)."""
        if self.init == "text" and not self.init_text:
            yield "init_text", "init='text' needs init_text, the text whose activations seed the prefix"
        if self.kind == "memory" and self.init == "text":
            yield "init", "a memory prefix starts at zero (the base model exactly); --init-text seeds a kv prefix"
        if self.init == "random" and self.init_text:
            yield "init", f"init='random' would ignore init_text {self.init_text!r}: set init='text', or drop init_text"

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        if out["layers"] is not None:
            out["layers"] = list(out["layers"])
        out["targets"] = list(out["targets"])
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "PrefixConfig") -> "PrefixConfig":
        """Build from ``to_dict`` output read from ``where`` (a saved prefix's config file, for messages); an
        unknown key is an error, not silently dropped, and a bad value is named by its key, not as an option."""
        fields = {f.metadata.get("option", f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields.values()))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
        try:
            return cls(**data)
        except options.OptionError as err:
            raise ValueError(f"{where}: {fields.get(err.option, err.option)}: {err.message}") from None

    def replace(self, **changes) -> "PrefixConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class Checked:
    """A config dataclass that checks its values when it is built (:func:`prefixtune.options.check`)."""

    def __post_init__(self) -> None:
        options.check(self)


@dataclass
class TaskOption(Checked):
    """What the model does with the examples: train, eval and generate take either task (compare: ``lm``)."""

    task: str = option_field("lm", "lm: complete prompts with a causal LM (the default) | classification: an encoder (BERT, "
                     "RoBERTa, DistilBERT; default the bundled MiniLM) whose task head trains with the prefix, on "
                     "--text-field/--label-field data, scored by accuracy", choices=("lm", "classification"))


@dataclass
class DataOptions(Checked):
    """Where examples come from and how they become tokens (shared by train, eval, generate and compare)."""

    model: str | None = option_field(None, "Hub id or local folder of the base model (default: the bundled SmolLM2-135M-Instruct)",
                                     check=names("a model folder or a Hub id"))
    prompt_field: str = option_field("prompt", "field/column holding the input text", check=names("a field"))
    completion_field: str = option_field("completion", "field/column holding the target text", check=names("a field"))
    text_field: str | None = option_field(None, "classification: field holding the text (use with --label-field)",
                                          check=names("a field"))
    label_field: str | None = option_field(None, "classification: field holding the label, trained as the completion",
                                           check=names("a field"))
    prompt_template: str | None = option_field(None, "format string for the prompt, e.g. 'Table: {prompt}\\nText:' (\\n and \\t "
                                       "typed on the command line become a line break and a tab); any field name works",
                                       unescape=True)
    chat_template: bool = option_field(False, "wrap prompts in the model's chat template (chat 'messages' data always is)")
    max_length: int = option_field(256, "maximum tokens of prompt + completion", ge=1)
    overflow: str = option_field("truncate", "longer examples: 'truncate' (cut the prompt's start, counted in the log) or 'fail'",
                         choices=("truncate", "fail"))
    first_line: bool = option_field(True, "keep only the first line of generated text (one-sentence tasks such as E2E)")
    batch_size: int = option_field(8, "examples per step (train: the global batch, however accumulation and processes split it)",
                           ge=1)
    max_new_tokens: int = option_field(64, "generation length limit (with the prompt, within the model's context)",
                                       ge=1, le=MAX_POSITIONS)
    num_beams: int = option_field(1, "beam size for generation (1 = greedy)", ge=1, le=MAX_BEAMS)
    device: str = option_field("auto", "cpu, cuda, cuda:1, ... or auto", check=device_problem)
    split: str = option_field("train", "split to read where the examples come from a Hugging Face datasets name instead of a file",
                              check=names("a split"))
    attn_implementation: str = option_field("sdpa", "attention kernel of the base model: sdpa or eager (Gemma 2 needs eager)",
                                    choices=("sdpa", "eager"))

    def source_fields(self) -> dict:
        """The keyword arguments of ``data.load_examples`` that these options set."""
        return dict(prompt_field=self.prompt_field, completion_field=self.completion_field,
                    text_field=self.text_field, label_field=self.label_field, split=self.split)


@dataclass
class StepOptions(Checked):
    """How each optimizer step runs: shared by ``prefixtune train`` and ``prefixtune compare``,
    which train through the same step function (``prefixtune.train.Stepper``)."""

    weight_decay: float = option_field(0.0, "AdamW weight decay", ge=0)
    schedule: str = option_field("linear", "learning-rate decay after warmup", choices=("linear", "cosine", "constant"))
    warmup_steps: int = option_field(10, "steps of linear warmup from 0 to the peak learning rate", ge=0)
    max_grad_norm: float = option_field(0.0, "clip the gradient of what trains to this norm (0 = no clipping, the default: "
                                        "at short budgets clipping slows prefix tuning most, docs/training.md)", ge=0)
    precision: str = option_field("fp32", "fp32, or bf16/fp16 autocast where the device supports it",
                          choices=("fp32", "bf16", "fp16"))
    seed: int = option_field(0, "seed for initialization, data order, dropout and sampled subsets", ge=0, le=MAX_SEED)


@dataclass
class TrainConfig(StepOptions, DataOptions, TaskOption):
    """Everything ``prefixtune train`` does; written next to the results and replayable with ``--config``."""

    data: str | None = option_field(None, "training data: .jsonl/.json/.csv/.tsv/.parquet file or datasets name (default: the built-in demo task)",
                                    check=names("a data file or a datasets name"))
    eval_data: str | None = option_field(None, "held-out data for evaluation during and after training",
                                         check=names("a data file or a datasets name"))
    output_dir: str = option_field("runs/prefix", "where the prefix, checkpoints, metrics.jsonl, curves.png and config.yaml go",
                                   check=names("a folder"))
    train_limit: int | None = option_field(None, "use only the first N training examples (the paper's low-data setting)", ge=1)
    eval_limit: int | None = option_field(None, "use only the first N evaluation examples", ge=1)
    train_where: str | None = option_field(None, TRAIN_WHERE)
    eval_where: str | None = option_field(None, EVAL_WHERE)
    prefix_config: PrefixConfig = option_field(help="the prefix (each of its fields is an option)", factory=PrefixConfig)
    lr: float | None = option_field(None, f"peak AdamW learning rate (default: {recipe.RATES['mlp-width']:g} for a kv prefix "
                                    f"through the MLP at --reparam-lr width, {recipe.RATES['flat']:g} flat, "
                                    f"{recipe.RATES['mlp-same']:g} through the MLP at --reparam-lr same; "
                                    f"{recipe.RATES['memory']:g} for a memory prefix)", ge=0, le=MAX_LR)
    epochs: float = option_field(1.0, "passes over the training data (ignored when --max-steps is set)", gt=0)
    max_steps: int | None = option_field(None, "optimizer steps to run (overrides --epochs)", ge=1)
    micro_batch_size: int | None = option_field(None, "examples per forward pass (default: the whole batch); accumulates "
                                        "gradients", ge=1)
    gradient_checkpointing: bool = option_field(False, "recompute the frozen layers in backward to save memory")
    eval_every: int | None = option_field(None, "evaluate every N steps (0 = only at the end; default: every 20 steps on "
                                  "the built-in demo, else only at the end)", ge=0)
    save_every: int = option_field(50, "write a resumable checkpoint every N steps (0 = never)", ge=0)
    metric: str = option_field("loss", "metric that picks the best prefix and drives early stopping: loss, or a generation "
                       "metric such as bleu (the lowest loss, perplexity or ter wins, the highest of any other)")
    metrics: str = option_field("bleu,rouge_l", "comma-separated generation metrics computed at evaluation")
    patience: int = option_field(0, "stop after N evaluations without improvement of --metric (0 = never)", ge=0)
    eval_generate_limit: int | None = option_field(None, "distinct eval prompts decoded for the generation metrics of an "
                                           "evaluation during training (default: 8 on the built-in demo, else 50; "
                                           "the final evaluation decodes them all)", ge=1)
    resume: bool = option_field(False, "continue from OUTPUT_DIR/checkpoint after a crash or Ctrl-C")

    def learning_rate(self) -> float:
        """``lr``, or the rate that suits how the prefix is built (:func:`prefixtune.recipe.default_lr`)."""
        return self.lr if self.lr is not None else recipe.default_lr(self.prefix_config)

    def evaluations_every(self) -> int:
        """Steps between evaluations during training: ``eval_every``, or by default every
        :data:`DEMO_EVAL_EVERY` steps on the built-in demo (so its curves show the run) and none
        before the end elsewhere."""
        if self.eval_every is not None:
            return self.eval_every
        return DEMO_EVAL_EVERY if self.data is None else 0

    def generate_limit(self) -> int:
        """``eval_generate_limit``, or its default: a small slice on the demo, 50 elsewhere."""
        if self.eval_generate_limit is not None:
            return self.eval_generate_limit
        return DEMO_EVAL_PROMPTS if self.data is None else 50

    def problems(self):
        """``(option, message)`` for each rule between options that is broken (:func:`options.check`)."""
        yield from filters.problems(self, "train_where", "eval_where")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            yield "micro_batch_size", f"must be at most --batch-size ({self.batch_size}), got {self.micro_batch_size}"
        if self.eval_data is None and self.data is not None:
            for name in ("eval_every", "patience"):
                if getattr(self, name):
                    yield name, "needs --eval-data (the held-out examples it evaluates on)"
        if self.task == "classification":
            if self.metric not in ("loss", "accuracy"):
                yield "metric", f"a classifier is scored by loss or accuracy, got {self.metric!r}"
            if self.data is None:
                yield "data", "--task classification needs --data (with --text-field and --label-field)"
        elif self.metric not in ("loss", "perplexity", *options.split_list(self.metrics)):
            yield "metric", f"must be loss, perplexity or one of --metrics ({self.metrics}), got {self.metric!r}"


@dataclass
class EvalConfig(DataOptions, TaskOption):
    """What ``prefixtune eval`` does."""

    prefix: str | None = option_field(None, "folder of a saved prefix (a training run's --output-dir); omit to score the base model",
                                      check=names("a saved prefix's folder"))
    data: str | None = option_field(None, "evaluation data (same formats as train)",
                                    check=names("a data file or a datasets name"))
    metrics: str = option_field("bleu,rouge_l", "comma-separated: bleu, nist, meteor, rouge_l, cider, ter (lower is better), accuracy, "
                        "exact_match (loss and perplexity always)")
    limit: int | None = option_field(None, "score only the first N examples", ge=1)
    eval_where: str | None = option_field(None, EVAL_WHERE.replace("--eval-limit", "--limit"))
    group_by: str | None = option_field(None, "also score the rows of each value of this field of the data (e.g. category): "
                                "a row per value, each with the corpus metrics of its own inputs, under the overall row")
    output: str | None = option_field(None, "write the metrics (and the generations) as JSON here", check=names("a file"))

    def problems(self):
        """``(option, message)`` for each rule between options that is broken (:func:`options.check`)."""
        yield from filters.problems(self, "eval_where")
        yield from output_problems(self.output, data=self.data)
        if self.group_by is not None and self.task == "classification":
            yield "group_by", "scores generation tasks; --task classification reports its accuracy overall"


def output_problems(output: str | None, **inputs: str | None):
    """``--output`` is written when the run is done: a folder, or a file the run reads (``inputs``: option name,
    one word, -> path) would lose the results or the input, so they are refused first (a blank name: by
    :func:`names`)."""
    if output is None or not output.strip():  # a blank one: names() says
        return
    path = Path(output)
    if path.is_dir():
        yield "output", f"{output} is a folder: give the name of a file to write"
    elif path.exists():
        for option, source in inputs.items():
            if source and Path(source).is_file() and os.path.samefile(source, path):
                yield "output", f"{output} is the --{option} file: writing it would replace what this reads"


@dataclass
class GenerateConfig(DataOptions, TaskOption):
    """What ``prefixtune generate`` does."""

    prefix: str | None = option_field(None, "folder of a saved prefix; omit to generate with the base model",
                                      check=names("a saved prefix's folder"))
    prompt: str | None = option_field(None, "one prompt to complete", min_length=1)
    input: str | None = option_field(None, "file of prompts (same formats as train; completions not needed)",
                                     check=names("a file of prompts"))
    output: str | None = option_field(None, "write {prompt, generation} JSON lines here instead of printing",
                                      check=names("a file"))
    do_sample: bool = option_field(False, "sample instead of greedy/beam decoding")
    temperature: float = option_field(1.0, "sampling temperature (with --do-sample), at least 1e-4 (near-greedy; for greedy "
                                      "decoding leave --do-sample out)", ge=1e-4)
    top_p: float = option_field(1.0, "nucleus sampling mass (with --do-sample)", gt=0, le=1)
    seed: int = option_field(0, "seed for sampling", ge=0, le=MAX_SEED)

    def problems(self):
        """``(option, message)`` for each rule between options that is broken (:func:`options.check`)."""
        yield from output_problems(self.output, input=self.input)
