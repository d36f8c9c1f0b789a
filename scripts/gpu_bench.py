#!/usr/bin/env python3
"""The Python side of scripts/gpu_check.sh (runs on the GPU machine's python3: torch 2.11.0+cu130,
transformers, peft; bitsandbytes carried in gpu_carry/py). Subcommands:

  env                      GPU name, driver, torch / CUDA / transformers / peft / bitsandbytes versions
  losses A B [--tol T]     two qforge metrics.jsonl (same steps): per-step losses, max |a-b|/|b|;
                           exit 1 when over T (the CPU-vs-CUDA fp32 check) or when a loss is not finite
  summary RUN [RUN ...]    figures of qforge runs: train_summary.json keys (memory, tokens/s, losses)
  bandwidth                device-to-device copy GB/s (bytes read + written, median of CUDA-event
                           timings over rotating buffers) and bitsandbytes dequantize_4bit NF4 GB/s
                           (packed bytes + absmax read, bf16 written) as the peer's kernel figure
  peer CKPT --seq S --batch B --steps N
                           transformers + PEFT + bitsandbytes QLoRA on CUDA as bench/scale/peer.py does it
                           on the CPU (NF4 + double quant, bf16 compute, r16/alpha 32 on the 7 decoder
                           linears, gradient checkpointing, AdamW lr 2e-4): median step s over steps 2..N,
                           tokens/s, torch.cuda.max_memory_allocated / reserved
  clock --metrics M [--gpu] [--tokens-per-step N] -- CMD...
                           runs CMD (a qforge train with trainer.log_every=1), step times from when each
                           metrics line appears (median over steps >= 2), GPU used-memory high-water mark
                           (NVML / nvidia-smi, CUDA context included)
  assemble RECORDS OUT     gpu_check.sh's stage records (JSON lines) -> gpu_results.json, prints a table

Every subcommand prints one JSON object on stdout (assemble: the table) and nothing else there.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time


def out(obj):
    print(json.dumps(obj))


def cmd_env(a):
    import torch
    r = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
         "python": sys.version.split()[0]}
    for mod in ("transformers", "peft", "bitsandbytes"):
        try:
            r[mod] = __import__(mod).__version__
        except Exception as e:  # recorded, not fatal: the stage that needs it fails on its own
            r[mod] = f"import failed: {type(e).__name__}: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        r.update(gpu=p.name, gpu_mem_gib=p.total_memory / 2**30, sm_count=p.multi_processor_count,
                 capability=f"{p.major}.{p.minor}")
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        r["nvidia_smi"] = q.stdout.strip()
        r["driver"] = q.stdout.split(",")[1].strip() if q.returncode == 0 and "," in q.stdout else None
    except (OSError, subprocess.TimeoutExpired) as e:
        r["nvidia_smi"] = f"failed: {e}"
    out(r)


def read_losses(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r and "step" in r}


def cmd_losses(a):
    la, lb = read_losses(a.a), read_losses(a.b)
    steps = sorted(set(la) & set(lb))
    if not steps:
        out({"error": f"no common steps in {a.a} and {a.b}"}); sys.exit(1)
    rel = [abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-12) for s in steps]
    finite = all(math.isfinite(la[s]) and math.isfinite(lb[s]) for s in steps)
    r = {"steps": len(steps), "loss_a": [la[s] for s in steps], "loss_b": [lb[s] for s in steps],
         "max_rel_diff": max(rel), "final_rel_diff": rel[-1], "tolerance": a.tol, "finite": finite,
         "a": a.a, "b": a.b}
    r["pass"] = finite and r["max_rel_diff"] <= a.tol
    out(r)
    sys.exit(0 if r["pass"] else 1)


def cmd_summary(a):
    r = {}
    for run in a.runs:
        p = os.path.join(run, "train_summary.json")
        try:
            s = json.load(open(p))
        except (OSError, ValueError) as e:
            r[run] = {"error": f"{p}: {e}"}
            continue
        keep = {k: v for k, v in s.items() if not isinstance(v, (dict, list)) and
                any(t in k for t in ("bytes", "tokens_per_s", "loss", "steps", "cuda", "gpu", "device"))}
        r[os.path.basename(run.rstrip("/"))] = keep
    out(r)


def timed_median_ms(fn, reps):
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); fn(); e1.record(); e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    return statistics.median(ts)


def cmd_bandwidth(a):
    import torch
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n = a.copy_mib * 2**20 // 4
    bufs = [torch.rand(n, device=dev, generator=g) for _ in range(3)]
    dsts = [torch.empty_like(b) for b in bufs]
    i = [0]

    def copy():
        k = i[0] % 3; i[0] += 1
        dsts[k].copy_(bufs[k])
    ms = timed_median_ms(copy, a.reps)
    r = {"copy_bytes_per_iter": 2 * n * 4, "copy_ms_median": ms, "copy_gb_s": 2 * n * 4 / ms / 1e6}
    del bufs, dsts
    try:
        import bitsandbytes.functional as F
        rows, cols = a.nf4_rows, a.nf4_cols
        ws = [torch.randn(rows, cols, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)]
        qs = [F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False) for w in ws]
        j = [0]

        def deq():
            k = j[0] % 3; j[0] += 1
            F.dequantize_4bit(qs[k][0], qs[k][1])
        ms = timed_median_ms(deq, a.reps)
        moved = rows * cols // 2 + (rows * cols // 64) * 4 + rows * cols * 2
        ref = ws[0]
        err = (F.dequantize_4bit(qs[0][0], qs[0][1]).float() - ref.float()).norm() / ref.float().norm()
        r.update(bnb_nf4_dequant_shape=[rows, cols], bnb_nf4_dequant_ms=ms, bnb_nf4_dequant_bytes=moved,
                 bnb_nf4_dequant_gb_s=moved / ms / 1e6, bnb_nf4_dequant_over_copy=moved / ms / 1e6 / r["copy_gb_s"],
                 bnb_nf4_rel_err_vs_bf16=float(err), bitsandbytes=__import__("bitsandbytes").__version__)
    except Exception as e:  # the copy figure still stands
        r["bnb_error"] = f"{type(e).__name__}: {e}"
    out(r)


def cmd_peer(a):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model
    t0 = time.perf_counter()
    torch.manual_seed(1234)
    dev = torch.device("cuda")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    kw = dict(quantization_config=q, device_map={"": 0}, attn_implementation="sdpa")
    dkey = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kw[dkey] = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, **kw)
    model.config.use_cache = False
    if not a.no_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lin = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             task_type="CAUSAL_LM", target_modules=lin))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    g = torch.Generator(device=dev).manual_seed(0)
    steps, losses = [], []
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), device=dev, generator=g)
        torch.cuda.synchronize()
        s0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - s0)
        losses.append(float(loss))
    st = statistics.median(steps[1:] if len(steps) > 1 else steps)
    out({"impl": "transformers+peft+bitsandbytes", "ckpt": a.ckpt, "seq": a.seq, "batch": a.batch,
         "checkpointing": not a.no_checkpointing, "step_s": steps, "step_s_median": st,
         "tokens_per_s": a.batch * a.seq / st, "losses": losses, "load_s": load_s,
         "load_peak_alloc_gib": load_peak / 2**30,
         "step_peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
         "step_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
         "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": __import__("peft").__version__, "bitsandbytes": __import__("bitsandbytes").__version__}})


def gpu_used_bytes():
    """Device memory in use on GPU 0 (all processes, CUDA contexts included): NVML, else nvidia-smi."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
    except Exception:
        q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=10)
        return int(q.stdout.split()[0]) * 2**20 if q.returncode == 0 and q.stdout.strip() else None


