"""The llama.cpp quality table (issue 23 item 4): per llama.cpp type, how far each way of getting a
float model into that type moves it, every number computed by llama.cpp (llama-cpp-python 0.3.36,
llama.cpp 0c1e570) on the exported GGUF.

Pipeline (every stage is skipped when its output exists under --work, so a run resumes):
  1. the float model: `qforge train` of the scale's recipe (configs/quality_table_<scale>.yaml);
  2. its f32 GGUF (`qforge export --format gguf --quant f32`), the held-out windows (`qforge eval
     --save-tokens`, the recipe's validation split) and llama.cpp's reference logits on them;
     the importance matrix (`qforge imatrix` on --imatrix-chunks windows of the training text);
  3. per type (Q2_K, Q3_K_M, Q4_0, Q4_K_M, IQ4_XS, TQ2_0 by default), five GGUFs:
       llama-quantize       llama_model_quantize (the llama-quantize tool's call) of the f32 GGUF;
       llama-quantize+imat  the same with the importance matrix, handed over as tools/quantize does
                            (in_sum2 / counts per tensor);
       qforge PTQ           `qforge train` with quant.init gptq (Q4_0: its q4_0/q4_1 linears) or awq
                            (the other types; GPTQ has no K/IQ/TQ column quantizer), no training
                            steps, each decoder linear in the type llama-quantize+imat chose for it,
                            exported with `export --format gguf --quant MIX --float-tensors mixture
                            --imatrix` (the packed linears as they are, token_embd / output in the
                            mixture's types and bytes as llama-quantize gives them);
       qforge QAT           --qat-steps of fake-quant training with those per-tensor types (token_embd
                            and output too: quant.embedding and an lm_head rule), started
                            from the qforge PTQ result (quant.init as that row) and distilled from the
                            float model (`distill: {teacher: init}`: the loss is KL(float || model)
                            per token, so training reproduces the float model instead of drifting
                            from it on the labels), exported the same way (the trained blocks kept);
       QAT+LoRA on base     LoRA (r 16, all linears) on the served base (`peft: {base: mix, mixture:
                            MIX}`: each linear's blocks in llama-quantize's type for it, quantized from
                            the float weights without an imatrix, so iq4_xs's ffn_down may differ from
                            the +imatrix choice) with exact_merge, distilled from the float model as
                            QAT is, --lora-steps, then the merged GGUF exported the same way;
  4. each GGUF's llama.cpp logits on the same windows against the reference's: llama.cpp's
     perplexity --kl-divergence statistics (tests/interop/test_kld_gate.scoreboard: mean KLD
     +- stderr, p99, same top %, RMS delta-p, PPL), bits per weight from the file's tensor data;
     for the QAT / QAT+LoRA GGUFs also the residual: qforge's forward of the GGUF's own weights
     (`export --format hf` of the GGUF, transformers fp32 = qforge's logits) against llama.cpp's.
Writes bench/results/quality_table_<scale>.{json,md,png} and prints the markdown table.
Gap closed by X at a type = (KLD(llama-quantize+imat) - KLD(X)) / KLD(llama-quantize+imat): the
share of the KLD that llama-quantize with an importance matrix leaves (against the float model,
whose own KLD is 0) that X removes.
Run: .venv/bin/python bench/quality_table.py --scale small|50m  (needs `make build`)."""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
Q = os.path.join(ROOT, "build", "qforge")

