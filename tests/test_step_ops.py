"""What a prefix adds to a training step, counted in dispatched ops.

On a GPU a small model's training step is host-bound: it costs what it launches more than
what each launch computes (docs/studies/performance-gpu.md), and nearly every non-view aten op
is a launch. No timing test could see a regression there; the count is exact and the same on any
machine. ``benchmarks/op_count.py`` counts the same on real model shapes.
"""

import collections

import pytest
import torch
import transformers as tf
from tiny import ROPE, tokens
from torch.utils._python_dispatch import TorchDispatchMode

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.attention import AttentionPolicy

POLICIES = {"pad": AttentionPolicy(pad_free_rows={"cpu": None}), "mask": AttentionPolicy("mask")}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.nodes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            node = torch._C._current_autograd_node()
            self.nodes[node.name() if node is not None else "forward"] += 1
        return func(*args, **(kwargs or {}))


def _count(loss_fn) -> collections.Counter:
    loss_fn().backward()  # first-call work (masks' caches) is not a step's
    with _Ops() as ops:
        loss_fn().backward()
    return ops.nodes


def _steps(layers: int, route: str):
    """Op counts of the floor's step and of the prefixed step (chunked loss, as training runs it)."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**dict(ROPE, num_hidden_layers=layers))).train().requires_grad_(False)
    x = tokens(2, 12)
    embed = model.get_input_embeddings()

    def floor():
        return model(inputs_embeds=embed(x).detach().requires_grad_(True), labels=x, use_cache=False).loss

    floor_ops = _count(floor)
    wrapped = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparam_hidden_size=16),
                               attention=POLICIES[route]).train()
    return floor_ops, _count(lambda: wrapped(input_ids=x, labels=x, return_logits=False).loss)


@pytest.mark.parametrize("route, most", [("pad", 8), ("mask", 19)])  # measured: 8.0 and 19.0
def test_a_prefix_adds_few_ops_per_layer(route, most):
    """Extra ops per prefixed layer, from the difference between a 6-layer and a 2-layer model
    (what does not grow with depth, e.g. the prefix's MLP and the chunked loss, cancels). Laying
    out the prefix one layer at a time with ``select`` would cost 5-6 more per layer in backward,
    and transformers' kernel on the padded queries one more copy forward."""
    extra = {}
    for layers in (2, 6):
        floor, prefixed = _steps(layers, route)
        extra[layers] = sum(prefixed.values()) - sum(floor.values())
    assert (extra[6] - extra[2]) / 4 <= most


def test_the_prefix_gradient_is_gathered_once_for_all_layers():
    """One ``unbind`` lays out every layer's keys and values, so one backward node gathers them."""
    floor, prefixed = _steps(6, "pad")  # a dispatch mode cannot create torch's bias tensor
    assert prefixed["SelectBackward0"] == floor["SelectBackward0"]
    assert prefixed["UnbindBackward0"] == floor["UnbindBackward0"] + 1
