"""Task metrics against small examples worked out by hand.

Every expected number below comes from the arithmetic in its comment, not from running
the code. The scorer settings being checked are those of the official E2E scorer
(tuetschek/e2e-metrics): mteval-v13a BLEU/NIST, pycocoevalcap METEOR/ROUGE-L/CIDEr.
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefixtune import metrics
from prefixtune.metrics import METRICS, compute_metrics


def needs_java(test):
    """METEOR runs a Java program: skipped without ``java``, and in the slow lane (a JVM start per test)."""
    return pytest.mark.slow(pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")(test))


def score(name, hypotheses, references):
    return compute_metrics([name], hypotheses, references)[name]


# --- the public surface -------------------------------------------------------------------


def test_metrics_lists_every_supported_name():
    assert METRICS == ("bleu", "nist", "meteor", "rouge_l", "cider", "ter", "accuracy", "exact_match")


def test_ter_counts_edits_against_the_closest_reference_and_is_lower_is_better():
    assert score("ter", ["The cat sat on the mat"], [["the cat sat on the mat"]]) == 0.0  # case-insensitive
    # one deletion: the edits against the closest reference, over the references' average length (6 and 2 words)
    assert score("ter", ["the cat sat on mat"], [["a dog", "the cat sat on the mat"]]) == pytest.approx(100 / 4)
    # corpus-level: edits summed over inputs over the summed reference lengths (6 + 2 words)
    assert score("ter", ["the cat sat on mat", "a cat"], [["the cat sat on the mat"], ["a dog"]]) == pytest.approx(
        100 * 2 / 8)
    assert metrics.lower_is_better("ter") and metrics.lower_is_better("loss") and not metrics.lower_is_better("bleu")


def test_identical_texts_score_perfectly():
    # Two inputs with no n-gram in common, so that every CIDEr IDF is log(2) > 0.
    texts = ["the cat sat on the mat", "a dog ran in a park"]
    names = ["bleu", "rouge_l", "cider", "accuracy", "exact_match"]
    result = compute_metrics(names, texts, [[t] for t in texts])
    assert list(result) == names
    assert all(isinstance(v, float) for v in result.values())
    # BLEU: all precisions 1, no brevity penalty. ROUGE-L: P = R = 1. CIDEr: cosine 1
    # for every n, no length penalty, one reference, times 10.
    assert result == pytest.approx(
        {"bleu": 100.0, "rouge_l": 100.0, "cider": 10.0, "accuracy": 100.0, "exact_match": 100.0}
    )


def test_unknown_metric_is_named_with_the_choices():
    with pytest.raises(ValueError, match="'blue'") as err:
        compute_metrics(["bleu", "blue"], ["a"], [["a"]])
    assert "rouge_l" in str(err.value) and "exact_match" in str(err.value)


def test_a_single_metric_name_string_is_refused():
    with pytest.raises(TypeError, match=r"\['bleu'\]"):
        compute_metrics("bleu", ["a"], [["a"]])


@pytest.mark.parametrize(
    "hypotheses, references, error, message",
    [
        ([], [], ValueError, "no hypotheses"),
        (["a", "b"], [["a"]], ValueError, "2 hypotheses but 1 reference lists"),
        (["a"], [[]], ValueError, r"references\[0\] is empty"),
        (["a", "b"], ["a", "b"], TypeError, r"references\[0\] is a string"),
        ([1], [["a"]], TypeError, r"hypotheses\[0\] is int"),
        ("ab", [["a"], ["b"]], TypeError, "not a single string"),
    ],
)
def test_bad_inputs_fail_clearly(hypotheses, references, error, message):
    with pytest.raises(error, match=message):
        compute_metrics(["accuracy"], hypotheses, references)


def test_importing_the_module_loads_no_scorer_package():
    # Load metrics.py alone (the package __init__ pulls in torch), in a fresh interpreter.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {metrics.__file__!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = {'sacrebleu', 'nltk', 'pycocoevalcap', 'numpy'}\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install sacrebleu"):
        compute_metrics(["bleu"], ["a b c d"], [["a b c d"]])


# --- BLEU -----------------------------------------------------------------------------------


def test_bleu_hand_computed():
    # hyp: the cat sat on the red mat today (8 tokens); ref: the cat sat on the mat today (7)
    # 1-grams 7/8 (all but "red"); 2-grams 5/7 (not "the red", "red mat");
    # 3-grams 3/6 ("the cat sat", "cat sat on", "sat on the");
    # 4-grams 2/5 ("the cat sat on", "cat sat on the"). Brevity penalty 1 (8 > 7).
    # BLEU = (7/8 * 5/7 * 3/6 * 2/5) ** (1/4) = (1/8) ** (1/4) = 0.594604
    bleu = score("bleu", ["the cat sat on the red mat today"], [["the cat sat on the mat today"]])
    assert bleu == pytest.approx(100 * 8**-0.25)


def test_bleu_is_zero_without_a_4gram_match_as_in_mteval():
    # "the cat sat on the mat" vs "the cat is on the mat": 4-grams 0/3, and mteval does not
    # smooth, so corpus BLEU is 0 (sacrebleu's default 'exp' smoothing would not give 0).
    assert score("bleu", ["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0


def test_bleu_takes_ngrams_from_any_reference_with_varying_reference_counts():
    # Input 1 (one reference): "p q r s" matches fully: 4/4, 3/3, 2/2, 1/1.
    # Input 2 (two references): "a b c d e f g h" vs "a b c d x x x x" and "x x x x e f g h".
    #   1-grams 8/8; 2-grams 6/7 (not "d e"); 3-grams 4/6 (not "c d e", "d e f");
    #   4-grams 2/5 ("a b c d", "e f g h"). Closest reference lengths: 4 and 8 -> no penalty.
    # Corpus: 12/12, 9/10, 6/8, 3/6 -> BLEU = (0.9 * 0.75 * 0.5) ** (1/4) = 0.762199
    hyps = ["p q r s", "a b c d e f g h"]
    refs = [["p q r s"], ["a b c d x x x x", "x x x x e f g h"]]
    assert score("bleu", hyps, refs) == pytest.approx(100 * 0.3375**0.25)
    # The first reference alone: input 2 gets 4/8, 3/7, 2/6, 1/5, so the corpus has
    # 8/12, 6/10, 4/8, 2/6 -> BLEU = (2/3 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/15) ** (1/4)
    assert score("bleu", hyps, [refs[0], refs[1][:1]]) == pytest.approx(100 * 15**-0.25)


def test_bleu_pads_missing_references_without_adding_empty_ones():
    # Input 1 has two references, input 2 one; every n-gram precision is 1 (4/4, 3/3, ...
    # and 5/5, 4/4, ...). Closest reference lengths 4 and 11 against 4 + 5 = 9 words:
    # brevity penalty exp(1 - 15/9). Padding input 2 with an empty reference instead of
    # leaving it out would make 0 its closest length (|5 - 0| < |5 - 11|) and BLEU 100.
    hyps = ["a b c d", "p q r s t"]
    refs = [["a b c d", "a b c d"], ["p q r s t u v w x y z"]]
    assert score("bleu", hyps, refs) == pytest.approx(100 * math.exp(1 - 15 / 9))


def test_bleu_ignores_case():
    bleu = score("bleu", ["THE Cat Sat On The Mat"], [["the cat sat on the mat"]])
    assert bleu == pytest.approx(100.0)


# --- NIST -----------------------------------------------------------------------------------


def test_nist_hand_computed():
    # Reference "the cat sat" (3 words): Info(the) = Info(cat) = log2(3/1);
    # Info("the cat") = log2(count(the) / count(the cat)) = log2(1/1) = 0.
    # Hypothesis "the cat": 1-grams (2 log2 3) / 2 = log2 3; 2-grams 0 / 1; n >= 3: none.
    # Length penalty: ratio 2/3 is exactly where NIST's penalty is 0.5.
    assert score("nist", ["the cat"], [["the cat sat"]]) == pytest.approx(0.5 * math.log2(3))


def test_nist_clips_against_all_references():
    # References "a b" and "a a c": counts a=3, b=1, c=1 over 5 words; "a a" once.
    # Hypothesis "a a": 1-grams: "a" twice, clipped by max(1, 2) = 2 -> 2 log2(5/3) / 2;
    # 2-grams: "a a" once, Info = log2(count(a) / count(a a)) = log2(3) -> log2(3) / 1.
    # Sum = log2(5/3) + log2(3) = log2(5). Average reference length 2.5, ratio 0.8:
    # penalty exp(-beta log(0.8)^2) with beta = -log(0.5) / log(1.5)^2.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = math.log2(5) * math.exp(-beta * math.log(0.8) ** 2)  # 1.882239
    assert score("nist", ["a a"], [["a b", "a a c"]]) == pytest.approx(expected)


def test_nist_matches_nltk_with_one_reference_per_input():
    # With one reference nltk's corpus_nist and mteval agree; with several they do not
    # (nltk scores against the single best reference), which is why we do not use it.
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    hyps = ["The cat sat on the mat.", "A dog, in the park!"]
    refs = [["the cat is on the mat"], ["a dog ran in a park"]]
    tokens = metrics._mteval_tokenizer()
    nltk_refs = [[tokens(ref) for ref in group] for group in refs]
    nltk_value = nist_score.corpus_nist(nltk_refs, [tokens(hyp) for hyp in hyps])
    assert score("nist", hyps, refs) == pytest.approx(nltk_value)


# --- ROUGE-L and CIDEr ------------------------------------------------------------------


def test_rouge_l_hand_computed():
    # hyp "the cat sat down" (4), ref "the sat cat down here" (5): LCS 3 ("the cat down").
    # P = 3/4, R = 3/5, F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 1.098 / 1.68 = 0.653571
    rouge = score("rouge_l", ["the cat sat down"], [["the sat cat down here"]])
    assert rouge == pytest.approx(100 * 1.098 / 1.68)


def test_rouge_l_takes_best_precision_and_recall_from_any_reference():
    # vs "the cat": LCS 2 -> P 2/4, R 2/2. vs "the dog sat down on the mat": LCS 3 ->
    # P 3/4, R 3/7. MS-COCO takes max P = 3/4 and max R = 1 separately:
    # F = 2.44 * 0.75 * 1 / (1 + 1.44 * 0.75) = 1.83 / 2.08 = 0.879808
    refs = [["the cat", "the dog sat down on the mat"]]
    assert score("rouge_l", ["the cat sat down"], refs) == pytest.approx(100 * 1.83 / 2.08)


def test_rouge_l_ignores_case_and_punctuation():
    assert score("rouge_l", ["The Cat, sat down."], [["the cat sat down"]]) == 100.0


def test_cider_hand_computed():
    # Two inputs; every n-gram occurs in one input's references only, so all IDFs are
    # equal (log 2) and cosines are plain. Input 1: cosine 1 with "a b c d", 0 with
    # "w x y z" -> mean over n of (1 + 0) / 2 references * 10 = 5. Input 2: 10.
    hyps = ["a b c d", "e f g h"]
    refs = [["a b c d", "w x y z"], ["e f g h"]]
    assert score("cider", hyps, refs) == pytest.approx(7.5)


def test_cider_of_a_single_input_is_zero():
    # The IDF is log(#inputs / document frequency) = log(1/1) = 0 for every n-gram.
    assert score("cider", ["a b c d"], [["a b c d"]]) == 0.0


# --- the PTB tokenization fed to METEOR, ROUGE-L and CIDEr --------------------------------

# Outputs of Stanford CoreNLP 3.4.1 `PTBTokenizer -preserveLines -lowerCase` (the jar the
# E2E scorer runs), with pycocoevalcap's punctuation tokens removed.
STANFORD = {
    "Cocum is a coffee shop in the £20-25 range.": "cocum is a coffee shop in the # 20-25 range",
    "It's near 'The Bakers', isn't it?": "it 's near the bakers is n't it",
    "A (cheap) pub near St. John's College.": "a -lrb- cheap -rrb- pub near st. john 's college",
    "In the city center., near Café Rouge": "in the city center. near café rouge",
    "prices around £-25; rated 3.5 out of 5,000": "prices around # -25 rated 3.5 out of 5,000",
    "You can’t miss “The Eagle”…": "you ca n't miss the eagle",
}


@pytest.mark.parametrize("text, tokens", STANFORD.items())
def test_ptb_tokenize_reproduces_stanford(text, tokens):
    assert metrics._ptb_tokenize(text) == tokens


@needs_java
def test_ptb_tokenize_agrees_with_the_stanford_jar(tmp_path):
    coco = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    texts = [*STANFORD, "Fitzbillies, a family-friendly coffee shop, is cheap.", "Don't go!!"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    jar = Path(coco.__file__).with_name(coco.STANFORD_CORENLP_3_4_1_JAR)
    command = ["java", "-Dfile.encoding=UTF-8", "-cp", str(jar)]
    command += ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", "in.txt"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, check=True)
    lines = out.stdout.decode("utf-8").splitlines()
    drop = set(coco.PUNCTUATIONS)  # exactly what the scorer removes
    expected = [" ".join(t for t in line.split(" ") if t not in drop) for line in lines]
    assert [metrics._ptb_tokenize(text) for text in texts] == expected


# --- METEOR (one Java start costs several seconds: keep these few) ---------------------


def _meteor_children() -> list[int]:
    """Our child processes that run the METEOR jar (or were left unreaped)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # the process ended while we looked
        if int(ppid) == os.getpid() and (b"meteor" in command or state == "Z"):
            found.append(int(stat.parent.name))
    return found


