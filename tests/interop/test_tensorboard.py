"""qforge's native TensorBoard writer (core/tensorboard.cpp) read back by TensorBoard itself.

A tiny `qforge train` run writes metrics.jsonl and tb/events.*; TensorBoard's EventAccumulator must
read the same scalars (tags, steps, values to float32 precision) that metrics.jsonl holds.
"""
import json
import os
import pathlib
import subprocess

from tensorboard.backend.event_processing import event_accumulator  # the real peer: no skip

ROOT = pathlib.Path(__file__).resolve().parents[2]


def qforge():
    build = os.environ.get("QFORGE_BUILD_DIR", str(ROOT / "build"))
    exe = pathlib.Path(build) / "qforge"
    assert exe.exists(), f"{exe} is missing: run `make build` first (QFORGE_BUILD_DIR={build})"
    return str(exe)


def test_event_file_matches_metrics_jsonl(tmp_path):
    corpus = ROOT / "data" / "corpora" / "kjv.txt"
    assert corpus.exists(), "data/corpora/kjv.txt missing: run scripts/setup.sh"
    lines = corpus.read_text().splitlines()[:800]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "r.yaml"
    cfg.write_text(
        f"""# Run: qforge train r.yaml
run: {{name: tb, out_dir: {tmp_path}/run, threads: 1}}
tokenizer: {{path: {tmp_path}/tok.model, train: {{enabled: true, sources: [{tmp_path}/c.txt], vocab_size: 400}}}}
model: {{dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64, max_seq_len: 64}}
data: {{sources: [{{path: {tmp_path}/c.txt, split: line}}], seq_len: 32, cache_dir: {tmp_path}/cache}}
trainer: {{max_steps: 5, batch_size: 4, log_every: 1, eval_every: 2, eval_batches: 1, schedule: {{warmup_steps: 1}}}}
""")
    env = dict(os.environ, QFORGE_PROGRESS="0")
    subprocess.run([qforge(), "train", str(cfg)], check=True, env=env, capture_output=True)
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = event_accumulator.EventAccumulator(str(events[0]), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    want = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k != "step":
                want.setdefault(k, []).append((rec["step"], v))
    assert set(acc.Tags()["scalars"]) == set(want), (acc.Tags()["scalars"], want.keys())
    for tag, pts in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pts], tag
        for (_, a), (_, b) in zip(got, pts):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (tag, a, b)
