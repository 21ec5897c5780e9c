"""Tiny random models of every supported family (2 layers, hidden 32): built from config
classes, no downloads, a fraction of a second each."""

from __future__ import annotations

import queue

import torch
import transformers as tf

ULPS = 64
"""How many units of the dtype's precision two computations of the same value may differ by, relative
to the values' size: kernels sum in different orders (a prefix concatenated, padding masked), and a
transformers release may change that order."""


def assert_same(actual: torch.Tensor, expected: torch.Tensor, ulps: int = ULPS) -> None:
    """``actual`` equals ``expected`` up to rounding in their dtype (:data:`ULPS` of its epsilon, scaled
    by the largest magnitude of ``expected``): the tolerance follows the precision, not a fixed number."""
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=ulps * torch.finfo(expected.dtype).eps * scale, rtol=0)


VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
ROPE = dict(COMMON, intermediate_size=64, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "llama": lambda: tf.LlamaConfig(**ROPE),
    "mistral": lambda: tf.MistralConfig(**ROPE, sliding_window=64),
    "qwen2": lambda: tf.Qwen2Config(**ROPE),
    "qwen3": lambda: tf.Qwen3Config(**ROPE, head_dim=16),  # head_dim != hidden / heads
    "gemma": lambda: tf.GemmaConfig(**ROPE, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(
        **ROPE, head_dim=16, sliding_window=64, attn_logit_softcapping=20.0, final_logit_softcapping=15.0
    ),
    "phi3": lambda: tf.Phi3Config(**ROPE),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        **COMMON, intermediate_size=64, rotary_pct=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        hidden_dropout=0.0, attention_dropout=0.0,
    ),
    "opt": lambda: tf.OPTConfig(
        **COMMON, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
}

ARCHS = sorted(CONFIGS)
EAGER_ONLY = {"gemma2"}  # soft-capping lives in Gemma 2's own eager kernel


def tiny_model(arch: str, attn: str | None = None, seed: int = 0):
    """A tiny random causal LM of family ``arch`` in eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    attn = attn or ("eager" if arch in EAGER_ONLY else "sdpa")
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


def tokens(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=generator)


def tiny_model_folder(path):
    """A tiny random Llama saved with the bundled model's tokenizer (real BPE, chat template),
    for end-to-end runs of the command line in seconds."""
    from transformers import AutoTokenizer

    from prefixtune.base_models import bundled_folder

    tokenizer = AutoTokenizer.from_pretrained(bundled_folder())
    torch.manual_seed(0)
    config = tf.LlamaConfig(**dict(ROPE, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SEQ2SEQ = {
    "t5": lambda: tf.T5Config(  # d_kv * heads != d_model, as in t5-11b: head size comes from d_kv
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=2,
        decoder_start_token_id=0,
    ),
    "bart": lambda: tf.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    ),
}

ENCODERS = {
    "bert": lambda: tf.BertConfig(**COMMON, intermediate_size=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0),
    "roberta": lambda: tf.RobertaConfig(**COMMON, intermediate_size=64, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, pad_token_id=1),
    "distilbert": lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                              dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
                                              pad_token_id=0),
}


def tiny_seq2seq(arch: str, attn: str = "sdpa", seed: int = 0):
    """A tiny random encoder-decoder (T5 or BART family) in eval mode."""
    torch.manual_seed(seed)
    return tf.AutoModelForSeq2SeqLM.from_config(SEQ2SEQ[arch](), attn_implementation=attn).eval()


def tiny_encoder(arch: str, task: str = "sequence", num_labels: int = 3, attn: str = "sdpa", seed: int = 0):
    """A tiny random encoder with a sequence- or token-classification head, in eval mode."""
    torch.manual_seed(seed)
    config = ENCODERS[arch]()
    config.num_labels = num_labels
    auto = tf.AutoModelForSequenceClassification if task == "sequence" else tf.AutoModelForTokenClassification
    return auto.from_config(config, attn_implementation=attn).eval()


# ------------------------------------------------------------ serving helpers
EOS = 2


class CharTokenizer:
    """Token ``i`` is one letter: easy to reason about stop strings and text pieces."""

    eos_token_id = EOS
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids if i > EOS)

    def __len__(self):
        return 97


class Collector:
    """Submits requests and waits for their ends."""

    def __init__(self, batcher):
        self.batcher, self.done, self.events = batcher, queue.Queue(), {}

    def request(self, key, prompt, model, **params):
        self.events[key] = []

        def sink(event):
            self.events[key].append(event)
            if event.finish_reason or event.error:
                self.done.put(key)

        params = {"max_tokens": 10, "temperature": 0.0, **params}
        from prefixtune.serve import Request, SamplingParams

        return Request(prompt, model, SamplingParams(**params), sink)

    def wait(self, count, timeout=60):
        return [self.done.get(timeout=timeout) for _ in range(count)]

    def text(self, key):
        return "".join(e.text for e in self.events[key])

    def last(self, key):
        return self.events[key][-1]
