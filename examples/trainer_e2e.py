"""Prefix tuning through transformers' Trainer: the bundled SmolLM2-135M-Instruct on E2E NLG.

Run from the repository root (docs/training.md shows its output):

    python examples/trainer_e2e.py                 # 120 steps of batch 8, then BLEU / ROUGE-L on 50 dev MRs
    python examples/trainer_e2e.py --trl           # the same through TRL's SFTTrainer (pip install "prefixtune[trl]")

E2E is read from $PREFIXTUNE_DATA/e2e (`prefixtune data prepare e2e` makes it; docs/data.md).
"""

import argparse
import sys

import transformers

from prefixtune import PrefixConfig, PrefixModel, data, evaluate
from prefixtune.base_models import load_model
from prefixtune.config import EvalConfig
from prefixtune.metrics import compute_metrics
from prefixtune.hf_trainer import use_prefix_checkpoints

TEMPLATE = "Table: {prompt}\nText:"

parser = argparse.ArgumentParser()
parser.add_argument("--trl", action="store_true", help="train with TRL's SFTTrainer instead of Trainer")
parser.add_argument("--output-dir", default="runs/trainer-e2e")
args = parser.parse_args()
try:
    E2E = data.root() / "e2e"
except data.NoDataRoot as err:
    sys.exit(f"examples/trainer_e2e.py: {err}")

model, tokenizer = load_model()  # the bundled SmolLM2-135M-Instruct
pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=10, reparameterize=False), tokenizer=tokenizer)
train = data.load_examples(f"{E2E}/trainset.csv", prompt_field="mr", completion_field="ref")
dev = data.load_examples(f"{E2E}/devset.csv", prompt_field="mr", completion_field="ref", limit=500)
training = dict(output_dir=args.output_dir, max_steps=120, per_device_train_batch_size=8, learning_rate=3e-2,
                lr_scheduler_type="linear", warmup_steps=10, max_grad_norm=0.0, save_steps=40, logging_steps=20,
                bf16=False, report_to=[], seed=0, data_seed=0)  # float32, as prefixtune train

if args.trl:
    import datasets
    import trl

    records = [{"prompt": TEMPLATE.format(prompt=ex.prompt), "completion": ex.completion} for ex in train]
    trainer = trl.SFTTrainer(model=pm, args=trl.SFTConfig(**training, max_length=160, completion_only_loss=True),
                             train_dataset=datasets.Dataset.from_list(records), processing_class=tokenizer)
else:
    rows, _ = data.tokenize(train, tokenizer, max_length=160, template=TEMPLATE)
    trainer = transformers.Trainer(model=pm, args=transformers.TrainingArguments(**training), train_dataset=rows,
                                   data_collator=lambda batch: data.collate(batch, tokenizer.pad_token_id))
use_prefix_checkpoints(trainer)  # checkpoints hold the prefix (prefix.safetensors), never the frozen base
trainer.train()
trainer.save_model(args.output_dir)  # prefixtune eval/generate/serve --prefix runs/trainer-e2e read it

groups = data.group_references(dev)[:50]
texts = evaluate.generate_texts(pm, tokenizer, [ex for ex, _ in groups],
                                EvalConfig(prompt_template=TEMPLATE, max_new_tokens=64, batch_size=16), prefix="default")
scores = compute_metrics(["bleu", "rouge_l"], texts, [refs for _, refs in groups])
print({name: round(value, 2) for name, value in scores.items()})
