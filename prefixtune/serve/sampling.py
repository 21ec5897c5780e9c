"""Choosing the next token of each row: greedy, or temperature + nucleus (top-p) sampling.

Every row of a decoding step can carry its own settings, so one forward serves requests
that asked for different temperatures. Each sampling row draws from its own
``torch.Generator``: a request with a ``seed`` gets the same tokens whatever else shares
its batch, which is what OpenAI's ``seed`` promises (best effort).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request decodes.

    Args:
        max_tokens: Most tokens to generate.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: Keep the smallest set of tokens whose probability reaches ``top_p``.
        stop: Strings that end the generation; they are not part of the returned text.
        seed: Seed of this request's generator; ``None`` draws one.
        ignore_eos: Keep going past the end-of-sequence token (benchmarks use it so that
            every arm generates the same number of tokens).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device) -> torch.Generator | None:
        """A generator for this request (``None`` when greedy: no randomness needed)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return torch.Generator(device=device).manual_seed(seed % 2**63)  # any int: OpenAI's seeds may be negative


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of ``logits`` (``[B, vocab]``), each row decoded as its params say."""
    chosen = logits.argmax(dim=-1).tolist()  # greedy rows need nothing else
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            chosen[row] = _sample(logits[row], p.temperature, p.top_p, generator)
    return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Draw from ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus.

    Any temperature in (0, 2] and top-p in (0, 1] draws from a valid distribution, subnormal ones
    included: the logits are shifted so their largest is 0 before the division (a tiny temperature
    then sends the others to -inf, not the largest to inf, and the softmax stays finite), the divisor
    is at least float32's smallest normal number (a smaller float64 would round to 0), and the most
    likely token is always kept whatever top-p rounds to."""
    logits = logits.float()
    scaled = (logits - logits.max()) / max(temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax(scaled, dim=-1)  # [vocab]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens strictly more likely already reach top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
