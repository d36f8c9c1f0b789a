#!/usr/bin/env python3
"""Python peer for qforge's QLoRA benchmark: HF transformers + PEFT (+ bitsandbytes) training steps on CPU.

Model: transformers `LlamaForCausalLM`, shape from the command line; defaults = qforge's demo model
(configs/tiny_pretrain.yaml: vocab 4096, hidden 256, 4 layers, 8 heads, 4 kv heads, intermediate 704,
max_position 256, rope_theta 1e4, rms_norm_eps 1e-5, tied embeddings), attn_implementation "sdpa",
fp32, initialised from --seed (HF init, N(0, --init-std)). No pretrained weights: throughput and
memory do not depend on the values. use_cache is off (no KV cache is built during training).

--mode (the "decoder linears" are the 7 projections of every model.layers.*: q/k/v/o_proj and
gate/up/down_proj; embeddings, norms and the tied lm_head stay fp32 and frozen in the adapter modes):
  qlora      every decoder linear replaced by bitsandbytes.nn.Linear4bit holding the NF4-quantized
             original fp32 weight (quant_type nf4, blocksize 64, double quant = compress_statistics,
             compute_dtype fp32: forward dequantizes to fp32 and runs F.linear; bnb's MatMul4Bit
             re-dequantizes in backward for the input gradient). Then PEFT get_peft_model with
             LoraConfig(r, lora_alpha, lora_dropout, all 7 projections, bias none, CAUSAL_LM), which
             wraps each Linear4bit in peft.tuners.lora.bnb.Linear4bit. LoRA A/B fp32.
  lora_bf16  the same LoRA, over decoder linears whose frozen weights are stored in bf16 (half the
             fp32 bytes). CPU equivalent chosen (--bf16-compute fp32, the default): each base weight is
             an nn.Linear subclass holding a bf16 weight that is upcast to the input dtype (fp32) on
             the fly, F.linear in fp32, so the only difference to qlora is the storage format of the
             frozen weight (bf16 instead of NF4) and its decode cost (a cast instead of an NF4
             dequantize); all activations, LoRA math, loss and grads are fp32 as in qlora with
             compute_dtype fp32. Why not the usual GPU recipe (model in bf16 + autocast): on CPU,
             autocast would also move the attention, lm_head and LoRA matmuls to bf16, which changes
             what is measured relative to the fp32 qlora/full modes (and its speed depends on the
             CPU's AVX512-BF16/AMX support). That variant is available as --bf16-compute autocast
             (plain nn.Linear with bf16 weight, forward under torch.autocast("cpu", bfloat16), loss
             in fp32).
  full       plain full fine-tune, fp32, every parameter trainable, no PEFT.

Step (all modes, identical): ids = uniform random token ids B x (seq_len+1) (`--data random` style;
no token cache is read), input = ids[:, :-1], labels = ids[:, 1:]; logits = model(input); loss =
cross-entropy mean over all B*seq_len tokens (fp32 logits); backward; clip_grad_norm_(trainable, 1.0);
AdamW(trainable params only, lr 2e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, torch's default
single-tensor CPU implementation); zero_grad(set_to_none=True). Eager mode, no compile, no gradient
checkpointing. A step's time covers all of it, batch generation included (time.perf_counter).

Prints one JSON object on stdout: per-step seconds, median step seconds and tokens/s over the steps
after the first --skip (steady state), tokens/s over all steps, the loop's wall and process CPU
seconds (loop_cpu_s well below threads*loop_s means other processes had the cores; with the OpenMP
threads oversubscribed by a parallel build, steps were seen to run ~15x slower, so measure on a quiet
machine), trainable / total params (PEFT's count: a Params4bit counts 2 params per packed byte),
weight bytes of the model as stored (every distinct parameter and buffer, the tied embedding once;
for Linear4bit the packed uint8 weight plus its quant state: uint8 absmax, nested fp32 absmax,
offset, and the NF4 / nested code tables, broken down in weight_bytes_breakdown), peak RSS (getrusage
ru_maxrss of this process, MiB; ~0.7 GiB of it is torch/transformers/peft/bnb themselves, see
rss_before_loop_mib) and the torch/transformers/peft/bitsandbytes versions. A PEFT-style
"trainable params: ..." line goes to stderr.

bitsandbytes-on-CPU notes (bnb 0.50):
  - Linear4bit/Params4bit quantize lazily: constructing Params4bit from an fp32 tensor does nothing;
    only Params4bit.to(device) (or module .to()/.cuda()) quantizes, and on CPU nothing calls it for
    you. This script calls .to("cpu") on each new Params4bit and then asserts that every base weight
    is uint8 with a quant_state (nf4, nested, blocksize 64, N*K/2 bytes) and that dequantize_4bit
    reproduces the original weight to NF4 accuracy.
  - On CPUs with AVX512-BF16, importing bitsandbytes logs "Failed to load CPU gemm_4bit_forward from
    kernels-community: No module named 'kernels'". That hub kernel only serves bnb's inference path
    (eval mode, no grad, weight repacked for CPU); training never uses it. The warning is silenced.
  - PEFT only dispatches its bnb-aware LoRA layer when the model has is_loaded_in_4bit = True (normally
    set by from_pretrained(quantization_config=...)); without it a Linear4bit would get the generic
    lora.Linear wrapper. The flag is set by hand here and the wrapper type is asserted.
  - With frozen fp32 embeddings the input to layer 0's q/k/v_proj does not require grad, so bnb runs
    those three through its no-grad gemm_4bit op; every other base matmul goes through MatMul4Bit.
  - prepare_model_for_kbit_training is not called: it would only re-freeze and upcast (already fp32)
    and turn on gradient checkpointing, which qforge does not use.
"""
import argparse
import json
import logging
import math
import resource
import sys
import time

