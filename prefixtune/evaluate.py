"""Decoding over a dataset and scoring it: loss, perplexity and task metrics.

Loss is token-weighted over completion tokens (the same quantity training minimizes).
Generation metrics are computed per distinct prompt against all of its references, as the
E2E scorer does, after batched greedy or beam-search decoding with the prefix.
"""

from __future__ import annotations

import math

import torch

from . import data, progress
from .base_models import class_names, context_length
from .config import DataOptions
from .metrics import compute_metrics
from .model import PrefixModel


@torch.no_grad()
def completion_loss(pm: PrefixModel, rows: list[dict], pad_id: int, *, batch_size: int, prefix,
                    return_logits: bool = False) -> float:
    """Mean loss per completion token over ``rows`` (from ``data.tokenize``). By default without
    the ``[B, T, vocabulary]`` logits (prefixtune.lm_loss); ``return_logits=True`` where the LM
    head is sharded (FSDP, ZeRO-3) and only the model's own forward can gather it."""
    pm.eval()
    total, count = 0.0, 0
    for start in _batches(len(rows), batch_size, "eval: loss"):
        batch = {k: v.to(pm.device) for k, v in data.collate(rows[start:start + batch_size], pad_id).items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        if tokens:
            total += pm(**batch, prefix=prefix, return_logits=return_logits).loss.item() * tokens
            count += tokens
    return total / max(count, 1)


@torch.no_grad()
def generate_texts(pm: PrefixModel, tokenizer, examples: list, opts: DataOptions, *, prefix, **decoding) -> list[str]:
    """Decode a completion for each example (left-padded batches of ``opts.batch_size``)."""
    pm.eval()
    outputs = []
    for start in _batches(len(examples), opts.batch_size, "generate"):
        chunk = examples[start:start + opts.batch_size]
        ids = [data.prompt_ids(ex, tokenizer, template=opts.prompt_template, chat_template=opts.chat_template,
                               max_length=opts.max_length) for ex in chunk]
        batch = _left_pad(ids, tokenizer.pad_token_id, pm.device)
        _check_context(batch["input_ids"].shape[1], opts.max_new_tokens, pm.model.config)
        out = pm.generate(**batch, prefix=prefix, max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams,
                          pad_token_id=tokenizer.pad_token_id, **{"do_sample": False, **decoding})
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        outputs.extend(_clean(t, opts.first_line) for t in texts)
    return outputs


def _check_context(prompt_tokens: int, new_tokens: int, model_config) -> None:
    """Refuse what the model's positions cannot hold, before the cache for it is allocated."""
    limit = context_length(model_config)
    if prompt_tokens + new_tokens > limit:
        raise ValueError(f"--max-new-tokens {new_tokens}: with the longest prompt of the batch ({prompt_tokens} "
                         f"tokens) it exceeds the model's context length ({limit} tokens)")


def score(pm: PrefixModel, tokenizer, examples: list, opts: DataOptions, *, prefix, metrics: list[str],
          generate_limit: int | None = None, return_logits: bool = False) -> dict:
    """Loss and perplexity over ``examples``, plus ``metrics`` over the generations for their
    distinct prompts (at most ``generate_limit`` of them)."""
    rows, _ = data.tokenize(examples, tokenizer, max_length=opts.max_length, template=opts.prompt_template,
                            chat_template=opts.chat_template, overflow="truncate")
    loss = completion_loss(pm, rows, tokenizer.pad_token_id, batch_size=opts.batch_size, prefix=prefix,
                           return_logits=return_logits)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if metrics:
        groups = data.group_references(examples)[:generate_limit]
        texts = generate_texts(pm, tokenizer, [ex for ex, _ in groups], opts, prefix=prefix)
        result.update(scores(metrics, texts, [refs for _, refs in groups]))
        result["generations"] = [{"prompt": ex.prompt, "generation": t, "references": refs}
                                 for (ex, refs), t in zip(groups, texts)]
    return result


def score_by(pm: PrefixModel, tokenizer, examples: list, opts: DataOptions, *, prefix, metrics: list[str],
             field: str) -> dict:
    """:func:`score` over all ``examples`` and over the rows of each value of ``field``.

    Each group's metrics are corpus metrics of its own inputs (BLEU of the group's n-gram counts,
    not a mean of per-input scores), and so are the overall ones, over every group's inputs.
    References are grouped per prompt within each group (:func:`data.group_references`), so an
    input keeps all its reference rows; an input whose rows carry two values of ``field`` counts
    once in each. Every input is decoded once: the overall metrics reuse the groups' generations.

    Returns:
        The overall result (loss and perplexity over every row, ``metrics``, each generation with
        its ``group``), with ``group_by`` and ``groups``: ``{value: {loss, perplexity, metrics...,
        "inputs": distinct prompts scored}}``.
    """
    groups, generations = {}, []
    for value, part in data.partition(examples, field).items():
        result = score(pm, tokenizer, part, opts, prefix=prefix, metrics=metrics)
        part_generations = result.pop("generations", [])
        generations += [{**g, "group": value} for g in part_generations]
        groups[value] = {**result, "inputs": len(part_generations)}
    overall = score(pm, tokenizer, examples, opts, prefix=prefix, metrics=[])  # the loss over every row
    if metrics:
        overall.update(scores(metrics, [g["generation"] for g in generations], [g["references"] for g in generations]))
        overall["generations"] = generations
    return {**overall, "inputs": len(generations), "group_by": field, "groups": groups}


@torch.no_grad()
def classify(pm: PrefixModel, rows: list[dict], pad_id: int, *, batch_size: int, prefix) -> dict:
    """Mean cross-entropy, accuracy and the predicted class ids over ``rows`` (from
    ``data.tokenize_classes``), with the model's task head."""
    pm.eval()
    total, correct, predictions = 0.0, 0, []
    for start in _batches(len(rows), batch_size, "eval: classify"):
        batch = {k: v.to(pm.device) for k, v in data.collate(rows[start:start + batch_size], pad_id).items()}
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], prefix=prefix).logits
        total += torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        predicted = logits.argmax(-1)
        correct += int((predicted == batch["labels"]).sum())
        predictions += predicted.tolist()
    n = max(len(rows), 1)
    return {"loss": total / n, "accuracy": 100.0 * correct / n, "predictions": predictions}