@needs_java
def test_meteor_runs_twice_and_leaves_no_java_process():
    texts = ["the cat sat on the mat", "a dog ran in the park"]
    # Identical up to case and punctuation: every word matched in one chunk per input.
    shouted = ["The cat sat on the mat.", "A DOG ran in the park"]
    assert score("meteor", shouted, [[text] for text in texts]) == 100.0
    partial = score("meteor", texts, [[texts[0]], ["a dog walked in a park"]])
    assert 0.0 < partial < 100.0
    if Path("/proc/self/stat").exists():
        assert _meteor_children() == []


def test_meteor_without_java_says_java_is_needed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java` anywhere
    with pytest.raises(RuntimeError, match="METEOR needs Java"):
        compute_metrics(["meteor"], ["a b"], [["a b"]])


# --- classification cast as generation ----------------------------------------------------


def test_accuracy_ignores_case_and_surrounding_space_exact_match_only_space():
    hyps = [" Positive\n", "negative", "NEUTRAL", "pos"]
    refs = [["positive"], ["Negative", "negative"], ["neutral"], ["positive"]]
    assert score("accuracy", hyps, refs) == 75.0  # the first three; "pos" is not "positive"
    assert score("exact_match", hyps, refs) == 25.0  # only "negative" matches with its case


def test_rouge_l_in_python_equals_pycocoevalcap():
    from pycocoevalcap.rouge.rouge import Rouge

    from prefixtune.metrics import _coco_inputs

    hyps = ["the eagle is a cheap pub", "zizzi serves french food near the river", "x"]
    refs = [["The Eagle is a cheap pub.", "A cheap pub: The Eagle"], ["Zizzi has French food by the river"], ["y z"]]
    expected, _ = Rouge().compute_score(*_coco_inputs(hyps, refs))
    assert compute_metrics(["rouge_l"], hyps, refs)["rouge_l"] == pytest.approx(100 * expected, abs=1e-9)


def test_check_available_fails_before_any_work(monkeypatch):
    from prefixtune import metrics

    metrics.check_available(["bleu", "rouge_l"])
    with pytest.raises(ValueError, match="unknown metric.*blue"):
        metrics.check_available(["blue"])
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="meteor runs a Java program"):
        metrics.check_available(["meteor"])
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"cider needs the pycocoevalcap package: pip install 'prefixtune\[eval\]'"):
        metrics.check_available(["cider"])