T_PROCESS_START = time.perf_counter()

# The kernels-community hub kernel is for bnb's CPU inference path only (see docstring).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class BF16StoredLinear(nn.Linear):
    """Frozen linear whose weight is stored in bf16 and upcast to the input dtype for the matmul."""

    def forward(self, x):
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


def decoder_linears(model):
    """(parent module, attribute name, full name, module) for every decoder projection."""
    out = []
    for name, mod in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        for child_name, child in mod.named_children():
            if child_name in DECODER_LINEARS and isinstance(child, nn.Linear):
                out.append((mod, child_name, f"{name}.{child_name}", child))
    return out


def to_nf4(model, blocksize):
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit, Params4bit

    n = 0
    for parent, attr, full, lin in decoder_linears(model):
        w = lin.weight.data.to(torch.float32).contiguous()
        q = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                       compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
        # Params4bit quantizes only on .to(device): do it explicitly on the CPU (see docstring).
        q.weight = Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=True,
                              quant_type="nf4", quant_storage=torch.uint8, module=q).to("cpu")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        qs = q.weight.quant_state
        assert qs is not None and q.weight.dtype == torch.uint8, f"{full}: weight not 4-bit ({q.weight.dtype})"
        assert qs.quant_type == "nf4" and qs.nested and qs.blocksize == blocksize, f"{full}: bad quant_state"
        assert q.weight.numel() == (w.numel() + 1) // 2 and tuple(qs.shape) == tuple(w.shape), full
        assert q.quant_state is qs, f"{full}: module.quant_state not set"
        dq = bnb.functional.dequantize_4bit(q.weight.data, qs)
        rel = float((dq - w).norm() / w.norm())
        assert rel < 0.15, f"{full}: NF4 round trip rel. error {rel:.3f}"  # ~0.09 for Gaussian weights
        setattr(parent, attr, q)
        n += 1
    assert n == 7 * model.config.num_hidden_layers, n
    return n


def to_bf16_storage(model, compute):
    for parent, attr, _full, lin in decoder_linears(model):
        cls = BF16StoredLinear if compute == "fp32" else nn.Linear
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight = nn.Parameter(lin.weight.data.to(torch.bfloat16), requires_grad=False)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.to(torch.bfloat16), requires_grad=False)
        setattr(parent, attr, new)


