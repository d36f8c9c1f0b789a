"""`qforge eval MODEL --against REF` (the deployed-quality gate) against llama.cpp's own logits.

A tiny Llama trained by qforge (fp) and its RTN q4_0 PTQ (q4, packed llama.cpp blocks) are exported
to GGUF (f32, and q4_0 blocks as trained/converted) and run in llama.cpp (llama-cpp-python,
logits_all) on the exact windows qforge scores (--save-tokens). The statistics of llama.cpp's
perplexity scoreboard (`llama-perplexity --kl-divergence`, tools/perplexity/perplexity.cpp) are
computed here in numpy from those logits, as that file defines them, and must agree with what qforge
prints within llama.cpp's activation-quantization noise (its q4_0 matmuls quantize activations to
q8_0; qforge's do not): the residuals are printed (pytest -s) and bounded. The same numpy code on
transformers' logits of qforge's fp32 Hugging Face exports checks qforge's statistics code itself.
"""
import json
import subprocess

import numpy as np
import pytest

from tiny_runs import QFORGE, tiny_recipe, train

WINDOWS = 48  # --max-batches 6 of batch_size 8


def scoreboard(ref_logits, model_logits, targets):
    """llama.cpp's kl_divergence statistics (perplexity.cpp) over rows of logits [N, V] (fp64 here)."""
    lr = ref_logits.astype(np.float64)
    lm = model_logits.astype(np.float64)
    lr = lr - lr.max(1, keepdims=True)
    lr = lr - np.log(np.exp(lr).sum(1, keepdims=True))
    lm = lm - lm.max(1, keepdims=True)
    lm = lm - np.log(np.exp(lm).sum(1, keepdims=True))
    n = len(targets)
    rows = np.arange(n)
    nll, nll_base = -lm[rows, targets], -lr[rows, targets]
    kld = np.where(lr > -16, np.exp(lr) * (lr - lm), 0.0).sum(1)  # only ln p_base > -16 counts
    same = lm.argmax(1) == lr.argmax(1)  # first maximum
    dp = np.exp(-nll) - np.exp(-nll_base)

    def mean_unc(v):
        f = v.sum() / n
        df = (v * v).sum() / n - f * f
        return f, (np.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def pct(v, fraction):  # llama.cpp's percentile, in float32 as it computes it
        v = np.sort(v).astype(np.float32)
        p = np.float32(fraction) * np.float32(len(v) - 1)
        ip = int(p)
        p = np.float32(p - np.float32(ip))
        return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])

    def median(v):
        v = np.sort(v).astype(np.float32)
        return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])

    lp, lb = mean_unc(nll), mean_unc(nll_base)
    cov = ((nll * nll_base).sum() / n - nll.sum() / n * nll_base.sum() / n) / (n - 1)
    ln_ratio = lp[0] - lb[0]
    ln_ratio_unc = np.sqrt(lp[1] ** 2 + lb[1] ** 2 - 2 * cov)
    k, d, mse = mean_unc(kld), mean_unc(dp), mean_unc(dp * dp)
    mse_unc = np.sqrt(((dp ** 4).sum() / n - mse[0] ** 2) / (n - 1))
    top = same.sum() / n
    return {
        "tokens": n, "ppl": np.exp(lp[0]), "ppl_unc": np.exp(lp[0]) * lp[1], "ppl_ref": np.exp(lb[0]),
        "ppl_cor": cov / (lp[1] * lb[1]), "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_unc": ln_ratio_unc,
        "ppl_ratio": np.exp(ln_ratio), "ppl_diff": np.exp(lp[0]) - np.exp(lb[0]),
        "kld": k[0], "kld_unc": k[1], "kld_median": median(kld), "kld_p99": pct(kld, 0.99), "kld_max": float(kld.max()),
        "dp": d[0], "dp_unc": d[1], "dp_median": median(dp), "dp_p99": pct(dp, 0.99), "dp_p01": pct(dp, 0.01),
        "rms_dp": np.sqrt(mse[0]), "rms_dp_unc": 0.5 / np.sqrt(mse[0]) * mse_unc,
        "same_top": top, "same_top_unc": np.sqrt(top * (1 - top) / (n - 1)),
        "per_token_kld": kld, "per_token_dp": dp,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kld")
    train(tiny_recipe(d, "fp", False, 150))
    subprocess.run([QFORGE, "-q", "quantize", str(d / "fp"), "--method", "rtn", "--quant", "q4_0", "--no-eval",
                    "--out", str(d / "q4")], check=True, capture_output=True)
    r = subprocess.run([QFORGE, "-q", "eval", str(d / "q4"), "--against", str(d / "fp"), "--max-batches", "6",
                        "--save-tokens", str(d / "windows.safetensors"), "--samples-out", str(d / "tokens.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    from st_io import read_safetensors
    w = read_safetensors(d / "windows.safetensors")
    tokens, mask = np.asarray(w["tokens"]).astype(np.int64), np.asarray(w["loss_mask"]).astype(bool)
    assert tokens.shape[0] == WINDOWS and stats["tokens"] == int(mask.sum())
    return d, stats, tokens, mask


def _rows(logits_per_window, tokens, mask):
    """The labelled rows of every window: logits of positions 0..T-1 predicting tokens 1..T."""
    L = np.concatenate([l[mask[i]] for i, l in enumerate(logits_per_window)])
    t = np.concatenate([tokens[i, 1:][mask[i]] for i in range(len(tokens))])
    return L, t


def _llama_window_logits(path, tokens, lora=None):
    """llama.cpp's logits (llama-cpp-python, f32 KV cache) of each row of tokens but the last, per row;
    lora: a llama.cpp LoRA adapter GGUF applied on the model (lora_path)."""
    import llama_cpp  # built from its sdist by scripts/setup.sh; a missing peer fails here, loudly
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False,
                          lora_path=None if lora is None else str(lora),
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for row in tokens:
        llm.reset()
        llm.eval([int(t) for t in row[:-1]])
        out.append(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
    return out


KEYS = ["kld", "kld_median", "kld_p99", "same_top", "rms_dp", "dp", "ppl", "ppl_ref", "ppl_ratio", "ln_ppl_ratio"]


def _qforge_window_logits(d, name, out, tokens):
    """qforge's forward of run `name` (transformers on its fp32 Hugging Face export: the same logits)."""
    import torch
    import transformers
    subprocess.run([QFORGE, "-q", "export", str(d / name), "--format", "hf", "--dtype", "fp32", "--out", str(out)],
                   check=True, capture_output=True)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return list(m(torch.from_numpy(tokens[:, :-1])).logits.numpy())


def test_statistics_match_numpy_on_qforge_logits(runs, tmp_path):
    """qforge's statistics code: the same numbers from transformers' logits of qforge's fp32 HF exports."""
    d, stats, tokens, mask = runs
    logits = {name: _qforge_window_logits(d, name, tmp_path / name, tokens) for name in ("fp", "q4")}
    ref, t = _rows(logits["fp"], tokens, mask)
    model, _ = _rows(logits["q4"], tokens, mask)
    ours = scoreboard(ref, model, t)
    # Per token (--samples-out): the same window, position, token, KLD and delta-p, in the same order.
    rows = [json.loads(l) for l in (d / "tokens.jsonl").read_text().splitlines()]
    assert len(rows) == ours["tokens"]
    assert [(r["window"], r["pos"]) for r in rows] == [tuple(x) for x in np.argwhere(mask)]
    assert [r["token"] for r in rows] == t.tolist()
    assert np.abs(np.array([r["kld"] for r in rows]) - ours["per_token_kld"]).max() < 1e-6
    assert np.abs(np.array([r["dp"] for r in rows]) - ours["per_token_dp"]).max() < 1e-6
    print("\nqforge vs numpy on transformers' logits of qforge's exports (|difference|):")
    for k in KEYS + ["kld_unc", "dp_p99", "dp_p01", "rms_dp_unc", "same_top_unc", "ppl_cor", "ln_ppl_ratio_unc"]:
        print(f"  {k:18s} qforge {stats[k]: .9g}  numpy {ours[k]: .9g}  |d| {abs(stats[k] - ours[k]):.2e}")
        scale = max(1.0, abs(ours[k])) if k.startswith("ppl") and k != "ppl_cor" else 1.0
        assert abs(stats[k] - ours[k]) <= 1e-6 * scale, k
    assert stats["tokens"] == ours["tokens"]


def test_statistics_agree_with_llama_cpp_logits(runs, tmp_path):
    d, stats, tokens, mask = runs
    paths = {}
    for name in ("fp", "q4"):  # float tensors (embeddings, output) f32; q4's decoder linears keep their q4_0 blocks
        paths[name] = tmp_path / f"{name}.gguf"
        subprocess.run([QFORGE, "-q", "export", str(d / name), "--format", "gguf", "--quant", "f32", "--out",
                        str(paths[name])], check=True, capture_output=True)
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(paths["q4"])).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "F32", types
    ref, t = _rows(_llama_window_logits(paths["fp"], tokens), tokens, mask)
    model, _ = _rows(_llama_window_logits(paths["q4"], tokens), tokens, mask)
    ll = scoreboard(ref, model, t)
    print(f"\nqforge eval q4 --against fp vs llama.cpp's logits of the exported GGUFs ({ll['tokens']} tokens):")
    for k in KEYS + ["kld_unc", "rms_dp_unc", "same_top_unc"]:
        print(f"  {k:18s} qforge {stats[k]: .6g}  llama.cpp {ll[k]: .6g}  |d| {abs(stats[k] - ll[k]):.2e}")
    # llama.cpp's q4_0 matmuls round activations to q8_0 (qforge's do not): the scoreboard moves by
    # a fraction of itself, well inside the statistical uncertainty llama.cpp prints.
    assert abs(stats["kld"] - ll["kld"]) <= 0.1 * ll["kld"] + 2 * ll["kld_unc"], (stats["kld"], ll["kld"])
    assert abs(stats["rms_dp"] - ll["rms_dp"]) <= 0.1 * ll["rms_dp"] + 2 * ll["rms_dp_unc"]
    assert abs(stats["same_top"] - ll["same_top"]) <= 2 * ll["same_top_unc"] + 1 / ll["tokens"]
    assert abs(stats["ppl"] / ll["ppl"] - 1) < 1e-3 and abs(stats["ppl_ref"] / ll["ppl_ref"] - 1) < 1e-4
    assert abs(stats["ln_ppl_ratio"] - ll["ln_ppl_ratio"]) <= 2 * ll["ln_ppl_ratio_unc"]
    # The residual itself: the exported GGUFs' logits in llama.cpp vs qforge's own on the same weights.
    for name, ll_logits in (("fp", ref), ("q4", model)):
        ours, _ = _rows(_qforge_window_logits(d, name, tmp_path / f"hf_{name}", tokens), tokens, mask)
        r = scoreboard(ours, ll_logits, t)
        print(f"  llama.cpp vs qforge, {name}: KLD {r['kld']:.2e}, same top {100 * r['same_top']:.2f}%, "
              f"max |logit diff| {np.abs(ours - ll_logits).max():.2e}")
        assert r["kld"] < (1e-9 if name == "fp" else 0.1 * ll["kld"])
