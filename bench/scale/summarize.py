#!/usr/bin/env python3
"""bench/scale.sh's analysis: fits, the result JSON and the plot. Standard library (+ matplotlib for
the PNG, from the bench-only venv; without it the JSON is written and the plot skipped).

    summarize.py fit RECORDS --impl qforge|peer --shape 1b [--budget-gib 16]   -> one JSON line
    summarize.py report RECORDS --out bench/results/scale.json [--ckpt-dir .cache/scale]

fit: over the qlora (and verify) records of one side and shape, peak RSS (GiB) against seq is fitted by
least squares as a + b*seq and as a + b*seq + c*seq^2. The quadratic model is used when it has c > 0
and its seq^2 term is > 5% of the peak at the longest measured seq (attention materialised), else
the linear one. The peak used is the high-water mark through step 2 (runs have 2-4 steps and RSS
creeps up over the first ones), the same for every point and side. seq_max = the largest multiple of 256 with predicted peak <= budget. The step time
(median of steps after the first, per run; medians over reps) is fitted the same way (quadratic when
c > 0: attention's cost) and evaluated at seq_max. A fit needs 2 distinct seqs (3 for quadratic).
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys

GIB = 1024.0


def load(path):
    out = []
    for line in open(path):
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def ok(r):
    x = r["raw"]
    return not x.get("error") and not x.get("killed_over_cap") and x.get("step_peak_rss_mib") is not None


def solve(A, y):
    """Least squares via the normal equations (tiny systems)."""
    n = len(A[0])
    M = [[sum(A[k][i] * A[k][j] for k in range(len(A))) for j in range(n)] for i in range(n)]
    v = [sum(A[k][i] * y[k] for k in range(len(A))) for i in range(n)]
    for i in range(n):  # Gauss-Jordan
        p = max(range(i, n), key=lambda r: abs(M[r][i]))
        M[i], M[p], v[i], v[p] = M[p], M[i], v[p], v[i]
        if abs(M[i][i]) < 1e-30:
            return None
        for r in range(n):
            if r != i:
                f = M[r][i] / M[i][i]
                M[r] = [a - f * b for a, b in zip(M[r], M[i])]
                v[r] -= f * v[i]
    return [v[i] / M[i][i] for i in range(n)]


def fit_curve(pts):
    """pts: [(seq, y)] -> dict(model, coef, lin, quad)."""
    xs = sorted({s for s, _ in pts})
    if len(xs) < 2:
        return None
    sc = 1e-3  # seq in thousands for conditioning
    lin = solve([[1.0, s * sc] for s, _ in pts], [y for _, y in pts])
    quad = solve([[1.0, s * sc, (s * sc) ** 2] for s, _ in pts], [y for _, y in pts]) if len(xs) >= 3 else None
    smax = xs[-1] * sc
    use_quad = False
    if quad is not None and quad[2] > 0:
        peak = quad[0] + quad[1] * smax + quad[2] * smax ** 2
        use_quad = quad[2] * smax ** 2 > 0.05 * abs(peak)
    coef = quad if use_quad else lin
    return {"model": "a + b*k + c*k^2" if use_quad else "a + b*k", "k": "seq / 1000",
            "coef": coef, "linear": lin, "quadratic": quad}


def evaluate(f, seq):
    k = seq * 1e-3
    c = f["coef"]
    return c[0] + c[1] * k + (c[2] * k * k if len(c) > 2 else 0.0)


def seq_for(f, budget):
    c = f["coef"]
    a, b = c[0] - budget, c[1]
    q = c[2] if len(c) > 2 else 0.0
    if q > 0:
        k = (-b + math.sqrt(b * b - 4 * q * a)) / (2 * q) if b * b - 4 * q * a >= 0 else None
    else:
        k = -a / b if b > 0 else None
    if k is None or k <= 0:
        return None
    return int(k * 1000) // 256 * 256


def peak_through(x, step=2):
    """The high-water mark after `step` steps (runs differ in step count; RSS creeps up over the first
    steps), else the run's step peak."""
    h = x.get("step_hwm_mib") or {}
    for k in range(step, 0, -1):
        if str(k) in h or k in h:
            return h.get(str(k), h.get(k))
    return x.get("step_peak_rss_mib")


