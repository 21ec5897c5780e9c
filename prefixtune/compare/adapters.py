"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751): a small implementation for
``prefixtune compare`` only.

The ``adapters`` library is pinned to transformers 4, so the comparison carries its own.
Houlsby's placement: in every layer, one adapter right after the attention's output
projection and one right after the feed-forward's output projection, each before the
residual add; the layer norms train too. An adapter is ``h + W_up(act(W_down h))`` with
``W_up`` starting at zero, so training starts from the unchanged model.

The frozen model is wrapped, never copied: each output projection is replaced by a module
that calls the original and then the adapter.
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_PROJECTIONS: dict[str, tuple[str, str]] = {
    # model_type: (attention output projection, feed-forward output projection), per layer
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma2": ("self_attn.o_proj", "mlp.down_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"),
}


class Bottleneck(nn.Module):
    """``h + up(gelu(down(h)))``; ``up`` is zero at the start (the identity)."""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, hidden] -> [B, T, hidden]
        return h + self.up(nn.functional.gelu(self.down(h)))


class WithAdapter(nn.Module):
    """A frozen output projection followed by its adapter."""

    def __init__(self, projection: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.projection = projection
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.projection(*args, **kwargs))


def add_adapters(model: nn.Module, size: int) -> list[nn.Parameter]:
    """Freeze ``model``, insert Houlsby adapters of width ``size`` in every layer, unfreeze
    them and the layer norms; returns the trainable parameters (adapters first)."""
    model_type = model.config.model_type
    if model_type not in OUTPUT_PROJECTIONS:
        raise NotImplementedError(f"bottleneck adapters: no output-projection table entry for {model_type!r} "
                                  f"(known: {', '.join(sorted(OUTPUT_PROJECTIONS))})")
    hidden = model.config.hidden_size
    model.requires_grad_(False)
    device = next(model.parameters()).device
    adapters = []
    for layer in _layers(model):
        for path in OUTPUT_PROJECTIONS[model_type]:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            adapter = Bottleneck(hidden, size).to(device)
            setattr(parent, name, WithAdapter(getattr(parent, name), adapter))
            adapters.append(adapter)
    norms = [m for name, m in model.named_modules() if _is_norm(name, m)]
    params = [p for a in adapters for p in a.parameters()] + [p for m in norms for p in m.parameters(recurse=False)]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors (adapters and layer norms), for saving."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise NotImplementedError(f"bottleneck adapters: cannot find the layers of {type(model).__name__}")


def _is_norm(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