@torch.no_grad()
def predict_labels(pm: PrefixModel, tokenizer, texts: list[str], *, batch_size: int, max_length: int,
                   prefix) -> list[str]:
    """The class name the model's task head picks for each text."""
    pm.eval()
    names = class_names(pm.model)
    out = []
    for start in _batches(len(texts), batch_size, "classify"):
        batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt").to(pm.device)
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], prefix=prefix).logits
        out += [names[i] for i in logits.argmax(-1).tolist()]
    return out


def scores(metrics: list[str], texts: list[str], references: list[list[str]]) -> dict[str, float]:
    """``compute_metrics``, one metric at a time under a progress bar (METEOR and CIDEr take seconds)."""
    out = {}
    with progress.bar(len(metrics), "metrics", unit="metric", enabled=len(metrics) > 1, leave=False) as shown:
        for name in metrics:
            shown.set_postfix_str(name, refresh=False)
            out.update(compute_metrics([name], texts, references))
            shown.update()
    return out


def _batches(count: int, batch_size: int, desc: str):
    """The start of each batch of ``count`` items, with a progress bar over the batches."""
    starts = range(0, count, batch_size)
    with progress.bar(len(starts), desc, unit="batch", leave=False) as shown:
        for start in starts:
            yield start
            shown.update()


def table(results: dict[str, dict], metrics: list[str]) -> str:
    """A small fixed-width table: one row per labelled result, one column per metric."""
    columns = ["loss", *(["perplexity"] if any("perplexity" in r for r in results.values()) else []), *metrics]
    width = max(16, *(len(label) + 2 for label in results))
    lines = [f"{'':{width}}" + "".join(f"{c:>12}" for c in columns)]
    for label, row in results.items():
        lines.append(f"{label:{width}}" + "".join(f"{row.get(c, float('nan')):12.2f}" for c in columns))
    return "\n".join(lines)


def _left_pad(ids: list[list[int]], pad_id: int, device) -> dict:
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([[pad_id] * (width - len(r)) + r for r in ids], device=device),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device),
    }


def _clean(text: str, first_line: bool) -> str:
    text = text.strip()
    return text.split("\n", 1)[0].strip() if first_line else text