def points(recs, impl, shape, parts=("qlora", "verify")):
    by = {}
    for r in recs:
        if r["impl"] == impl and r["shape"] == shape and r["part"] in parts and ok(r):
            by.setdefault(r["seq"], []).append(r)
    mem = [(s, statistics.median(peak_through(x["raw"]) for x in rs) / GIB) for s, rs in sorted(by.items())]
    tim = []
    for s, rs in sorted(by.items()):
        ts = [x["raw"]["step_s_median"] for x in rs if x["raw"].get("step_s_median")]
        if ts:
            tim.append((s, statistics.median(ts)))
    return mem, tim


def do_fit(recs, impl, shape, budget):
    mem, tim = points(recs, impl, shape)
    fm = fit_curve(mem)
    if fm is None:
        return {"impl": impl, "error": f"need 2 measured seqs, have {[s for s, _ in mem]}"}
    smax = seq_for(fm, budget)
    ft = fit_curve(tim) if len(tim) >= 2 else None
    return {"impl": impl, "shape": shape, "budget_gib": budget, "points_gib": mem, "memory_fit": fm,
            "seq_max": smax, "peak_gib_at_seq_max": evaluate(fm, smax) if smax else None,
            "time_points_s": tim, "time_fit": ft,
            "step_s_at_seq_max": evaluate(ft, smax) if (ft and smax) else None}