# type label -> (qforge / llama_ref mixture name, the block type of the LoRA base, PTQ method)
TYPES = {
    "Q2_K": ("q2_k", "q2_k", "awq"),
    "Q3_K_M": ("q3_k_m", "q3_k", "awq"),
    "Q4_0": ("q4_0", "q4_0", "gptq"),
    "Q4_K_M": ("q4_k_m", "q4_k", "awq"),
    "IQ4_XS": ("iq4_xs", "iq4_xs", "awq"),
    "TQ2_0": ("tq2_0", "tq2_0", "awq"),
}
METHODS = ["llama-quantize", "llama-quantize+imatrix", "qforge PTQ", "qforge QAT", "QAT+LoRA on base"]
SCALES = {  # recipe, float steps, QAT / LoRA steps, held-out batches (x trainer.batch_size windows), imatrix windows
    # qat_lr / lora_lr: the small model's sweep (distilled Q4_K_M, qforge's scoreboard, mean KLD from the
    # float model; AWQ alone 1.85e-4): QAT lr 3e-4 / 1e-4 / 3e-5 / 1e-5 x 30 steps 9.6e-4 / 1.8e-4 / 9.1e-5 /
    # 9.5e-5, 3e-5 x 100 steps 6.8e-5; LoRA (q4_k base) lr 1e-3 / 3e-4 x 30 steps 1.42e-4 / 1.50e-4.
    "small": dict(recipe="configs/quality_table_small.yaml", qat_steps=100, lora_steps=100, eval_batches=4, imatrix_chunks=64,
                  qat_lr=3.0e-5, lora_lr=1.0e-3, save_every=0),
    "50m": dict(recipe="configs/quality_table_50m.yaml", qat_steps=150, lora_steps=150, eval_batches=4, imatrix_chunks=128,
                qat_lr=2.0e-5, lora_lr=5.0e-4, save_every=50),
}
GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
ENV = dict(os.environ, QFORGE_PROGRESS="0")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*args, log_to=None):
    t0 = time.time()
    r = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, env=ENV)
    if log_to:
        with open(log_to, "a") as f:
            f.write("$ " + " ".join(map(str, args)) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(map(str, args))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout, time.time() - t0


def done(path):
    return os.path.exists(path)


def gguf_types(path):
    """{tensor name: ggml type name} and bits per weight of all tensor data (bytes * 8 / elements)."""
    import gguf
    g = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in g.tensors}
    nbytes = sum(int(t.n_bytes) for t in g.tensors)
    nel = sum(int(t.n_elements) for t in g.tensors)
    lin = [t for t in g.tensors if t.name.startswith("blk.") and t.name.split(".")[2] in GGUF_TO_HF]
    bpw_lin = 8.0 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin)
    return types, 8.0 * nbytes / nel, bpw_lin


def rules_from(types):
    """quant.rules giving every decoder linear the type the GGUF holds for it (first match wins)."""
    rules = []
    for name, ty in sorted(types.items()):
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if m and m.group(2) in GGUF_TO_HF:
            rules.append({"pattern": f"model.layers.{m.group(1)}.{GGUF_TO_HF[m.group(2)]}",
                          "weight": {"preset": ty.lower()}})
    return rules


def write_recipe(path, base, body):
    with open(path, "w") as f:
        f.write(f"# Written by bench/quality_table.py; run: {Q} train {path}\nbase: {base}\n" + body)


def llama_logits(path, tokens, n_threads):
    """llama.cpp's logits (f32 KV cache) of every window's positions 0..T-2, one array per window."""
    import llama_cpp
    n = tokens.shape[1] - 1
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, logits_all=True, n_threads=n_threads,
                          verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for row in tokens:
        llm.reset()
        llm.eval([int(t) for t in row[:-1]])
        out.append(np.array(llm.scores[:n], dtype=np.float32))
    del llm
    return out


def rows(per_window, tokens, mask):
    """The labelled rows: logits at positions 0..T-2 predicting tokens 1..T-1 where the loss mask is set."""
    L = np.concatenate([w[mask[i]] for i, w in enumerate(per_window)])
    t = np.concatenate([tokens[i, 1:][mask[i]] for i in range(len(tokens))])
    return L, t


def hf_logits(gguf_path, out_dir, tokens):
    """qforge's reading of a GGUF (every weight dequantized as gguf-py does), as an fp32 Hugging Face dir,
    run by transformers: the float forward of exactly the GGUF's weights."""
    import torch
    import transformers
    if not done(os.path.join(out_dir, "config.json")):
        sh(Q, "-q", "export", gguf_path, "--format", "hf", "--dtype", "fp32", "--out", out_dir)
    m = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return list(m(torch.from_numpy(tokens[:, :-1])).logits.numpy())


