#!/usr/bin/env python3
"""Generates tests/golden/rope.json from transformers' LlamaRotaryEmbedding (the real peer).

Run: .venv/bin/python tests/golden/gen_rope.py   (needs `transformers` in the venv)
"""
import json
import pathlib

import torch
import transformers
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

CASES = [
    dict(type="default", head_dim=16, theta=10000.0),
    dict(type="linear", head_dim=32, theta=10000.0, factor=4.0),
    dict(type="llama3", head_dim=64, theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
]
POSITIONS = [0, 1, 7, 100, 1000, 5000]

out = {"generated_by": f"tests/golden/gen_rope.py with transformers {transformers.__version__}, torch {torch.__version__}",
       "cases": []}
for c in CASES:
    scaling = None
    if c["type"] != "default":
        scaling = {k: v for k, v in c.items() if k not in ("head_dim", "theta")}
        scaling["rope_type"] = scaling.pop("type")
    cfg = LlamaConfig(hidden_size=c["head_dim"], num_attention_heads=1, head_dim=c["head_dim"], rope_theta=c["theta"],
                      rope_scaling=scaling, max_position_embeddings=8192)
    emb = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, len(POSITIONS), c["head_dim"])
    cos, sin = emb(x, torch.tensor([POSITIONS]))
    case = dict(c)
    case["positions"] = POSITIONS
    case["inv_freq"] = emb.inv_freq.double().tolist()
    case["cos"] = cos[0].double().tolist()
    case["sin"] = sin[0].double().tolist()
    out["cases"].append(case)
path = pathlib.Path(__file__).with_name("rope.json")
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
