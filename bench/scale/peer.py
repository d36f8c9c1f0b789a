#!/usr/bin/env python3
"""The peer side of bench/scale.sh: one QLoRA measurement of transformers + PEFT + bitsandbytes on CPU.

    peer.py CKPT_DIR --seq S [--steps N] [--threads 2] [--load-only] [--upcast-fp32]

One configuration per process, so getrusage's ru_maxrss is that configuration's peak. What it runs
is the usual QLoRA recipe as its users write it, on the CPU:
  model = AutoModelForCausalLM.from_pretrained(CKPT, quantization_config=BitsAndBytesConfig(
              load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
              bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16, device_map="cpu",
              attn_implementation="sdpa")
  model.config.use_cache = False
  model.gradient_checkpointing_enable()          # transformers' default kwargs: use_reentrant=True
  model.enable_input_require_grads()             # reentrant checkpointing with a frozen embedding
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
              task_type="CAUSAL_LM", target_modules=[q,k,v,o,gate,up,down]_proj))
  opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0)   # torch's default (for-loop on CPU)
  per step: ids = random ids < the tokenizer's vocab, batch 1 x S; out = model(input_ids=ids,
            labels=ids) (transformers shifts the labels; its loss upcasts the bf16 logits to fp32);
            out.loss.backward(); clip_grad_norm_(trainable, 1.0); opt.step(); opt.zero_grad(set_to_none)
`prepare_model_for_kbit_training` is not called by default: besides the gradient checkpointing and
input grads above, it casts every non-4-bit bf16 parameter (embedding, norms, an untied lm_head) to
fp32, which would cost the peer 2 more bytes per embedding weight (1b: +0.5 GB; 8b: +2.1 GB) that
qforge (bf16 model) does not spend. --upcast-fp32 calls it instead (use_gradient_checkpointing=True).
PEFT keeps the LoRA A/B in fp32 (autocast_adapter_dtype) over the bf16 base.

Reported (one JSON object on stdout): load_peak_rss_mib (ru_maxrss right after get_peft_model and
the optimizer's construction: load + quantize + wrap), step_peak_rss_mib (ru_maxrss at the end =
the whole process' peak; ru_maxrss and VmRSS count the memory-mapped checkpoint's resident pages
too, so peak_rss_anon_mib, the polled peak of RssAnon, is reported beside them), per-step seconds (time.perf_counter around the whole step),
step_s_median over the steps after the first, losses, parameter counts, the NF4 model's bytes
(get_memory_footprint), versions and threads (torch.set_num_threads, default 2), the 1-min load
average at start and end (the machine is shared), and the process' user+sys CPU over the loop.
"""
import argparse
import json
import logging
import math
import os
import resource
import sys
import time

