"""The language-model loss without the ``[batch, tokens, vocabulary]`` logits.

A causal LM's forward with ``labels`` builds the logits of every position (for the bundled
SmolLM2, 8 rows x 512 tokens x 49,152 words = 0.8 GB in float32), keeps the softmax of them
for backward, and backward builds a gradient of the same size: up to three such tensors
alive at once, far more than the frozen layers need when they are gradient-checkpointed.

Here the output projection and the cross-entropy run together, a chunk of rows at a time,
and because the LM head is frozen the gradient with respect to the hidden states
(``(softmax - onehot) @ W``) is computed right there, in forward: backward only scales it.
No chunk's logits outlive the chunk, nothing is recomputed, and the arithmetic is the same
as transformers' (one projection forward, one matrix product back).

Used where the result is certain to equal transformers' loss: a plain ``nn.Linear`` head
that does not train, and a family that does not change its logits after the head
(:data:`LOGIT_TRANSFORMS`); everywhere else the model's own forward computes the loss.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .peft.wrappers import unwrap_adapters

IGNORE = -100
CHUNK_ELEMENTS = 1 << 26
"""Most logit elements per chunk (256 MiB in float32: 1365 rows of a 49,152-word vocabulary,
against the three full-size tensors of the model's own loss). Each chunk reads the whole head
weight again, so fewer, larger chunks cost less per row (``python -m benchmarks.head_chunks``
measures the cost per row against the chunk size; docs/studies/performance-cpu.md)."""

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config keys of families that soft-cap or scale the logits after the head (Gemma 2,
Cohere, Granite): their loss stays with the model's own forward."""


def head_of(model: nn.Module) -> nn.Linear | None:
    """The frozen ``nn.Linear`` LM head of ``model`` when the chunked loss equals the model's
    own, else ``None`` (trainable or adapted head, logit transforms, no head)."""
    inner = unwrap_adapters(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.requires_grad:
        return None
    if any(getattr(inner.config, key, None) not in (None, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    return head


def body_of(model: nn.Module) -> nn.Module:
    """The transformer under the LM head (``LlamaModel`` in ``LlamaForCausalLM``)."""
    return unwrap_adapters(model).base_model


def loss_only(body, head: nn.Linear, kwargs: dict) -> CausalLMOutputWithPast:
    """The model's ``loss`` for ``kwargs`` (with ``labels`` and, optionally, ``num_items_in_batch``), from the
    hidden states ``body(**kwargs)`` returns, by :func:`causal_lm_loss`; ``.logits`` is ``None``."""
    kwargs = dict(kwargs)
    labels, items = kwargs.pop("labels"), kwargs.pop("num_items_in_batch", None)
    hidden = body(**{**kwargs, "use_cache": False}).last_hidden_state
    return CausalLMOutputWithPast(loss=causal_lm_loss(hidden, head, labels, items))


def causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                   num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden`` (``[B, T, H]``, after the final norm):
    position ``t`` predicts ``labels[:, t + 1]``, ``-100`` is ignored; the sum over tokens
    divided by ``num_items`` (gradient accumulation) or the mean over labelled tokens."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    denominator = num_items if num_items is not None else (targets != IGNORE).sum().clamp(min=1)
    total = LinearCrossEntropy.apply(flat, head.weight, head.bias, targets)
    return total / torch.as_tensor(denominator, device=total.device, dtype=total.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk,
    with the gradient for ``hidden`` computed in forward (``weight`` and ``bias`` get none)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        bounds = chunk_bounds(hidden.shape[0], weight.shape[0])
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, stop in zip(bounds, bounds[1:]):
            part = slice(start, stop)
            loss, grad_part = _chunk(hidden[part], weight, bias, targets[part], want_grad)
            total += loss
            if want_grad:
                grad[part] = grad_part
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def chunk_bounds(rows: int, vocabulary: int) -> list[int]:
    """Where the chunks of ``rows`` start and end: as few chunks as :data:`CHUNK_ELEMENTS`
    allows, their sizes one apart at most (4096 rows make four chunks of 1024, not
    3 x 1365 + 1), so no chunk is a small, slow remainder."""
    most = max(1, CHUNK_ELEMENTS // vocabulary)
    chunks = max(1, -(-rows // most))
    return [i * rows // chunks for i in range(chunks + 1)]


def _chunk(hidden, weight, bias, targets, want_grad: bool):
    """One chunk's summed loss and (if wanted) its gradient for ``hidden``. The logits are
    computed in the model's dtype and upcast, as transformers does before its loss. The softmax
    is built in place of the logits with one ``exp`` pass (``logsumexp`` followed by a softmax
    would take two, and a temporary as large as the logits)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    keep = targets != IGNORE
    picked = targets.clamp(min=0)
    target_logit = logits.gather(1, picked[:, None])[:, 0]
    top = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(top).exp_()  # in place: the logits are not needed again
    total = exps.sum(dim=-1)
    loss = ((top[:, 0] + total.log() - target_logit) * keep).sum()
    if not want_grad:
        return loss, None
    probs = exps.mul_((keep / total)[:, None])  # softmax of labelled rows, zero for ignored ones
    probs[torch.arange(len(picked), device=probs.device), picked] -= keep.to(probs.dtype)
    return loss, probs.to(weight.dtype) @ weight
