"""QLoRA's load memory: `qforge train` with peft.base nf4 on a random Llama checkpoint of 360 MiB
(bf16, three shards, written by transformers) quantizes every base linear tensor by tensor from the
memory-mapped shards, so the run's peak RSS once the model is ready (train_summary.json
setup_peak_rss_bytes; a run of two steps) stays within a baseline plus 1.3x the NF4 model's bytes
(train_summary.json model_bytes: NF4 linears + embeddings/norms/lm_head in the model dtype + the
adapters). The baseline is measured, not assumed: the same recipe on a tiny checkpoint of the same
family and tokenizer (libtorch, the tokenizer, the data; ~360 MiB). Loading the bf16 model whole
before quantizing (qforge before the streaming load) peaked at the baseline + 4.1x the NF4 model."""
import json
import subprocess

import pytest
import torch
import transformers  # a missing peer fails here, loudly

from tiny_runs import QFORGE, kjv_corpus

BIG = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
           intermediate_size=2816, vocab_size=4096)  # 186M parameters: 372 MB in bf16
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=4096)


def _qforge(*args):
    r = subprocess.run([QFORGE, "-q", *map(str, args)], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, f"qforge {' '.join(map(str, args))}:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return kjv_corpus(tmp_path_factory.mktemp("corpus") / "kjv.txt", 600)


def _checkpoint(d, shape, corpus):
    """A random bf16 Llama checkpoint (sharded at 150 MB) with a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(max_position_embeddings=128, tie_word_embeddings=False, torch_dtype="bfloat16",
                                   **shape)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of the big model here
    try:
        m = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    m.save_pretrained(d, safe_serialization=True, max_shard_size="150MB")
    del m
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    return d


def _qlora_run(tmp_path, name, ck, corpus, dtype):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
run: {{name: {name}, out_dir: {tmp_path}/{name}, threads: 2, seed: 1}}
model: {{from: {ck}, dtype: {dtype}}}
tokenizer: {{type: huggingface, path: {ck}}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 32, val_fraction: 0.05, cache_dir: {tmp_path}/cache_{name}}}
peft: {{r: 8, alpha: 16, base: nf4, target_modules: [all-linear], save_adapter: false}}
trainer: {{max_steps: 2, batch_size: 1, eval_every: 0, eval_batches: 1, save_every: 0, log_every: 1}}
""")
    _qforge("train", cfg)
    return json.loads((tmp_path / name / "train_summary.json").read_text())


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_qlora_load_peak_rss_tracks_the_nf4_model(tmp_path, corpus, dtype):
    big = _checkpoint(tmp_path / "big", BIG, corpus)
    tiny = _checkpoint(tmp_path / "tiny", TINY, corpus)
    ck_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    assert len(list(big.glob("*.safetensors"))) >= 2  # sharded
    t = _qlora_run(tmp_path, "tiny_run", tiny, corpus, dtype)
    s = _qlora_run(tmp_path, "big_run", big, corpus, dtype)
    # setup_peak_rss_bytes: the peak once the model is loaded, NF4'd and wrapped (before training and
    # the final checkpoint, whose serialisation holds a second copy of the model for a moment).
    base, load, nf4 = t["setup_peak_rss_bytes"], s["setup_peak_rss_bytes"], s["model_bytes"]
    mib = 2**20
    report = (f"model dtype {dtype}: checkpoint {ck_bytes / mib:.0f} MiB bf16, NF4 model {nf4 / mib:.0f} MiB, "
              f"baseline {base / mib:.0f} MiB, load peak {load / mib:.0f} MiB (bound {(base + 1.3 * nf4) / mib:.0f} "
              f"MiB; load peak - baseline = {(load - base) / nf4:.2f}x NF4); whole run peak "
              f"{s['peak_rss_bytes'] / mib:.0f} MiB (tiny: {t['peak_rss_bytes'] / mib:.0f} MiB)")
    print(report)
    assert nf4 < ck_bytes / 2.5, report  # the run really holds NF4 bases
    assert load <= base + 1.3 * nf4, report


def _quantize(tmp_path, name, ck, corpus, method, *extra):
    calib = tmp_path / f"{name}_calib.yaml"
    calib.write_text(f"""
run: {{name: {name}, out_dir: {tmp_path}/{name}_unused, threads: 2, seed: 1}}
tokenizer: {{type: huggingface, path: {ck}}}
data: {{sources: [{{path: {corpus}, split: line}}], seq_len: 32, val_fraction: 0.05, cache_dir: {tmp_path}/cache_{name}}}
""")
    _qforge("quantize", ck, "--method", method, "--quant", "int4-g32", "--calib", calib, "--samples", "8",
            "--out", tmp_path / name, *extra)
    return json.loads((tmp_path / name / "ptq_summary.json").read_text())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_quantize_peak_rss_tracks_the_packed_model(tmp_path, corpus, method):
    """`qforge quantize` loads, calibrates and converts one decoder layer at a time from the mapped bf16
    shards, so its peak RSS (ptq_summary.json peak_rss_bytes, held-out evaluation included) grows with
    the packed model, not the float one: from 8 to 16 layers of the same shapes the streamed peak grows
    by at most the packed model's growth plus a quarter of the 8 added fp32 layers (which a whole-model
    load adds in full; measured: +104 MiB for +54 MiB of packed int4, the rest heap left between the
    packed buffers by each layer's temporaries), while --no-stream (the fp32 model loaded whole first)
    peaks at least 8 fp32 layers above the streamed run (the check can fail: measured 1387 vs 921 MiB).
    The per-layer working set (the fp32 layer, its Hessians and the quantizer's temporaries, ~5-6 fp32
    layers) is the same at both depths."""
    half = dict(BIG, num_hidden_layers=BIG["num_hidden_layers"] // 2)
    big = _checkpoint(tmp_path / "big", BIG, corpus)
    small = _checkpoint(tmp_path / "small", half, corpus)
    s16 = _quantize(tmp_path, "big_q", big, corpus, method)
    s8 = _quantize(tmp_path, "small_q", small, corpus, method)
    w16 = _quantize(tmp_path, "big_whole", big, corpus, method, "--no-stream")
    h, f = BIG["hidden_size"], BIG["intermediate_size"]
    kv = h * BIG["num_key_value_heads"] // BIG["num_attention_heads"]
    layer_fp32 = 4 * (2 * h * h + 2 * h * kv + 3 * h * f)
    mib = 2**20
    grow, packed_grow = s16["peak_rss_bytes"] - s8["peak_rss_bytes"], s16["model_bytes"] - s8["model_bytes"]
    report = (f"{method}: one fp32 layer {layer_fp32 / mib:.0f} MiB; streamed peak 8 layers "
              f"{s8['peak_rss_bytes'] / mib:.0f} MiB, 16 layers {s16['peak_rss_bytes'] / mib:.0f} MiB (+{grow / mib:.0f} "
              f"MiB for +{packed_grow / mib:.0f} MiB of packed model); --no-stream 16 layers "
              f"{w16['peak_rss_bytes'] / mib:.0f} MiB")
    print(report)
    assert s16["streamed"] and not w16["streamed"] and s16["val_loss_fp"] == w16["val_loss_fp"], report
    assert grow <= packed_grow + 0.25 * 8 * layer_fp32, report
    assert w16["peak_rss_bytes"] >= s16["peak_rss_bytes"] + 8 * layer_fp32, report
