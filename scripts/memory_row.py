#!/usr/bin/env python3
"""One markdown row of the demo's training-memory table from a run's train_summary.json
(written by `qforge train`): weights as stored, gradients, AdamW state, their total (MB), the
process's peak RSS (MiB) and training tokens/s. Usage: memory_row.py LABEL RUN_DIR"""
import json
import sys

label, run = sys.argv[1], sys.argv[2]
s = json.load(open(f"{run}/train_summary.json"))
w, g, o = (s[k] / 1e6 for k in ("train_weight_bytes", "grad_bytes", "optimizer_bytes"))
print(f"| {label:<26} | {w:9.2f} | {g:8.2f} | {o:8.2f} | {w + g + o:8.2f} | "
      f"{s['peak_rss_bytes'] / 2**20:8.0f} | {s['tokens_per_s']:8.0f} |")