def stats(ref, model, t):
    from test_kld_gate import scoreboard
    s = scoreboard(ref, model, t)
    keep = ["tokens", "kld", "kld_unc", "kld_median", "kld_p99", "kld_max", "same_top", "same_top_unc", "rms_dp",
            "rms_dp_unc", "dp", "ppl", "ppl_unc", "ppl_ref", "ppl_ratio", "ln_ppl_ratio", "ln_ppl_ratio_unc"]
    return {k: float(s[k]) for k in keep}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), required=True)
    ap.add_argument("--work", help="work directory (default runs/quality_table/<scale>)")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated subset of " + ",".join(TYPES))
    ap.add_argument("--fp-steps", type=int, help="float model steps (default: the recipe's trainer.max_steps)")
    ap.add_argument("--qat-steps", type=int)
    ap.add_argument("--lora-steps", type=int)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    a = ap.parse_args()
    sc = SCALES[a.scale]
    qat_steps = a.qat_steps or sc["qat_steps"]
    lora_steps = a.lora_steps or sc["lora_steps"]
    W = os.path.abspath(a.work or os.path.join(ROOT, "runs", "quality_table", a.scale))
    os.makedirs(W, exist_ok=True)
    cmdlog = os.path.join(W, "commands.log")
    recipe = os.path.join(ROOT, sc["recipe"])
    types = [t.strip() for t in a.types.split(",")]
    for t in types:
        if t not in TYPES:
            sys.exit(f"--types: unknown type '{t}' (one of {', '.join(TYPES)})")
    t_start = time.time()
    timings = {}

    # 1. float model
    fp = os.path.join(W, "fp")
    if not done(os.path.join(fp, "train_summary.json")):
        log(f"training the float model ({sc['recipe']})")
        extra = [f"trainer.max_steps={a.fp_steps}"] if a.fp_steps else []
        _, timings["fp_train_s"] = sh(Q, "-q", "train", recipe, f"run.out_dir={fp}", *extra, log_to=cmdlog)
    with open(os.path.join(fp, "config.yaml")) as f:
        fp_cfg = f.read()
    fp_steps = int(re.search(r"max_steps: (\d+)", fp_cfg).group(1))

    # 2. f32 GGUF, windows, reference logits, imatrix
    fp_gguf = os.path.join(W, "fp_f32.gguf")
    if not done(fp_gguf):
        sh(Q, "-q", "export", fp, "--format", "gguf", "--quant", "f32", "--out", fp_gguf, log_to=cmdlog)
    win = os.path.join(W, "windows.safetensors")
    if not done(win):
        sh(Q, "-q", "eval", fp, "--max-batches", sc["eval_batches"], "--save-tokens", win, log_to=cmdlog)
    from st_io import read_safetensors
    w = read_safetensors(win)
    tokens = np.asarray(w["tokens"]).astype(np.int64)
    mask = np.asarray(w["loss_mask"]).astype(bool)
    if mask.shape[1] == tokens.shape[1]:  # aligned with the inputs: the labels are 1..T-1
        mask = mask[:, 1:]
    log(f"{tokens.shape[0]} held-out windows of {tokens.shape[1]} tokens, {int(mask.sum())} scored tokens")
    ref_logits, tgt = rows(llama_logits(fp_gguf, tokens, a.threads), tokens, mask)
    imat = os.path.join(W, "imatrix.gguf")
    if not done(imat):
        _, timings["imatrix_s"] = sh(Q, "-q", "imatrix", fp, "--chunks", sc["imatrix_chunks"], "--out", imat, log_to=cmdlog)
    from llama_ref import llama_quantize
    from test_gguf_lowbit import imatrix_values
    imv = imatrix_values(imat)
    _, fp_bpw, _ = gguf_types(fp_gguf)
    n_params = sum(int(np.prod(x.shape)) for x in __import__("gguf").GGUFReader(fp_gguf).tensors)

    results = {}
    for label in types:
        mix, base_type, ptq = TYPES[label]
        R = results.setdefault(label, {})
        files = {}
        files["llama-quantize"] = os.path.join(W, f"{mix}_llama.gguf")
        if not done(files["llama-quantize"]):
            llama_quantize(fp_gguf, files["llama-quantize"], mix, nthread=a.threads)
        files["llama-quantize+imatrix"] = os.path.join(W, f"{mix}_llama_imatrix.gguf")
        if not done(files["llama-quantize+imatrix"]):
            llama_quantize(fp_gguf, files["llama-quantize+imatrix"], mix, nthread=a.threads, imatrix=imv)
        mix_types, _, _ = gguf_types(files["llama-quantize+imatrix"])
        rules = json.dumps(rules_from(mix_types))
        qat_rules = json.dumps([{"pattern": "lm_head", "weight": {"preset": mix_types["output.weight"].lower()}}]
                               + rules_from(mix_types))
        embd_type = mix_types["token_embd.weight"].lower()
        common = (f"run: {{init_from: {fp}, out_dir: OUT}}\nquant: {{rules: {rules}, fake_quant_after_steps: 0{{extra}}}}\n"
                  "trainer: {eval_every: 0, save_every: SAVE, optim: {lr: LR, weight_decay: 0.0}, "
                  "schedule: {type: cosine, warmup_steps: WARM, min_lr_ratio: 0.1}, max_steps: STEPS}\n"
                  "sample: {prompts: []}\n")
        jobs = {
            "qforge PTQ": (f"ptq_{mix}", common.replace("{extra}", f", init: {ptq}").replace("LR", "1.0e-4")
                           .replace("WARM", "0").replace("STEPS", "0").replace("SAVE", "0")),
            # QAT also fake-quantizes token_embd and output in the mixture's types (quant.embedding and an
            # lm_head rule), so the trained model is the file llama.cpp runs, not only its linears.
            "qforge QAT": (f"qat_{mix}", common.replace(rules, qat_rules)
                           .replace("{extra}", f", init: {ptq}, exclude: [], embedding: {{preset: {embd_type}}}")
                           .replace("LR", str(sc["qat_lr"])).replace("WARM", "10").replace("STEPS", str(qat_steps))
                           .replace("SAVE", str(sc["save_every"])) + "distill: {teacher: init}\n"),
            "QAT+LoRA on base": (f"lora_{mix}", f"run: {{init_from: {fp}, out_dir: OUT}}\n"
                                 f"peft: {{r: 16, alpha: 32, dropout: 0.0, target_modules: [all-linear], base: mix, mixture: {mix}, "
                                 f"exact_merge: true, save_adapter: false}}\n"
                                 f"trainer: {{eval_every: 0, save_every: {sc['save_every']}, optim: {{lr: {sc['lora_lr']}, weight_decay: 0.0}}, "
                                 f"schedule: {{type: cosine, warmup_steps: 10, min_lr_ratio: 0.1}}, max_steps: {lora_steps}}}\n"
                                 "sample: {prompts: []}\ndistill: {teacher: init}\n"),
        }
        for method, (name, body) in jobs.items():
            out = os.path.join(W, name)
            files[method] = os.path.join(W, f"{name}.gguf")
            if done(files[method]):
                continue
            try:
                rec = os.path.join(W, f"{name}.yaml")
                write_recipe(rec, recipe, body.replace("OUT", out))
                if not done(os.path.join(out, "train_summary.json")):  # written at the end; a stopped run resumes
                    log(f"{label}: {method} ({rec})")
                    _, timings[f"{name}_s"] = sh(Q, "-q", "train", rec, log_to=cmdlog)
                src = os.path.join(out, "converted") if done(os.path.join(out, "converted")) else out
                # The packed decoder linears as they are; token_embd / output in the mixture's types
                # (--float-tensors mixture: llama-quantize's choice and bytes for them).
                sh(Q, "-q", "export", src, "--format", "gguf", "--quant", mix, "--float-tensors", "mixture",
                   "--imatrix", imat, "--out", files[method], log_to=cmdlog)
                ty, _, _ = gguf_types(files[method])
                off = sorted(n for n, t in mix_types.items() if ty.get(n) != t)
                if off:
                    log(f"{label}: {method}: {len(off)} tensor(s) not in llama-quantize+imatrix's type: "
                        + ", ".join(f"{n} {ty.get(n)} vs {mix_types[n]}" for n in off[:6]))
            except RuntimeError as e:
                files[method] = None
                R[method] = {"error": str(e).splitlines()[0][:300], "detail": str(e)[-1500:]}
                log(f"{label}: {method} failed: {str(e)[-600:]}")
        for method in METHODS:
            if not files.get(method):
                continue
            cache = os.path.join(W, "stats", os.path.basename(files[method]) + ".json")
            stamp = [os.path.getmtime(files[method]), os.path.getmtime(fp_gguf), os.path.getmtime(win)]
            if done(cache):
                with open(cache) as f:
                    c = json.load(f)
                if c.pop("stamp") == stamp:
                    R[method] = c
                    log(f"{label:7s} {method:24s} KLD {c['kld']:.5f} (cached: {os.path.relpath(cache, ROOT)})")
                    continue
            ty, bpw, bpw_lin = gguf_types(files[method])
            ll = llama_logits(files[method], tokens, a.threads)
            L, _ = rows(ll, tokens, mask)
            r = stats(ref_logits, L, tgt)
            r.update(bpw=bpw, bpw_linears=bpw_lin, file=os.path.relpath(files[method], ROOT),
                     file_bytes=os.path.getsize(files[method]),
                     types=dict(sorted({v: sum(1 for x in ty.values() if x == v) for v in set(ty.values())}.items())))
            if method in ("qforge QAT", "QAT+LoRA on base"):
                ours, _ = rows(hf_logits(files[method], files[method][:-5] + "_hf", tokens), tokens, mask)
                res = stats(ours, L, tgt)
                r["residual_vs_qforge"] = {"kld": res["kld"], "kld_p99": res["kld_p99"], "same_top": res["same_top"],
                                           "max_abs_logit_diff": float(np.abs(ours - L).max()),
                                           "logit_scale": float(np.abs(ours).max())}
            R[method] = r
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as f:
                json.dump(dict(r, stamp=stamp), f)
            log(f"{label:7s} {method:24s} bpw {bpw:.3f} KLD {r['kld']:.5f} ± {r['kld_unc']:.5f} "
                f"same top {100 * r['same_top']:.2f}% PPL {r['ppl']:.3f}")

    out = {
        "command": ".venv/bin/python bench/quality_table.py " + " ".join(sys.argv[1:]),
        "scale": a.scale,
        "label": ("REHEARSAL on the small demo-size model (dim 256, 4 layers): the pipeline's end-to-end check, "
                  "not the issue's >= 50M-parameter table") if a.scale == "small" else "full scale",
        "git_rev": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": {"cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
                    "cores": os.cpu_count(), "platform": platform.platform()},
        "llama_cpp": __import__("llama_cpp").__version__,
        "recipe": sc["recipe"], "fp_steps": fp_steps, "qat_steps": qat_steps, "lora_steps": lora_steps,
        "params": n_params, "fp_bpw": fp_bpw,
        "windows": int(tokens.shape[0]), "window_tokens": int(tokens.shape[1]), "scored_tokens": int(mask.sum()),
        "ptq_method": {k: v[2] for k, v in TYPES.items() if k in types},
        "lora_base": {k: v[0] for k, v in TYPES.items() if k in types},
        "seconds": round(time.time() - t_start, 1), "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "qat_lr": sc["qat_lr"], "lora_lr": sc["lora_lr"], "distill": "teacher: init (the float model), kd_weight 1, T 1",
        "results": results,
    }
    out["goals"] = goals(results)
    res_dir = os.path.join(ROOT, "bench", "results")
    base = os.path.join(res_dir, f"quality_table_{a.scale}")
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1)
    md = table(out)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    plot(base + ".json", base + ".png")