def count_params(model):
    """PEFT's get_nb_trainable_parameters (Params4bit: 2 params per packed byte), for any module."""
    trainable = total = 0
    for _n, p in model.named_parameters():
        k = p.numel()
        if p.__class__.__name__ == "Params4bit":
            k = k * 2 * p.element_size()
        total += k
        if p.requires_grad:
            trainable += k
    return trainable, total


def stored_bytes(model):
    """Bytes of every distinct parameter/buffer as stored (+ Linear4bit quant state), with a breakdown."""
    seen = set()
    br = {"decoder_linears": 0, "decoder_linears_nf4_scales": 0, "decoder_linears_nf4_code_tables": 0,
          "lora": 0, "other": 0}

    def add(key, t):
        if t is None or not torch.is_tensor(t):
            return
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if ident in seen:
            return
        seen.add(ident)
        br[key] += t.numel() * t.element_size()

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:
            add("lora", t)
        elif ".layers." in name and any(f".{p}." in name for p in DECODER_LINEARS):
            add("decoder_linears", t)
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                add("decoder_linears_nf4_scales", qs.absmax)
                add("decoder_linears_nf4_code_tables", qs.code)
                if qs.nested:
                    add("decoder_linears_nf4_scales", qs.state2.absmax)
                    add("decoder_linears_nf4_code_tables", qs.state2.code)
                    add("decoder_linears_nf4_scales", qs.offset if torch.is_tensor(qs.offset)
                        else torch.tensor(qs.offset, dtype=torch.float32))
        else:
            add("other", t)
    return sum(br.values()), br


