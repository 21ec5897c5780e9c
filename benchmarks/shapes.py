"""Random-weight models of named shapes: a step costs the same whatever the weights are, so a
benchmark that needs no real text can run a model of any size without carrying its weights."""

from __future__ import annotations

import torch

SHAPES = {
    # the bundled SmolLM2-135M-Instruct (prefixtune.base_models.BUNDLED)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, head_dim=64, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # a Llama-3.2-1B-like shape
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, head_dim=64, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # for smoke runs
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, head_dim=16, tie_word_embeddings=True),
}


def random_model(shape: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` of the named shape, on ``device`` in ``dtype``, sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 2
    return model