def cmd_clock(a):
    """Run CMD; timestamp each optimizer step when its metrics line appears (trainer.log_every=1) and
    keep the high-water mark of the GPU's used memory (sampled every --poll s) while it runs."""
    base = gpu_used_bytes() if a.gpu else None
    t0 = time.perf_counter()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    p = subprocess.Popen(cmd, stdout=sys.stderr)
    seen, step_t, peak = 0, {}, base
    while True:
        done = p.poll() is not None
        try:
            with open(a.metrics) as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        now = time.perf_counter() - t0
        for l in lines[seen:]:
            try:
                step_t[int(json.loads(l)["step"])] = now
            except (ValueError, KeyError):
                pass
        seen = len(lines)
        if a.gpu:
            u = gpu_used_bytes()
            if u is not None:
                peak = max(peak or 0, u)
        if done:
            break
        time.sleep(a.poll)
    ks = sorted(step_t)
    dts = [step_t[k] - step_t[k - 1] for k in ks if k - 1 in step_t and k > 1]
    r = {"rc": p.returncode, "wall_s": time.perf_counter() - t0, "steps_seen": len(ks),
         "step_s": dts, "step_s_median": statistics.median(dts) if dts else None, "poll_s": a.poll}
    if a.gpu:
        r.update(gpu_used_before_gib=(base or 0) / 2**30, gpu_used_peak_gib=(peak or 0) / 2**30)
    if a.tokens_per_step and r["step_s_median"]:
        r["tokens_per_s"] = a.tokens_per_step / r["step_s_median"]
    out(r)
    sys.exit(p.returncode)


def cmd_assemble(a):
    recs = [json.loads(l) for l in open(a.records) if l.strip()]
    env = next((r.get("figures") for r in recs if r["stage"] == "env" and isinstance(r.get("figures"), dict)), {})
    res = {"script": "scripts/gpu_check.sh", "env": env, "started_utc": os.environ.get("GPU_CHECK_START"),
           "budget_s": float(os.environ.get("GPU_CHECK_BUDGET", "0") or 0),
           "commit": os.environ.get("GPU_CHECK_COMMIT"), "binaries": os.environ.get("GPU_CHECK_BINARIES"),
           "stages": recs}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    w = max([len(r["stage"]) for r in recs] + [5])
    print(f"{'stage':<{w}}  {'status':<8} {'rc':>4} {'s':>7}  note")
    for r in recs:
        print(f"{r['stage']:<{w}}  {r['status']:<8} {str(r.get('rc')):>4} {r.get('seconds', 0):7.1f}  {r.get('note', '')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="sub", required=True)
    sub.add_parser("env")
    p = sub.add_parser("losses"); p.add_argument("a"); p.add_argument("b"); p.add_argument("--tol", type=float, default=1e-3)
    p = sub.add_parser("summary"); p.add_argument("runs", nargs="+")
    p = sub.add_parser("bandwidth"); p.add_argument("--copy-mib", type=int, default=1024); p.add_argument("--reps", type=int, default=20)
    p.add_argument("--nf4-rows", type=int, default=8192); p.add_argument("--nf4-cols", type=int, default=8192)
    p = sub.add_parser("peer"); p.add_argument("ckpt"); p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2); p.add_argument("--steps", type=int, default=6)
    p.add_argument("--no-checkpointing", action="store_true")
    p = sub.add_parser("clock"); p.add_argument("--metrics", required=True); p.add_argument("--poll", type=float, default=0.05)
    p.add_argument("--gpu", action="store_true"); p.add_argument("--tokens-per-step", type=int, default=0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("assemble"); p.add_argument("records"); p.add_argument("out")
    a = ap.parse_args()
    globals()["cmd_" + a.sub](a)


if __name__ == "__main__":
    main()
