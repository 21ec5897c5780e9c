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

from .arch import unwrap_adapters

IGNORE = -100
CHUNK_ELEMENTS = 1 << 24
"""Logit elements per chunk (64 MiB in float32): 341 rows of a 49,152-word vocabulary."""

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
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
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


def _chunk(hidden, weight, bias, targets, want_grad: bool):
    """One chunk's summed loss and (if wanted) its gradient for ``hidden``. The logits are
    computed in the model's dtype and upcast, as transformers does before its loss."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    keep = targets != IGNORE
    picked = targets.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, picked[:, None])[:, 0]) * keep).sum()
    if not want_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    probs[torch.arange(len(picked), device=probs.device), picked] -= 1.0
    probs *= keep[:, None]
    return loss, probs.to(weight.dtype) @ weight