def goals(results):
    """Share of llama-quantize+imatrix's KLD closed by QAT (and QAT+LoRA), per type; the issue's goals."""
    g = {}
    for label, R in results.items():
        ref = R.get("llama-quantize+imatrix", {}).get("kld")
        if not ref:
            continue
        g[label] = {m: round(100.0 * (ref - R[m]["kld"]) / ref, 1) for m in ("qforge PTQ", "qforge QAT", "QAT+LoRA on base")
                    if "kld" in R.get(m, {})}
    low = [g[t]["qforge QAT"] for t in ("Q2_K", "Q3_K_M") if "qforge QAT" in g.get(t, {})]
    summary = {"gap_closed_pct": g}
    if low:
        summary["qat_2_3_bit_min_pct"] = min(low)
        summary["goal_2_3_bit_60pct_met"] = min(low) >= 60.0
    if "qforge QAT" in g.get("Q4_K_M", {}):
        summary["qat_q4_k_m_pct"] = g["Q4_K_M"]["qforge QAT"]
        summary["goal_q4_k_m_70pct_met"] = g["Q4_K_M"]["qforge QAT"] >= 70.0
    resid = {f"{t} {m}": R[m]["residual_vs_qforge"] for t, R in results.items() for m in R if "residual_vs_qforge" in R[m]}
    if resid:
        summary["residual_max_kld"] = max(v["kld"] for v in resid.values())
    return summary


