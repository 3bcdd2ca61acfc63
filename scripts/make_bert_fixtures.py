#!/usr/bin/env python3
"""Makes the BERT parity fixture under tests/fixtures/bert/ (run by hand; cargo test never needs
Python).

    pip install torch==2.11.0 "transformers>=5"
    python3 scripts/make_bert_fixtures.py

A tiny random `BertModel` (hidden 32, 2 layers, 4 heads, FFN 64, vocab 100, max positions 40)
saved with `save_pretrained`, and io.safetensors: `input_ids` [3, 9] (row 1 right-padded, row 2
shorter), `attention_mask`, transformers' `last_hidden_state` (eager attention, eval), the mean
pooled embedding `mean_pooled` (sentence-transformers' pooling) and `pooler_output`.
"""
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bert")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40, attn_implementation="eager")
    model = BertModel(cfg).eval()
    model.save_pretrained(OUT)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    h = out.last_hidden_state
    m = mask.unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    save_file({"input_ids": ids, "attention_mask": mask, "last_hidden_state": h.contiguous(),
               "mean_pooled": pooled.contiguous(), "pooler_output": out.pooler_output.contiguous()},
              os.path.join(OUT, "io.safetensors"))
    print(sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
