"""PTQ/QAT quality table (the shape of the AWQ paper's Table 4): held-out perplexity of FP, RTN,
GPTQ, AWQ, QAT and GPTQ->QAT at q4_0, int4 g128 and int3 g128 (asymmetric, as the paper), on
  A. the demo model (runs/demo/pretrain: `make demo`'s pretrained Llama, dim 256, 4 layers), and
  B. a Llama built by transformers (random init, LlamaConfig dim 256, ffn 768, 4 layers, 4/2
     heads, untied), read by qforge through model.from, trained on the KJV text for --steps-b (1000) steps like the demo's pretraining,
     exported to a Hugging Face dir, and quantized from that dir (`qforge quantize HF_DIR`).
PTQ: `qforge quantize` (128 calibration windows of the training text). QAT and GPTQ->QAT: --qat-steps
of `qforge train` under fake quant from the float model (the second with quant.init=gptq); their
reference is an FP control trained the same steps without fake quant, and its RTN.
Gap closed = (ppl_RTN - ppl_X) / (ppl_RTN - ppl_FP): PTQ columns against the FP model they
quantize; QAT columns against the FP control and its RTN (torchao's recovery).
Writes bench/results/ptq_quality.json and .md. Run: bench/ptq_quality.sh"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = os.path.join(ROOT, "build", "qforge")
FORMATS = [("q4_0", "q4_0", None), ("int4 g128", "int4-g128-asym", "int4-g64-asym"), ("int3 g128", "int3-g128-asym", "int3-g64-asym")]


def sh(*args):
    r = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, QFORGE_PROGRESS="0"))
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def ppl(run):
    out = sh(Q, "-q", "eval", run)
    return json.loads(out[out.index("{"):])["ppl"]


def quantize(src, method, preset, fallback, out, calib=None):
    args = [Q, "-q", "quantize", src, "--method", method, "--quant", preset, "--out", out, "--no-eval"]
    if fallback:
        args += ["--fallback", fallback]
    if calib:
        args += ["--calib", calib]
    t0 = time.time()
    sh(*args)
    with open(os.path.join(out, "ptq_summary.json")) as f:
        s = json.load(f)
    return {"ppl": ppl(out), "seconds": round(time.time() - t0, 1), "mean_err": s["mean_err"], "mean_err_rtn": s["mean_err_rtn"]}


def rules(preset, fallback, down):
    r = "{pattern: 'model.layers.*', weight: {preset: %s}}" % preset
    if fallback:
        r = "{pattern: '%s', weight: {preset: %s}}, " % (down, fallback) + r
    return "quant.rules=[%s]" % r


def model_rows(name, recipe, init, src, calib, workdir, steps, fallback_needed):
    common = [f"run.init_from={init}" if init else "run.init_from=", "trainer.eval_every=0", "trainer.save_every=0",
              "sample.prompts=[]", f"trainer.max_steps={steps}", "trainer.optim.lr=1.0e-4", "trainer.optim.weight_decay=0.0",
              "trainer.schedule.warmup_steps=10"]
    if not init:
        common.append(f"model.from={src}")
    res = {"model": name, "fp": ppl(src) if init else None, "formats": {}}
    ctrl = os.path.join(workdir, "fp_control")
    sh(Q, "-q", "train", recipe, f"run.out_dir={ctrl}", "quant.enabled=false", *common)
    res["fp_control"] = ppl(ctrl)
    for label, preset, fb in FORMATS:
        fb = fb if fallback_needed else None
        row = {"preset": preset, "fallback": fb}
        for m in ("rtn", "gptq", "awq"):
            row[m] = quantize(src, m, preset, fb, os.path.join(workdir, f"{m}_{preset}"), calib)
        row["rtn_control"] = quantize(ctrl, "rtn", preset, fb, os.path.join(workdir, f"rtnctrl_{preset}"))["ppl"]
        for tag, extra in (("qat", []), ("gptq_qat", ["quant.init=gptq"])):
            out = os.path.join(workdir, f"{tag}_{preset}")
            t0 = time.time()
            sh(Q, "-q", "train", recipe, f"run.out_dir={out}", rules(preset, fb, "model.layers.*.mlp.down_proj"),
               *common, *extra)
            row[tag] = {"ppl": ppl(os.path.join(out, "converted")), "seconds": round(time.time() - t0, 1)}
        res["formats"][label] = row
        print(f"[{name}] {label}: " + json.dumps(row), flush=True)
    return res


def closed(rtn, x, fp):
    return None if rtn <= fp else round(100.0 * (rtn - x) / (rtn - fp), 1)


def table(results, qat_steps):
    lines = ["| model | format | FP | RTN | GPTQ | AWQ | QAT | GPTQ->QAT | FP control | RTN of control |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        fp = r["fp"]
        for label, row in r["formats"].items():
            rtn, c, rc = row["rtn"]["ppl"], r["fp_control"], row["rtn_control"]
            g, a, qa, gq = row["gptq"]["ppl"], row["awq"]["ppl"], row["qat"]["ppl"], row["gptq_qat"]["ppl"]
            lines.append(f"| {r['model']} | {label}{' (+g64 down_proj)' if row['fallback'] else ''} | {fp:.3f} | {rtn:.3f} | "
                         f"{g:.3f} ({closed(rtn, g, fp)}%) | {a:.3f} ({closed(rtn, a, fp)}%) | {qa:.3f} ({closed(rc, qa, c)}%) | "
                         f"{gq:.3f} ({closed(rc, gq, c)}%) | {c:.3f} | {rc:.3f} |")
    lines.append("")
    lines.append(f"Held-out perplexity; (x%) = share of RTN's gap closed: PTQ columns against FP, QAT columns "
                 f"({qat_steps} steps) against the FP control trained the same steps and its RTN.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_ptq"))
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--steps-b", type=int, default=1000)
    ap.add_argument("--only", choices=["A", "B"])
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    results = []
    if a.only in (None, "A"):
        pre = os.path.join(ROOT, "runs", "demo", "pretrain")
        if not os.path.exists(os.path.join(pre, "checkpoints", "latest")):
            print("runs/demo/pretrain is missing: pretraining the embedded default first", flush=True)
            sh(Q, "-q", "train", f"run.out_dir={pre}")
        results.append(model_rows("A: demo (dim 256, ffn 704)", "configs/tiny_qat_q4_0.yaml", pre, pre, None,
                                  os.path.join(a.work, "A"), a.qat_steps, True))
    if a.only in (None, "B"):
        wb = os.path.join(a.work, "B")
        os.makedirs(wb, exist_ok=True)
        init = os.path.join(wb, "hf_init")
        if not os.path.exists(os.path.join(init, "config.json")):
            import torch
            import transformers
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                           tie_word_embeddings=False)
            transformers.LlamaForCausalLM(cfg).save_pretrained(init, safe_serialization=True)
        tok = os.path.join(ROOT, "runs", "tokenizers", "kjv_bpe4k.model")
        recipe = os.path.join(wb, "recipe.yaml")
        with open(recipe, "w") as f:
            f.write(f"# Run: {Q} train {recipe}  (written by bench/ptq_quality.py)\n"
                    f"base: {ROOT}/configs/tiny_pretrain.yaml\n"
                    f"run: {{name: hf_llama, out_dir: {wb}/fp}}\n"
                    f"tokenizer: {{path: {tok}, train: {{enabled: false}}}}\n"
                    f"model: {{from: {init}, family: llama, vocab_size: 4096, dim: 256, n_layers: 4, n_heads: 4, "
                    f"n_kv_heads: 2, ffn_dim: 768, max_seq_len: 256, tie_embeddings: false}}\n"
                    f"trainer: {{max_steps: {a.steps_b}, eval_every: 0, save_every: 0}}\n"
                    f"sample: {{prompts: []}}\n")
        if not os.path.exists(os.path.join(wb, "fp", "checkpoints", "latest")):
            sh(Q, "-q", "train", recipe)
        hf = os.path.join(wb, "hf")
        if not os.path.exists(os.path.join(hf, "config.json")):
            sh(Q, "-q", "export", os.path.join(wb, "fp"), "--format", "hf", "--dtype", "fp32", "--out", hf)
        r = model_rows("B: transformers Llama (dim 256, ffn 768)", recipe, None, hf, recipe, wb, a.qat_steps, False)
        r["fp"] = ppl(os.path.join(wb, "fp"))
        results.append(r)
    out = os.path.join(ROOT, "bench", "results")
    prev = {}
    if os.path.exists(os.path.join(out, "ptq_quality.json")):
        with open(os.path.join(out, "ptq_quality.json")) as f:
            prev = {r["model"]: r for r in json.load(f).get("results", [])}
    for r in results:
        prev[r["model"]] = r
    merged = sorted(prev.values(), key=lambda r: r["model"])
    with open(os.path.join(out, "ptq_quality.json"), "w") as f:
        json.dump({"command": "bench/ptq_quality.sh " + " ".join(sys.argv[1:]), "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"), "qat_steps": a.qat_steps,
                   "results": merged}, f, indent=2)
    md = table(merged, a.qat_steps)
    with open(os.path.join(out, "ptq_quality.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