def current_rss_mib():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["qlora", "lora_bf16", "full"], default="qlora")
    ap.add_argument("--bf16-compute", choices=["fp32", "autocast"], default="fp32",
                    help="lora_bf16 only: upcast the bf16 base weight to fp32 (default) or autocast to bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps excluded from the steady-state figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    # shape: configs/tiny_pretrain.yaml (vocab from runs/tokenizers/kjv_bpe4k.model = 4096)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", "--dim", dest="hidden_size", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--n-kv-heads", type=int, default=4)
    ap.add_argument("--intermediate-size", "--ffn-dim", dest="intermediate_size", type=int, default=704)
    ap.add_argument("--max-position", type=int, default=256)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied to the embedding)")
    # step
    ap.add_argument("--batch", "--batch-size", dest="batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    # LoRA / NF4
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--blocksize", type=int, default=64, help="NF4 block size (qlora)")
    a = ap.parse_args()
    if a.steps < 1 or a.skip < 0:
        raise SystemExit("need --steps >= 1 and --skip >= 0")
    if a.seq_len > a.max_position:
        raise SystemExit(f"--seq-len {a.seq_len} > --max-position {a.max_position}")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      max_position_embeddings=a.max_position, rope_theta=a.rope_theta, rms_norm_eps=a.norm_eps,
                      initializer_range=a.init_std, tie_word_embeddings=not a.untied, hidden_act="silu",
                      attention_bias=False, mlp_bias=False, attention_dropout=0.0, use_cache=False,
                      torch_dtype=torch.float32)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(torch.float32)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    if not a.untied:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings not tied"

    import peft

    try:
        import bitsandbytes as bnb
        bnb_version = bnb.__version__
    except Exception:  # only qlora needs it
        bnb, bnb_version = None, None

    autocast = a.mode == "lora_bf16" and a.bf16_compute == "autocast"
    if a.mode in ("qlora", "lora_bf16"):
        from peft import LoraConfig, get_peft_model

        if a.mode == "qlora":
            if bnb is None:
                raise SystemExit("--mode qlora needs bitsandbytes")
            to_nf4(model, a.blocksize)
            model.is_loaded_in_4bit = True  # PEFT dispatches its bnb LoRA layer only with this (see docstring)
        else:
            to_bf16_storage(model, a.bf16_compute)
        lcfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(DECODER_LINEARS),
                          bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)  # freezes every base parameter
        n_lora = 0
        for name, mod in model.named_modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer):
                base = mod.get_base_layer()
                if a.mode == "qlora":
                    assert isinstance(mod, peft.tuners.lora.bnb.Linear4bit), f"{name}: {type(mod)}"
                    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8, name
                    assert base.weight.quant_state is not None, f"{name}: lost its quant_state"
                else:
                    assert base.weight.dtype == torch.bfloat16 and not base.weight.requires_grad, name
                n_lora += 1
        assert n_lora == 7 * a.n_layers, n_lora
        for name, p in model.named_parameters():  # adapters fp32 and the only trainable tensors
            assert p.requires_grad == ("lora_" in name), name
            if "lora_" in name:
                assert p.dtype == torch.float32, f"{name}: {p.dtype}"
    model.train()

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = count_params(model)
    assert n_trainable == sum(p.numel() for p in trainable)
    print(f"[{a.mode}] trainable params: {n_trainable:,d} || all params: {n_total:,d} "
          f"|| trainable%: {100 * n_trainable / n_total:.4f}", file=sys.stderr)
    weight_bytes, weight_breakdown = stored_bytes(model)

    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    V = a.vocab_size
    step_times, losses = [], []
    gnorm = float("nan")
    t_setup = time.perf_counter() - T_PROCESS_START
    rss_before_loop = current_rss_mib()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for step in range(a.steps):
        ts = time.perf_counter()
        toks = torch.randint(0, V, (a.batch, a.seq_len + 1))
        ids, labels = toks[:, :-1], toks[:, 1:].contiguous()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1))
        v = loss.item()
        if not math.isfinite(v):
            raise SystemExit(f"non-finite loss at step {step + 1}")
        loss.backward()
        if a.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, a.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(v)
        step_times.append(time.perf_counter() - ts)
    loop = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    loop_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)

    tok_per_step = a.batch * a.seq_len
    steady = step_times[a.skip:] if len(step_times) > a.skip else step_times
    med = float(np.median(steady))
    out = {
        "impl": "hf-transformers+peft" + ("+bitsandbytes" if a.mode == "qlora" else ""),
        "mode": a.mode,
        "bf16_compute": a.bf16_compute if a.mode == "lora_bf16" else None,
        "shape": {"vocab_size": V, "hidden_size": a.hidden_size, "n_layers": a.n_layers, "n_heads": a.n_heads,
                  "n_kv_heads": a.n_kv_heads, "intermediate_size": a.intermediate_size,
                  "max_position": a.max_position, "rope_theta": a.rope_theta, "rms_norm_eps": a.norm_eps,
                  "tie_word_embeddings": not a.untied, "attn_implementation": "sdpa", "dtype": "float32"},
        "lora": ({"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "target_modules": DECODER_LINEARS}
                 if a.mode != "full" else None),
        "nf4": ({"blocksize": a.blocksize, "double_quant": True, "compute_dtype": "float32"}
                if a.mode == "qlora" else None),
        "threads": torch.get_num_threads(),
        "steps": a.steps,
        "skip": a.skip,
        "batch_size": a.batch,
        "seq_len": a.seq_len,
        "tokens_per_step": tok_per_step,
        "step_s": [round(t, 6) for t in step_times],
        "step_s_median": med,
        "tokens_per_s_steady": tok_per_step / med,
        "tokens_per_s_loop": tok_per_step * a.steps / loop,
        "setup_s": t_setup,
        "loop_s": loop,
        "loop_cpu_s": loop_cpu,  # user+sys CPU of this process in the loop; << threads*loop_s: CPU was taken
        "trainable_params": n_trainable,
        "total_params": n_total,
        "weight_bytes": weight_bytes,
        "weight_bytes_breakdown": weight_breakdown,
        "rss_before_loop_mib": rss_before_loop,  # libraries + model + optimizer, before the first step
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "last_grad_norm": gnorm,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bnb_version},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