T0 = time.perf_counter()
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def status_mib(key, pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


ANON_PEAK = {"mib": 0.0}


def start_rss_guard(cap_mib, seq):
    """Tracks the peak anonymous RSS (RssAnon: what cannot be reclaimed; VmRSS also counts the
    memory-mapped checkpoint's pages) and, with a cap, exits before the kernel's OOM killer picks a
    process of someone else on this shared machine."""
    import threading

    def watch():
        while True:
            r = status_mib("RssAnon")
            ANON_PEAK["mib"] = max(ANON_PEAK["mib"], r)
            if cap_mib > 0 and r > cap_mib:
                print(json.dumps({"impl": "transformers+peft+bitsandbytes (CPU)", "seq_len": seq,
                                  "killed_over_cap": True, "cap_mib": cap_mib, "rss_anon_mib_at_kill": r,
                                  "vm_hwm_mib_at_kill": status_mib("VmHWM"),
                                  "step_peak_rss_mib": None, "load_peak_rss_mib": None}), flush=True)
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--load-only", action="store_true", help="stop after loading (load peak only)")
    ap.add_argument("--upcast-fp32", action="store_true", help="prepare_model_for_kbit_training (see docstring)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--kill-above-mib", type=float, default=0,
                    help="exit with code 3 (JSON with killed_over_cap) when RssAnon passes this; 0 = no cap")
    a = ap.parse_args()
    start_rss_guard(a.kill_above_mib, a.seq)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    load_avg0 = os.getloadavg()[0]

    import bitsandbytes as bnb
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    transformers.logging.set_verbosity_error()
    rss_libs = rss_mib()
    tl = time.perf_counter()
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, quantization_config=bnb_cfg, dtype=torch.bfloat16,
                                                 device_map="cpu", attn_implementation="sdpa")
    t_from_pretrained = time.perf_counter() - tl
    rss_after_from_pretrained = rss_mib()
    maxrss_after_from_pretrained = maxrss_mib()
    model.config.use_cache = False
    n4 = sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert n4 == 7 * model.config.num_hidden_layers, f"{n4} Linear4bit modules"
    footprint = model.get_memory_footprint()
    gc = not a.no_checkpointing
    if a.upcast_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    elif gc:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    gc_kwargs = None
    for m in model.modules():  # the partial(checkpoint, **kwargs) transformers installed on each layer
        f = getattr(m, "_gradient_checkpointing_func", None)
        if f is not None:
            gc_kwargs = dict(getattr(f, "keywords", {}) or {})
            break
    lcfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(LINEARS))
    model = get_peft_model(model, lcfg)
    n_lora = sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.bnb.Linear4bit))
    assert n_lora == n4, f"{n_lora} bnb LoRA layers for {n4} Linear4bit"
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    lora_dtypes = sorted({str(p.dtype) for p in trainable})
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    load_s = time.perf_counter() - tl
    load_peak = maxrss_mib()
    load_peak_anon = ANON_PEAK["mib"]
    load_rss_file = status_mib("RssFile")
    rss_after_load = rss_mib()
    base = model.get_base_model()
    is_gc = bool(getattr(base, "is_gradient_checkpointing", False))
    embed_dtype = str(base.get_input_embeddings().weight.dtype)
    print(f"[peer] loaded in {load_s:.1f}s, peak {load_peak:.0f} MiB, {n4} Linear4bit, trainable {n_trainable:,d}, "
          f"checkpointing {is_gc} {gc_kwargs}", file=sys.stderr, flush=True)

    tok_vocab = None
    tj = os.path.join(a.ckpt, "tokenizer.json")
    if os.path.exists(tj):
        with open(tj) as f:
            j = json.load(f)
        tok_vocab = len(j["model"]["vocab"]) + len(j.get("added_tokens", []))
    id_hi = min(tok_vocab or model.config.vocab_size, model.config.vocab_size)

    steps, losses, maxrss_steps = [], [], []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    tloop = time.perf_counter()
    for s in range(0 if a.load_only else a.steps):
        ts = time.perf_counter()
        ids = torch.randint(0, id_hi, (a.batch, a.seq))
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        v = loss.item()
        if not math.isfinite(v):
            raise SystemExit(f"non-finite loss at step {s + 1}")
        loss.backward()
        del out, loss
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - ts)
        losses.append(v)
        maxrss_steps.append(maxrss_mib())
        print(f"[peer] step {s + 1}: {steps[-1]:.2f}s loss {v:.4f} maxrss {maxrss_mib():.0f} MiB",
              file=sys.stderr, flush=True)
    loop_s = time.perf_counter() - tloop
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    after = steps[1:] if len(steps) > 1 else steps
    after_sorted = sorted(after)
    med = (after_sorted[len(after) // 2] if len(after) % 2 else
           0.5 * (after_sorted[len(after) // 2 - 1] + after_sorted[len(after) // 2])) if after else None
    out = {
        "impl": "transformers+peft+bitsandbytes (CPU)",
        "ckpt": os.path.abspath(a.ckpt),
        "seq_len": a.seq, "batch": a.batch, "steps": len(steps), "threads": torch.get_num_threads(),
        "gradient_checkpointing": is_gc, "gradient_checkpointing_kwargs": gc_kwargs,
        "upcast_fp32": a.upcast_fp32, "embed_dtype": embed_dtype, "lora_dtypes": lora_dtypes,
        "nf4": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "linear4bit_modules": n4},
        "lora": {"r": a.r, "alpha": a.alpha, "dropout": 0.0, "target_modules": LINEARS},
        "trainable_params": n_trainable,
        "model_footprint_bytes": footprint,
        "rss_libraries_mib": rss_libs,
        "rss_after_from_pretrained_mib": rss_after_from_pretrained,
        "maxrss_after_from_pretrained_mib": maxrss_after_from_pretrained,
        "rss_after_load_mib": rss_after_load,
        "load_peak_rss_mib": load_peak,
        "load_peak_rss_anon_mib": load_peak_anon,  # polled every 10 ms
        "rss_file_after_load_mib": load_rss_file,  # mapped checkpoint pages still resident
        "peak_rss_anon_mib": ANON_PEAK["mib"],
        "step_peak_rss_mib": maxrss_mib() if steps else None,
        "from_pretrained_s": t_from_pretrained,
        "load_s": load_s,
        "step_hwm_mib": {str(i + 1): m for i, m in enumerate(maxrss_steps)},  # ru_maxrss after each step
        "step_s": [round(x, 4) for x in steps],
        "step_s_median": med,
        "tokens_per_s": (a.batch * a.seq / med) if med else None,
        "losses": losses,
        "loop_s": loop_s,
        "loop_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "loadavg_1m": [load_avg0, os.getloadavg()[0]],
        "process_s": time.perf_counter() - T0,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bnb.__version__},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
