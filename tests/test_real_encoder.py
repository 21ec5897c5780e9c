"""Encoder prefix tuning on the real bundled MiniLM (all-MiniLM-L6-v2: BERT, 6 layers) on SST-2
sentences. Marked ``real``; still run in CI."""

import pytest
import torch
from conftest import DATA

from prefixtune import PrefixConfig, PrefixModel, data, evaluate
from prefixtune.base_models import MINILM_NAME, load_model

pytestmark = pytest.mark.slow
SST2 = DATA / "sst2" / "dev.tsv"


@pytest.mark.skipif(not SST2.is_file(), reason="needs $PREFIXTUNE_DATA/sst2 (docs/data.md)")
def test_minilm_prefix_and_head_train_save_and_load(tmp_path):
    examples = data.load_examples(str(SST2), text_field="sentence", label_field="label", limit=32)
    labels = data.label_names(examples)
    model, tokenizer = load_model("minilm", task="classification", labels=labels)
    assert model.config.model_type == "bert" and model.config.name_or_path == MINILM_NAME
    pm = PrefixModel.wrap(model, PrefixConfig(prefix_length=4, reparameterize=False))
    assert list(pm.heads) == ["classifier"] and pm.shape.groups == {"encoder": 6}
    rows, _ = data.tokenize_classes(examples, tokenizer, labels, max_length=64)
    batch = data.collate(rows[:16], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=3e-2)
    pm.train()
    losses = []
    for _ in range(8):
        loss = pm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    before = evaluate.classify(pm, rows, tokenizer.pad_token_id, batch_size=16, prefix="default")
    pm.save_prefix(tmp_path)
    fresh, _ = load_model("minilm", task="classification", labels=labels)
    loaded = PrefixModel.from_pretrained(fresh, tmp_path)
    after = evaluate.classify(loaded, rows, tokenizer.pad_token_id, batch_size=16, prefix="default")
    assert after["predictions"] == before["predictions"]
    assert after["loss"] == pytest.approx(before["loss"], abs=1e-5)