def machine():
    def sh(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True).stdout.strip()
        except OSError:
            return None
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    return {"host": platform.node(), "cpu_model": cpu, "cpus": os.cpu_count(), "mem_total_gib": mem / 2**20,
            "cpu_bf16": [f for f in flags if f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2")],
            "kernel": platform.release(), "loadavg_at_report": os.getloadavg(),
            "git_commit": sh("git", "rev-parse", "HEAD"),
            "git_tracked_files_modified": len([l for l in (sh("git", "status", "--porcelain", "-uno") or "").splitlines() if l]),
            "qforge_binary": qforge_binary()}


def qforge_binary():
    import hashlib
    import time as _t
    p = os.environ.get("QFORGE", "build/qforge")
    try:
        st = os.stat(p)
    except OSError:
        return None
    h = hashlib.sha256(open(p, "rb").read()).hexdigest()[:16]
    return {"path": p, "mtime_utc": _t.strftime("%Y-%m-%dT%H:%M:%SZ", _t.gmtime(st.st_mtime)), "sha256_16": h}


def report(recs, out_path, ckpt_dir):
    E = os.environ
    shape, shape8 = E.get("SHAPE", "1b"), E.get("SHAPE8", "8b")
    budget = float(E.get("BUDGET_GIB", 16))
    res = {"qlora": {}, "fit": {}, "8b": {}, "qat": {}}
    for r in recs:
        x = r["raw"]
        if r["part"] == "qlora":
            d = res["qlora"].setdefault(r["impl"], {}).setdefault(str(r["seq"]), {"runs": []})
            d["runs"].append({k: x.get(k) for k in ("load_peak_rss_mib", "step_peak_rss_mib", "process_peak_rss_mib",
                                                    "peak_rss_anon_mib", "load_peak_rss_anon_mib",
                                                    "step_s_median", "step_s", "loadavg_1m", "killed_over_cap", "rc")}
                             | {"part": r["part"], "rep": r["rep"], "peak_through_step2_mib": peak_through(x)})
    for impl, bys in res["qlora"].items():
        for s, d in bys.items():
            good = [u for u in d["runs"] if u.get("step_peak_rss_mib") and not u.get("killed_over_cap")]
            ts = [u["step_s_median"] for u in good if u.get("step_s_median")]
            d["step_peak_rss_mib"] = statistics.median(u["step_peak_rss_mib"] for u in good) if good else None
            d["load_peak_rss_mib"] = statistics.median(u["load_peak_rss_mib"] for u in good
                                                       if u.get("load_peak_rss_mib")) if good else None
            d["step_s_median"] = statistics.median(ts) if ts else None
            d["tokens_per_s"] = int(s) / d["step_s_median"] if d["step_s_median"] else None
            d["killed_over_cap"] = any(u.get("killed_over_cap") for u in d["runs"])
    for impl in {r["impl"] for r in recs if r["part"] in ("qlora", "verify")}:
        res["fit"][impl] = do_fit(recs, impl, shape, budget)
        v = [r for r in recs if r["part"] == "verify" and r["impl"] == impl]
        if v:
            x = v[-1]["raw"]
            res["fit"][impl]["verified"] = {"seq": v[-1]["seq"], "step_peak_rss_mib": x.get("step_peak_rss_mib"),
                                            "peak_through_step2_mib": peak_through(x) if ok(v[-1]) else None,
                                            "step_s": x.get("step_s"),
                                            "within_budget": (x.get("step_peak_rss_mib") or 1e30) <= budget * GIB,
                                            "killed_over_cap": x.get("killed_over_cap")}
        else:
            res["fit"][impl]["verified"] = None
    for r in recs:
        x = r["raw"]
        keep = {k: x.get(k) for k in ("load_peak_rss_mib", "step_peak_rss_mib", "process_peak_rss_mib", "step_s",
                                      "peak_rss_anon_mib", "load_peak_rss_anon_mib", "rss_file_after_load_mib",
                                      "loadavg_1m", "killed_over_cap", "rss_mib_at_kill", "rc", "load_s",
                                      "model_footprint_bytes")}
        if r["part"] == "8b":
            res["8b"][r["impl"]] = keep | {"seq": r["seq"], "train_summary": r.get("train_summary")}
        elif r["part"] == "qat":
            res["qat"][r.get("variant") or "adamw"] = keep | {"seq": r["seq"], "train_summary": r.get("train_summary")}
    ratios = {}
    q = res["qlora"]
    for s in sorted({s for d in q.values() for s in d}, key=int):
        a, b = q.get("qforge", {}).get(s), q.get("peer", {}).get(s)
        if a and b and a.get("step_peak_rss_mib") and b.get("step_peak_rss_mib"):
            ratios[f"qforge_over_peer_step_peak_rss/seq{s}"] = a["step_peak_rss_mib"] / b["step_peak_rss_mib"]
            if a.get("step_s_median") and b.get("step_s_median"):
                ratios[f"qforge_over_peer_step_s/seq{s}"] = a["step_s_median"] / b["step_s_median"]
    fq, fp = res["fit"].get("qforge", {}), res["fit"].get("peer", {})
    if fq.get("seq_max") and fp.get("seq_max"):
        ratios["qforge_over_peer_seq_max_within_budget"] = fq["seq_max"] / fp["seq_max"]
    if res["8b"].get("qforge", {}).get("step_peak_rss_mib"):
        ratios["qforge_8b_step_peak_gib"] = res["8b"]["qforge"]["step_peak_rss_mib"] / GIB
    qa, q8 = res["qat"].get("adamw", {}), res["qat"].get("adamw8bit", {})
    if qa.get("step_peak_rss_mib") and q8.get("step_peak_rss_mib"):
        ratios["qat_adamw8bit_over_adamw_step_peak_rss"] = q8["step_peak_rss_mib"] / qa["step_peak_rss_mib"]
    ckpts = {}
    for r in recs:
        ck = (r.get("raw") or {}).get("ckpt") or next((w.split("=", 1)[1] for w in (r.get("command") or "").split()
                                                        if w.startswith("model.from=")), None)
        p = os.path.join(ck, "make_ckpt.json") if ck else ""
        if p and os.path.exists(p) and os.path.basename(ck) not in ckpts:
            ckpts[os.path.basename(ck)] = json.load(open(p))
    versions = next((r["raw"].get("versions") for r in recs if r["impl"] == "peer" and r["raw"].get("versions")), None)
    out = {
        "bench": "scale", "issue": 19, "started_utc": E.get("T_START"), "command": E.get("CMDLINE", "bench/scale.sh"),
        "smoke": E.get("SMOKE") == "1", "machine": machine(),
        "settings": {k: E.get(k) for k in ("PARTS", "SIDES", "SEQS", "FIT_SEQS", "REPS", "REPS_LONG", "LONG_SEQ", "STEPS",
                                           "STEPS_LONG", "STEPS_8B", "BUDGET_GIB", "VERIFY", "VERIFY_MAX_S", "QAT_SEQ",
                                           "QAT_STEPS", "NEW_KEYS", "THREADS", "RSS_CAP_MIB")},
        "qforge_memory_keys": (E.get("MEM_KEYS_STR") or "").split(),
        "qforge_keys_left_out": (E.get("KEYS_LEFT_OUT_STR") or "").split(),
        "qforge_adamw8bit_key": E.get("OPT8_STR") or None,
        "checkpoints": ckpts, "peer_versions": versions,
        "what": {
            "qlora": "QLoRA r16/alpha32 on q,k,v,o,gate,up,down; NF4 blocksize 64 + double quant; bf16 model and "
                     "compute; batch 1; AdamW on the LoRA params; activation checkpointing on both sides (peer: "
                     "transformers' gradient_checkpointing_enable, use_reentrant=True). step_peak_rss_mib = the "
                     "process high-water mark at the end of the steps; step_s_median = median of steps 2..N, "
                     "median over reps; load_peak_rss_mib = high-water mark after load + quantize + LoRA wrap.",
            "fit": f"peak RSS vs seq, longest seq within {budget} GiB (see bench/scale/summarize.py)",
            "8b": "8B shape: load peak and the peak through STEPS_8B QLoRA step(s) at seq SEQ8",
            "qat": "1B shape full-parameter QAT (int4-g32 decoder linears, fp32 master weights, bf16 autocast): "
                   "peak with AdamW (fp32 state) vs 8-bit AdamW"},
        "results": res, "ratios": ratios, "records": recs,
    }
    png = os.path.splitext(out_path)[0] + ".png"
    out["plot"] = plot(res, budget, png, shape)
    with open(out_path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(out_path + ".tmp", out_path)
    print(json.dumps({"out": out_path, "plot": out["plot"], "ratios": ratios,
                      "seq_max": {k: v.get("seq_max") for k, v in res["fit"].items()}}, indent=1))


def plot(res, budget, png, shape):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"qforge": "tab:blue", "peer": "tab:orange"}
    labels = {"qforge": "qforge", "peer": "transformers + PEFT + bitsandbytes"}
    xmax = 0
    for impl, bys in res["qlora"].items():
        pts = sorted((int(s), d["step_peak_rss_mib"] / GIB) for s, d in bys.items() if d.get("step_peak_rss_mib"))
        if not pts:
            continue
        xmax = max(xmax, max(s for s, _ in pts))
        ax.plot([s for s, _ in pts], [y for _, y in pts], "o", color=colors.get(impl), label=f"{labels.get(impl, impl)} (measured)")
        f = res["fit"].get(impl, {})
        if f.get("memory_fit"):
            end = max(xmax, f.get("seq_max") or 0) * 1.15
            start = min(s for s, _ in pts) / 1.15
            xs = [start * (end / start) ** (i / 200) for i in range(201)]
            ax.plot(xs, [evaluate(f["memory_fit"], x) for x in xs], "-", color=colors.get(impl), alpha=0.5,
                    label=f"{impl} fit, max seq {f.get('seq_max')}")
            xmax = max(xmax, end)
            v = f.get("verified")
            if v and v.get("step_peak_rss_mib"):
                ax.plot([v["seq"]], [v["step_peak_rss_mib"] / GIB], "s", mfc="none", color=colors.get(impl),
                        label=f"{impl} verified at {v['seq']}")
    ax.axhline(budget, color="gray", ls="--", lw=1, label=f"{budget:g} GiB budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("peak RSS (GiB)")
    name = {"1b": "Llama-3.2-1B", "8b": "Llama-3.1-8B"}.get(shape, shape)
    ax.set_title(f"QLoRA r16 of the {name} shape on CPU (NF4, bf16, checkpointing): peak RSS vs seq", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    return png


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["fit", "report"])
    ap.add_argument("records")
    ap.add_argument("--impl")
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--budget-gib", type=float, default=16)
    ap.add_argument("--out")
    ap.add_argument("--ckpt-dir", default=".cache/scale")
    a = ap.parse_args()
    recs = load(a.records)
    if a.cmd == "fit":
        f = do_fit(recs, a.impl, a.shape, a.budget_gib)
        print(json.dumps({k: f.get(k) for k in ("seq_max", "peak_gib_at_seq_max", "step_s_at_seq_max", "error")}
                         | {"model": (f.get("memory_fit") or {}).get("model")}))
        sys.exit(0 if f.get("seq_max") else 1)
    report(recs, a.out, a.ckpt_dir)


if __name__ == "__main__":
    main()
