"""Task metrics, computed the way the official E2E NLG Challenge scorer computes them.

The Prefix-Tuning paper (Li & Liang 2021, arXiv:2101.00190, Table 1) reports E2E results
from the challenge's scorer, tuetschek/e2e-metrics ``measure_scores.py``. That script
runs two families of scorers, and so does this module:

* BLEU and NIST as ``mteval-v13a`` computes them (the script's ``-p`` Python port,
  ``metrics/pymteval.py``, is meant to agree with the Perl): on the raw text, lowercased,
  with mteval's ``13a`` tokenization, one corpus-level score over all inputs.
* METEOR, ROUGE-L and CIDEr from the MS-COCO caption scorers (``pycocoevalcap``), fed
  text that the Stanford PTB tokenizer has lowercased and split, with punctuation tokens
  dropped. Here that tokenizer is imitated in Python (``_ptb_tokenize``) so that
  ROUGE-L and CIDEr need no Java.

Every input may have several references, as E2E does (up to ~40 per input).
TER (translation edit rate, the WebNLG challenge's third metric) comes from sacrebleu;
it is an error rate, so lower is better (:data:`LOWER_IS_BETTER`).
``accuracy`` and ``exact_match`` are for classification cast as generation.

Scales follow the paper's table: BLEU, METEOR, ROUGE-L, TER, accuracy and exact_match on
0-100; NIST and CIDEr raw (the paper's GPT-2 prefix row: BLEU 69.7, NIST 8.81,
METEOR 46.1, ROUGE-L 71.4, CIDEr 2.49).

The heavy packages are imported only by the metric that needs them, so importing this
module costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

METRICS: tuple[str, ...] = ("bleu", "nist", "meteor", "rouge_l", "cider", "ter", "accuracy", "exact_match")

LOWER_IS_BETTER = frozenset({"ter", "loss", "perplexity"})
"""The scores where less is better (TER counts edits); every other metric is higher-is-better.
Whatever picks or marks "the best" reads this (:func:`lower_is_better`)."""


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of ``name`` (a metric, ``loss`` or ``perplexity``) is the better one."""
    return name in LOWER_IS_BETTER

Refs = Sequence[Sequence[str]]


def compute_metrics(
    names: Sequence[str], hypotheses: Sequence[str], references: Refs
) -> dict[str, float]:
    """Score system outputs against one or more references each.

    Args:
        names: Metrics to compute, each one of :data:`METRICS`.
        hypotheses: One system output per input.
        references: ``references[i]`` lists the references for ``hypotheses[i]``
            (at least one; the number may differ from input to input).

    Returns:
        ``{name: score}`` in the order of ``names``; scales as in the module docstring.

    Raises:
        ValueError: An unknown metric name, no inputs, a length mismatch, or an input
            without references.
        TypeError: A string where a list is expected (e.g. ``references=["ref"]``).
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of metric names, e.g. [{names!r}]")
    unknown = [name for name in names if name not in _SCORERS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    _check_inputs(hypotheses, references)
    return {name: float(_SCORERS[name](hypotheses, references)) for name in names}


def _check_inputs(hypotheses: Sequence[str], references: Refs) -> None:
    """Fail early and clearly on the shapes that would otherwise score garbage."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses and references must be sequences, not a single string")
    if len(hypotheses) == 0:
        raise ValueError("no hypotheses to score: got an empty list")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but {len(references)} reference lists; "
            "references[i] must list the references of hypotheses[i]"
        )
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise TypeError(f"hypotheses[{i}] is {type(hyp).__name__}, not str")
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] is a string; wrap a single reference: [{refs!r}]")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every hypothesis needs a reference")
        if not all(isinstance(ref, str) for ref in refs):
            raise TypeError(f"references[{i}] must contain only strings")


_PACKAGES = {"meteor": "pycocoevalcap", "cider": "pycocoevalcap", "bleu": "sacrebleu", "nist": "sacrebleu",
             "ter": "sacrebleu"}


