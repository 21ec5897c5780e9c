"""How far does one AdamW step move a reparameterized prefix, against the model's own
key/value scale? (docs/compare.md, "why prefix fell short")

One E2E batch (4 training rows) on the bundled model; for each learning rate, one AdamW step
from the same random prefix, and the root-mean-square change of the prefix key/values.

    python benchmarks/prefix_step_size.py            # ~1 minute on a quiet 2-core CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import data  # noqa: E402
from prefixtune.config import PrefixConfig  # noqa: E402
from prefixtune.model import PrefixModel  # noqa: E402
from prefixtune.models import load_model  # noqa: E402


def rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


def main(data_file: str = "../shared/data/e2e/trainset.csv") -> None:
    model, tokenizer = load_model(None)
    examples = data.load_examples(data_file, prompt_field="mr", completion_field="ref", limit=4)
    rows, _ = data.tokenize(examples, tokenizer, max_length=160, template="Table: {prompt}\nText:")
    batch = data.collate(rows, tokenizer.pad_token_id)
    torch.manual_seed(0)
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=10, reparam_hidden_size=512), tokenizer=tokenizer)
    encoder = pm.prefixes["default"]
    own = pm.key_values_for_tokens(batch["input_ids"][:1, :10])
    own = torch.stack([torch.stack(tuple(kv)) for kv in own]) if isinstance(own, (tuple, list)) else own
    start = encoder.raw_key_values().detach().clone()
    print(f"the model's own key/values (first 10 tokens of a prompt): rms {rms(own):.3f}")
    print(f"the prefix key/values at random init: rms {rms(start):.3f}")
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    for lr in (1e-3, 3e-3, 1e-2):
        optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.0)
        loss = pm(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(pm.trainable_parameters(), float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moved = encoder.raw_key_values().detach() - start
        print(f"lr {lr:g}: gradient norm {float(norm):.1f}; one AdamW step moves the prefix key/values by "
              f"rms {rms(moved):.3f} (largest {float(moved.abs().max()):.2f})")
        encoder.load_state_dict(state)


if __name__ == "__main__":
    main(*sys.argv[1:2])
