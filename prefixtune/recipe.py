"""The default learning rate of ``prefixtune train``: a rule that follows how the prefix is built.

The recipe study (docs/studies/recipe.md) chose ``prefixtune train``'s defaults on E2E, WebNLG and
SST-2 at 120 steps of batch 8: a key/value prefix through the paper's MLP whose two weight matrices
train at the rate divided by the MLP's width (muP, ``PrefixConfig.reparam_lr="width"``), at 3e-2,
without gradient clipping, after 10 warmup steps. It did not spike on any seed, where the paper's
MLP at 3e-3 with clipping spiked on every task.

The best peak rate depends on the parameterization, not on the task, because the size of an AdamW
step on the prefix's key/values is what the rate sets:

- a flat prefix moves each key/value by about the rate per step: 3e-2 (the E2E study's best);
- the MLP with width-scaled rates keeps its steps the size of a flat prefix's, so it takes the
  same 3e-2 (the recipe study's best of 1e-2, 3e-2 and 1e-1);
- the MLP at one rate for every parameter (``reparam_lr="same"``) amplifies each step by its width
  (512 inputs summed per output): 1e-3, the largest that did not blow up without clipping;
- a memory prefix moves each head's output by about the rate per step: 1e-2 (better than 3e-3
  on WebNLG in the screen).

An explicit ``--lr`` always wins; a run's ``config.yaml`` records the rate it used.
"""

from __future__ import annotations

RATES = {"flat": 3e-2, "mlp-width": 3e-2, "mlp-same": 1e-3, "memory": 1e-2}
"""Peak AdamW rate per parameterization (:func:`parameterization`)."""
NAMES = {"flat": "a flat key/value prefix", "mlp-width": "a key/value prefix through the MLP at width-scaled rates",
         "mlp-same": "a key/value prefix through the MLP at one rate", "memory": "a memory prefix"}
"""How the log names each parameterization."""


def parameterization(prefix) -> str:
    """Which row of :data:`RATES` a ``PrefixConfig`` trains under: ``memory``, ``flat``, ``mlp-width`` or ``mlp-same``."""
    if prefix.kind == "memory":
        return "memory"
    if not prefix.reparameterize:
        return "flat"
    return f"mlp-{prefix.reparam_lr}"


def default_lr(prefix) -> float:
    """The peak rate ``prefixtune train`` uses for the ``PrefixConfig`` ``prefix`` when ``--lr`` is not given."""
    return RATES[parameterization(prefix)]


def describe(prefix) -> str:
    """The log's line for a run that takes the default rate: the rate, and what it is the default for."""
    row = parameterization(prefix)
    return f"--lr not given: {RATES[row]:g}, the default for {NAMES[row]} (docs/training.md, 'The default recipe')"