def check_available(names: Sequence[str]) -> None:
    """Fail before any work if a metric is unknown or cannot run here (missing package or Java)."""
    unknown = [name for name in names if name not in _SCORERS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    for name in names:
        package = _PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            extra = "prefixtune[eval]" if package == "pycocoevalcap" else package
            raise ValueError(f"metric {name} needs the {package} package: pip install '{extra}'")
    if "meteor" in names and shutil.which("java") is None:
        raise ValueError("metric meteor runs a Java program: install Java (e.g. apt-get install default-jre-headless)")


def _require(module: str, package: str):
    """Import ``module`` or say which ``pip install`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this metric needs the `{package}` package: pip install {package}"
        ) from err


# --- BLEU and NIST: mteval-v13a ---------------------------------------------------------


def _bleu(hypotheses: Sequence[str], references: Refs) -> float:
    """Corpus BLEU-4 over all references, case-insensitive, 0-100 (sacrebleu).

    ``mteval-v13a``'s settings: ``13a`` tokenization, lowercased (mteval's default),
    clipping against the most frequent count in any reference, brevity penalty against
    the closest reference length (ties go to the shorter), no smoothing (any n-gram
    order with no match makes BLEU 0, as in mteval).

    Args:
        hypotheses: One system output per input.
        references: The references of each input.
    """
    sacrebleu = _require("sacrebleu.metrics", "sacrebleu")
    scorer = sacrebleu.BLEU(lowercase=True, tokenize="13a", smooth_method="none")
    return scorer.corpus_score(list(hypotheses), _reference_streams(references)).score


def _reference_streams(references: Refs) -> list[list[str | None]]:
    """Transpose per-input reference lists into sacrebleu's reference streams.

    sacrebleu wants ``streams[k][i]`` = the k-th reference of input i, every stream as
    long as the hypotheses. Inputs with fewer references are padded with ``None``,
    which sacrebleu drops (``Metric._cache_references``); padding with ``""`` would
    instead add an empty reference that can win the closest-length brevity penalty.
    """
    depth = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]


def _ter(hypotheses: Sequence[str], references: Refs) -> float:
    """Corpus TER (Snover et al. 2006), case-insensitive, 0-100: the edits (insertions,
    deletions, substitutions, shifts) that turn each hypothesis into its closest reference,
    over the average reference length, summed over the corpus (sacrebleu's ``TER``, tercom's
    algorithm). Lower is better.

    Args:
        hypotheses: One system output per input.
        references: The references of each input.
    """
    sacrebleu = _require("sacrebleu.metrics", "sacrebleu")
    return sacrebleu.TER(case_sensitive=False).corpus_score(list(hypotheses), _reference_streams(references)).score


def _nist(hypotheses: Sequence[str], references: Refs, max_n: int = 5) -> float:
    """Corpus NIST (Doddington 2002) over all references, as mteval-v13a computes it.

    Tokens are mteval's: lowercased, then sacrebleu's ``13a`` tokenizer (a port of
    mteval-v13a's). The formula follows mteval-v13a and the E2E scorer's
    ``pymteval.NISTScore``: n-gram information weights from all references of the
    corpus; hypothesis n-gram matches clipped by the largest count in any one of the
    input's references; for each n, matched information over the number of hypothesis
    n-grams, summed over n = 1..5; times the length penalty against the per-input
    average reference length.

    ``nltk.translate.nist_score.corpus_nist`` is not used: with several references it
    scores each n-gram order against the single best reference and takes the length
    penalty against that reference, so its E2E numbers differ. With one reference per
    input the two agree (the tests check this).

    Args:
        hypotheses: One system output per input.
        references: The references of each input.
        max_n: Longest n-gram; mteval's NIST uses 5.
    """
    tokenize = _mteval_tokenizer()
    hyps = [tokenize(hyp) for hyp in hypotheses]
    refs = [[tokenize(ref) for ref in group] for group in references]
    info = _nist_information(refs, max_n)
    score = 0.0
    for n in range(1, max_n + 1):
        gained = sum(_nist_gain(hyp, group, n, info) for hyp, group in zip(hyps, refs))
        total = sum(max(len(hyp) - n + 1, 0) for hyp in hyps)
        score += gained / max(total, 1)
    average_ref_len = sum(sum(map(len, group)) / len(group) for group in refs)
    return score * _nist_length_penalty(sum(map(len, hyps)), average_ref_len)


def _mteval_tokenizer() -> Callable[[str], list[str]]:
    """mteval-v13a's tokenization of lowercased text, as a list of tokens."""
    module = _require("sacrebleu.tokenizers.tokenizer_13a", "sacrebleu")
    tokenizer = module.Tokenizer13a()
    return lambda text: tokenizer(text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams of ``tokens``, as tuples."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _nist_information(refs: Sequence[Sequence[list[str]]], max_n: int) -> dict[tuple, float]:
    """Info(w_1..w_n) = log2(count(w_1..w_n-1) / count(w_1..w_n)) over all references.

    Doddington (2002), eq. 2; the count of the empty prefix is the number of reference
    words, as in mteval-v13a ``compute_ngram_info``.
    """
    counts: Counter = Counter()
    for group in refs:
        for ref in group:
            counts[()] += len(ref)
            for n in range(1, max_n + 1):
                counts.update(_ngrams(ref, n))
    return {
        ngram: math.log2(counts[ngram[:-1]] / count) for ngram, count in counts.items() if ngram
    }


def _nist_gain(hyp: list[str], refs: Sequence[list[str]], n: int, info: dict) -> float:
    """Information of the hypothesis n-grams found in the references, clipped."""
    most: Counter = Counter()
    for ref in refs:
        most |= _ngrams(ref, n)  # element-wise max over the references
    return sum(info[g] * min(c, most[g]) for g, c in _ngrams(hyp, n).items() if g in most)


def _nist_length_penalty(hyp_len: int, ref_len: float) -> float:
    """exp(-beta * log(min(ratio, 1))^2), beta making ratio 2/3 cost a factor 0.5."""
    ratio = hyp_len / ref_len if ref_len else 1.0
    if ratio >= 1.0:
        return 1.0
    if ratio <= 0.0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


# --- METEOR, ROUGE-L, CIDEr: the MS-COCO caption scorers ------------------------------

# The tokens that pycocoevalcap's PTBTokenizer drops after tokenizing (its PUNCTUATIONS,
# lowercased: its list says "-LRB-" but the tokens arrive lowercased as "-lrb-" and
# survive; the E2E scorer therefore keeps bracket tokens, and so do we).
_DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Characters the Stanford tokenizer (PTB3 escaping) rewrites before anything else.
_NORMALIZE = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": " `` ", "\u201d": " '' ", '"': " '' "}
    | {"\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... "}
    | {"\u00a3": " # ", "\u20ac": " $ ", "\u00a2": " cents "}
    | {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- "}
    | {"{": " -lcb- ", "}": " -rcb- "}
)

# One token of lowercased text, in the order the Stanford lexer prefers them.
_PTB_TOKEN = re.compile(
    r"""
      -l[rsc]b-|-r[rsc]b-                                # brackets, already spelled out
    | (?<![^\W_])(?:st|rd|ave|etc|vs|mrs?|ms|dr|jr|sr)\.(?=\s|$)  # abbreviations keep
    | (?<![^\W_])(?:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)\.(?=\s|$)  # their period
    | (?:[^\W\d_]\.){2,}                                 # acronyms: e.g. u.s.
    | (?<![^\W_])'(?:s|re|ve|ll|d|m)(?![^\W_])          # a clitic standing alone
    | (?:(?<![^\W_])-(?=\d))?                            # a number's sign: -25
      [^\W_]+                                            # a word or number, joined by
      (?:(?:['/-]                                        #   ' / - : o'neil, 20-25
          |(?<=\d)[.:](?=\d)                             #   3.5  12:30
          |(?<=\d),(?=\d{3}(?!\d))                       #   5,000
          |(?<=[^\W\d_])\.(?=[^\W\d_])                   #   a.b
         )[^\W_]+)*
      (?:\.(?=,))?                                       # "center.," keeps its period
    | \.\.\.|-{2,}|[!?]+|''|``                           # multi-character punctuation
    | \S                                                 # anything else, alone
    """,
    re.VERBOSE,
)

_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}


def _ptb_tokenize(text: str) -> str:
    """Lowercase and tokenize like the E2E scorer's MS-COCO tokenization, in Python.

    The scorer runs Stanford CoreNLP 3.4.1's ``PTBTokenizer -lowerCase`` (a Java
    process) and drops punctuation tokens (pycocoevalcap ``tokenizer/ptbtokenizer.py``).
    This regex imitation reproduces that jar's output exactly on all 4,672 E2E dev
    references and on all but 4 of the 42,061 training references (typos such as
    ``food,low-priced``); URLs and e-mail addresses, which the jar keeps whole, are
    split. Known PTB3 rewrites are kept: ``£`` becomes ``#``,
    ``don't`` becomes ``do n't``, ``(`` becomes ``-lrb-`` (which, like the scorer,
    we do not drop).

    Args:
        text: One hypothesis or reference.

    Returns:
        The tokens joined by single spaces.
    """
    tokens = []
    for token in _PTB_TOKEN.findall(text.lower().translate(_NORMALIZE)):
        clitic = _CLITIC.match(token)
        if token in _SPLIT_WORDS:
            tokens += _SPLIT_WORDS[token].split()
        elif clitic and not token.startswith("'"):
            tokens += clitic.groups()
        else:
            tokens.append(token)
    return " ".join(token for token in tokens if token not in _DROPPED)


def _coco_inputs(hypotheses: Sequence[str], references: Refs) -> tuple[dict, dict]:
    """The ``(gts, res)`` dicts that pycocoevalcap scorers take, tokenized."""
    gts = {i: [_ptb_tokenize(ref) for ref in refs] for i, refs in enumerate(references)}
    res = {i: [_ptb_tokenize(hyp)] for i, hyp in enumerate(hypotheses)}
    return gts, res


def _rouge_l(hypotheses: Sequence[str], references: Refs) -> float:
    """ROUGE-L (Lin 2004) as MS-COCO computes it, averaged over inputs, 0-100.

    Per input: the longest common subsequence with each reference gives a precision and
    a recall; the best precision and the best recall (possibly from different
    references) combine into an F-measure with beta = 1.2 (pycocoevalcap ``Rouge``).

    Args:
        hypotheses: One system output per input.
        references: The references of each input.
    """
    gts, res = _coco_inputs(hypotheses, references)
    return 100.0 * sum(_rouge_l_one(res[i][0], gts[i]) for i in res) / len(res)


def _rouge_l_one(candidate: str, refs: Sequence[str], beta: float = 1.2) -> float:
    """pycocoevalcap ``Rouge.calc_score`` in plain Python (that package is a 100 MB
    download; ROUGE-L is one of the two default metrics and should not need it)."""
    tokens = candidate.split(" ")
    best_precision = best_recall = 0.0
    for ref in refs:
        ref_tokens = ref.split(" ")
        lcs = _lcs(ref_tokens, tokens)
        best_precision = max(best_precision, lcs / len(tokens))
        best_recall = max(best_recall, lcs / len(ref_tokens))
    if best_precision == 0 or best_recall == 0:
        return 0.0
    return (1 + beta**2) * best_precision * best_recall / (best_recall + beta**2 * best_precision)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _cider(hypotheses: Sequence[str], references: Refs) -> float:
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap computes it, raw (0-10).

    TF-IDF weighted n-gram (n = 1..4) cosine similarity to each reference, clipped and
    with a Gaussian length penalty, averaged over references and inputs, times 10. The
    IDF comes from the references of the scored inputs themselves, so the score depends
    on the whole set: on a single input every IDF is 0 and so is CIDEr.

    Args:
        hypotheses: One system output per input.
        references: The references of each input.
    """
    module = _require("pycocoevalcap.cider.cider", "pycocoevalcap")
    gts, res = _coco_inputs(hypotheses, references)
    if not any(ref for refs in gts.values() for ref in refs):
        return 0.0  # no reference n-grams at all: pycocoevalcap would fail on max([])
    score, _ = module.Cider().compute_score(gts, res)
    return float(score)


def _meteor(hypotheses: Sequence[str], references: Refs) -> float:
    """Corpus METEOR 1.5 (Denkowski & Lavie 2014), 0-100, with the MS-COCO settings.

    Runs the ``meteor-1.5.jar`` that ships inside pycocoevalcap, with pycocoevalcap's
    command line (``-l en -norm``, 2 GB heap) and its ``-stdio`` protocol: one
    ``SCORE`` line per input, then one ``EVAL`` line whose last answer is the corpus
    score. The Java process is driven here rather than through pycocoevalcap's
    ``Meteor`` class because that class leaves the process to ``__del__``, keeps its lock
    when the jar fails (so that its ``__del__`` then blocks forever), and reports a missing
    ``java`` as a bare ``FileNotFoundError``. The process is started per call and always
    ended before returning. ``-Dfile.encoding=UTF-8`` makes non-ASCII text (``café``)
    read the same whatever the machine's locale.

    Args:
        hypotheses: One system output per input.
        references: The references of each input.

    Raises:
        RuntimeError: Java is not installed, or the jar failed.
    """
    module = _require("pycocoevalcap.meteor.meteor", "pycocoevalcap")
    jar = Path(module.__file__).with_name(module.METEOR_JAR)
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "METEOR needs Java (8 or newer) to run pycocoevalcap's meteor-1.5.jar, and "
            "`java` is not on PATH; install a Java runtime (e.g. apt-get install "
            "default-jre-headless) or leave 'meteor' out of the metrics"
        )
    gts, res = _coco_inputs(hypotheses, references)
    # Tokenized text holds no newline and no "|||" (each "|" is a token), which would
    # break the jar's line protocol.
    lines = [" ||| ".join(["SCORE", *gts[i], res[i][0]]) for i in res]
    command = [java, "-Dfile.encoding=UTF-8", "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio"]
    return 100.0 * _run_meteor([*command, "-l", "en", "-norm"], jar.parent, lines)


def _run_meteor(command: list[str], cwd: Path, score_lines: list[str]) -> float:
    """Send ``SCORE`` lines, then one ``EVAL`` of all their statistics; always stop Java."""
    with tempfile.TemporaryFile() as stderr:
        try:
            process = subprocess.Popen(
                command, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
            )
        except OSError as err:
            raise RuntimeError(f"could not start Java for METEOR: {err}") from err
        try:
            stats = [_meteor_ask(process, line) for line in score_lines]
            answer = _meteor_ask(process, " ||| ".join(["EVAL", *stats]))
            for _ in score_lines:  # the per-input scores come first, the corpus score last
                answer = _meteor_ask(process, None)
            return float(answer)
        except (OSError, ValueError) as err:
            stderr.seek(0)
            message = stderr.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"the METEOR jar failed: {message or err}") from err
        finally:
            _stop(process)


def _meteor_ask(process: subprocess.Popen, line: str | None) -> str:
    """Write ``line`` (if any) to the jar and read one answer line."""
    if line is not None:
        process.stdin.write(line.encode("utf-8") + b"\n")
        process.stdin.flush()
    answer = process.stdout.readline().decode("utf-8").strip()
    if not answer:
        raise ValueError("the METEOR jar exited without answering")
    return answer


def _stop(process: subprocess.Popen) -> None:
    """End the jar and reap it, so that no Java process outlives the call."""
    for stream in (process.stdin, process.stdout):
        with contextlib.suppress(OSError):  # a broken pipe from a jar that already died
            stream.close()
    process.kill()
    process.wait()


# --- classification cast as generation ----------------------------------------------------


def _accuracy(hypotheses: Sequence[str], references: Refs) -> float:
    """Percent of hypotheses equal to one of their references, ignoring case and padding.

    Both sides are stripped and lowercased (``str.lower``), so a generated label
    ``" Positive\\n"`` counts for the reference ``"positive"``.

    Args:
        hypotheses: One system output per input.
        references: The accepted answers of each input.
    """
    hits = sum(
        hyp.strip().lower() in {ref.strip().lower() for ref in refs}
        for hyp, refs in zip(hypotheses, references)
    )
    return 100.0 * hits / len(hypotheses)


def _exact_match(hypotheses: Sequence[str], references: Refs) -> float:
    """Percent of hypotheses equal to one of their references after ``strip`` only.

    Args:
        hypotheses: One system output per input.
        references: The accepted answers of each input.
    """
    hits = sum(
        hyp.strip() in {ref.strip() for ref in refs} for hyp, refs in zip(hypotheses, references)
    )
    return 100.0 * hits / len(hypotheses)


_SCORERS: dict[str, Callable[[Sequence[str], Refs], float]] = {
    "bleu": _bleu,
    "nist": _nist,
    "meteor": _meteor,
    "rouge_l": _rouge_l,
    "cider": _cider,
    "ter": _ter,
    "accuracy": _accuracy,
    "exact_match": _exact_match,
}