def table(out):
    lines = [f"{out['label']}. llama.cpp on each exported GGUF vs the float model's f32 GGUF, "
             f"{out['scored_tokens']} held-out tokens ({out['windows']} windows); command: `{out['command']}` "
             f"(git {out['git_rev'][:7]}, {out['machine']['cpu']}, {out['machine']['cores']} cores).", "",
             "| type | method | bits/weight (file; linears) | mean KLD ± stderr | p99 KLD | same top % | RMS Δp % | PPL | gap closed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ppl_ref = None
    for label, R in out["results"].items():
        gap = out["goals"]["gap_closed_pct"].get(label, {})
        for m in METHODS:
            r = R.get(m)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {label} | {m} | – | not run: {r['error']} | | | | | |")
                continue
            ppl_ref = r["ppl_ref"]
            name = m + (f" ({out['ptq_method'][label].upper()})" if m == "qforge PTQ" else "") + \
                (f" ({out['lora_base'][label]} mixture base)" if m == "QAT+LoRA on base" else "")
            gc = f"{gap[m]:.1f}%" if m in gap else ""
            lines.append(f"| {label} | {name} | {r['bpw']:.3f}; {r['bpw_linears']:.3f} | {r['kld']:.5f} ± {r['kld_unc']:.5f} | "
                         f"{r['kld_p99']:.4f} | {100 * r['same_top']:.2f} | {100 * r['rms_dp']:.2f} | {r['ppl']:.3f} | {gc} |")
    g = out["goals"]
    lines += ["", f"Float model PPL (llama.cpp, f32 GGUF): {ppl_ref:.3f}. Gap closed = (KLD(llama-quantize+imatrix) - KLD(X)) / "
              "KLD(llama-quantize+imatrix).",
              f"qforge QAT: {out['qat_steps']} fake-quant steps (lr {out['qat_lr']}) from the qforge PTQ row's result; "
              f"QAT+LoRA: {out['lora_steps']} steps (lr {out['lora_lr']}); both distilled from the float model "
              f"({out['distill']})."]
    if "qat_2_3_bit_min_pct" in g:
        lines.append(f"Goal at 2-3 bits (QAT closes >= 60% at Q2_K and Q3_K_M): worst {g['qat_2_3_bit_min_pct']:.1f}% "
                     f"-> {'met' if g['goal_2_3_bit_60pct_met'] else 'NOT met'}.")
    if "qat_q4_k_m_pct" in g:
        lines.append(f"Goal at Q4_K_M (>= 70%): {g['qat_q4_k_m_pct']:.1f}% -> {'met' if g['goal_q4_k_m_70pct_met'] else 'NOT met'}.")
    resid = [(f"{t} {m}", R[m]["residual_vs_qforge"]) for t, R in out["results"].items() for m in R
             if "residual_vs_qforge" in R.get(m, {})]
    if resid:
        lines.append("Exported GGUF in llama.cpp vs qforge's forward of the same weights (KLD; max |Δlogit| / logit scale): " +
                     "; ".join(f"{k} {v['kld']:.1e} ({v['max_abs_logit_diff']:.2g}/{v['logit_scale']:.2g})" for k, v in resid) + ".")
    return "\n".join(lines)


PLOT = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = json.load(open(sys.argv[1]))
fig, ax = plt.subplots(figsize=(8, 5.5))
marks = {"llama-quantize": "o", "llama-quantize+imatrix": "s", "qforge PTQ": "^", "qforge QAT": "D", "QAT+LoRA on base": "v"}
for m, mk in marks.items():
    pts = sorted((r[m]["bpw"], r[m]["kld"], t) for t, r in out["results"].items() if "kld" in r.get(m, {}))
    if not pts:
        continue
    ax.plot([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], marker=mk, linestyle="none", label=m, markersize=7, alpha=0.85)
for t, r in out["results"].items():
    if "kld" in r.get("llama-quantize", {}):
        ax.annotate(t, (r["llama-quantize"]["bpw"], r["llama-quantize"]["kld"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.set_yscale("log")
ax.set_xlabel("bits per weight (all tensors of the GGUF)")
ax.set_ylabel("mean KLD vs the float model (llama.cpp, nats/token)")
ax.set_title(("REHEARSAL (small model): " if out["scale"] == "small" else "") + "llama.cpp quality per method, %d params" % out["params"], fontsize=10)
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def plot(js, png):
    """The plot through the bench-only venv's matplotlib (bench/requirements.txt, as bench/scale.sh makes it)."""
    py = os.path.join(ROOT, ".cache", "bench-venv", "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", os.path.dirname(os.path.dirname(py))], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "-r", os.path.join(ROOT, "bench", "requirements.txt")], check=True)
    subprocess.run([py, "-c", PLOT, js, png], check=True)
    log(f"plot: {os.path.relpath(png, ROOT)}")


if __name__ == "__main__":
    main()
