"""The parameters of one prefix, and how they become per-layer keys and values.

Two parameterizations (Li & Liang 2021, section 4.3):

* flat: the key/values themselves are the parameters (P-Tuning v2, Liu et al. 2022);
* reparameterized: ``P = MLP(E)`` with ``E`` an ``[L_p, hidden]`` embedding and the MLP
  ``Linear -> Tanh -> Linear``; the paper found this more stable to train. After training
  the MLP is folded away (``materialize``): inference only needs its output.

The output layout is ``[n_layers, 2, kv_heads, L_p, head_dim]`` (index 0 = keys,
1 = values) for the selected layers only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import PrefixConfig


class PrefixEncoder(nn.Module):
    """Produces the key/values of one named prefix.

    Args:
        config: The prefix's configuration.
        layers: Model layer indices that get a prefix (already resolved).
        num_kv_heads: Key/value heads per layer (grouped-query attention keeps fewer).
        head_dim: Size of one head.
    """

    kind = "kv"

    def __init__(self, config: PrefixConfig, layers: tuple[int, ...], num_kv_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.layers = layers
        self.shape = (len(layers), 2, num_kv_heads, config.prefix_length, head_dim)
        self.dropout = nn.Dropout(config.dropout)
        if config.reparameterize:
            width = config.reparam_hidden_size
            self.embedding = nn.Embedding(config.prefix_length, width)
            self.mlp = nn.Sequential(
                nn.Linear(width, width), nn.Tanh(), nn.Linear(width, math.prod(self.shape) // config.prefix_length)
            )
            self.key_values = None
        else:
            self.embedding = self.mlp = None
            self.key_values = nn.Parameter(torch.randn(self.shape) * config.init_std)

    @classmethod
    def fixed(cls, key_values, config: PrefixConfig) -> "PrefixEncoder":
        """A flat prefix holding ``key_values``: per model site ``(k, v)`` each ``[kv_heads, L, head_dim]``,
        or ``None`` where it has none; ``config``'s other settings (dropout, positions) are kept."""
        sites = tuple(i for i, kv in enumerate(key_values) if kv is not None)
        if not sites:
            raise ValueError("key/values are None for every layer")
        target = stack_sites(key_values, sites)
        config = config.replace(prefix_length=target.shape[3], reparameterize=False, layers=sites, init="random",
                                init_text=None)
        encoder = cls(config, sites, target.shape[2], target.shape[4])
        encoder.fit(target)
        return encoder

    def site_key_values(self, num_sites: int) -> tuple:
        """Per model site, ``(k, v)`` each ``[kv_heads, L_p, head_dim]`` (no dropout); ``None`` for the
        sites this prefix does not cover."""
        key_values, slot = self.raw_key_values(), {site: i for i, site in enumerate(self.layers)}
        return tuple((key_values[slot[i], 0], key_values[slot[i], 1]) if i in slot else None
                     for i in range(num_sites))

    @property
    def reparameterized(self) -> bool:
        return self.mlp is not None

    def rate_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """``(parameters, rate multiplier)`` pairs: with ``reparam_lr="width"`` the MLP's weight matrices
        train at ``1 / width`` of the rate (``PrefixConfig.reparam_lr``), everything else at the rate."""
        if not self.reparameterized or self.config.reparam_lr != "width":
            return [(list(self.parameters()), 1.0)]
        matrices = [layer.weight for layer in self.mlp if isinstance(layer, nn.Linear)]
        rest = [p for p in self.parameters() if all(p is not m for m in matrices)]
        return [(rest, 1.0), (matrices, 1.0 / self.config.reparam_hidden_size)]

    def forward(self) -> torch.Tensor:
        """The prefix key/values, ``[n_layers, 2, kv_heads, L_p, head_dim]``, dropout applied."""
        return self.dropout(self.raw_key_values())

    def raw_key_values(self) -> torch.Tensor:
        """The key/values without dropout."""
        if self.key_values is not None:
            return self.key_values
        layers, _, kv_heads, length, head_dim = self.shape
        flat = self.mlp(self.embedding.weight)  # [L_p, n_layers * 2 * kv_heads * head_dim]
        return flat.view(length, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def materialize(self) -> None:
        """Fold the MLP into fixed key/values: same outputs, no MLP left to run or store."""
        if not self.reparameterized:
            return
        values = self.raw_key_values().detach().clone().contiguous()
        self.embedding = self.mlp = None
        self.key_values = nn.Parameter(values)

    def fit(self, target: torch.Tensor) -> float:
        """Make the encoder output ``target`` (shape as ``forward``); returns the relative error.

        A flat prefix copies it. A reparameterized one trains its MLP and embedding by Adam
        on the mean squared error (``config.init_fit_steps`` steps), which is how the paper's
        "initialize with real words" carries over to the MLP.
        """
        target = target.detach().to(torch.float32)
        if tuple(target.shape) != self.shape:
            raise ValueError(f"prefix target has shape {tuple(target.shape)}, expected {self.shape}")
        if not self.reparameterized:
            with torch.no_grad():
                self.key_values.copy_(target)
            return 0.0
        params = [*self.embedding.parameters(), *self.mlp.parameters()]
        optimizer = torch.optim.Adam(params, lr=1e-3)
        # annealed to zero: plain Adam at a fixed rate oscillates around the fit
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, self.config.init_fit_steps))
        scale = target.pow(2).mean().clamp_min(1e-12)
        with torch.enable_grad():
            for _ in range(self.config.init_fit_steps):
                optimizer.zero_grad(set_to_none=True)
                loss = (self.raw_key_values() - target).pow(2).mean() / scale
                loss.backward()
                optimizer.step()
                schedule.step()
        optimizer.zero_grad(set_to_none=True)  # else training's first step adds the fit's last gradient
        with torch.no_grad():
            return float(((self.raw_key_values() - target).pow(2).mean() / scale).sqrt())


def stack_sites(key_values, sites) -> torch.Tensor:
    """Per-site ``(k, v)`` pairs of the given sites as one ``[n_sites, 2, kv_heads, L, head_dim]`` tensor."""
    return torch.stack([torch.stack(key_values[i]) for i in sites])
