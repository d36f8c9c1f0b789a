#!/usr/bin/env python3
"""Eager PyTorch reference for `qforge train` throughput (bench/train_throughput.sh drives both).

Same model as qforge's Llama family (models/transformer.cpp, HF LlamaForCausalLM semantics):
RMSNorm (fp32 normalisation), RoPE (rotate_half), SwiGLU MLP, GQA via repeat_interleave,
causal SDPA, tied embeddings, no dropout, no biases. Same step as trainer/trainer.cpp:
cross-entropy summed over unmasked tokens / token count, AdamW (weight decay on >=2-dim
params only), clip_grad_norm_, cosine schedule with linear warmup. Eager mode, fp32, no compile.

Data: by default the exact token ids qforge trains on, read from qforge's token cache
(.cache/qforge/tokens/tokens-*.bin: 40-byte header, int32 ids[n], uint8 mask[n]) and packed
the same way (non-overlapping windows of seq_len+1, last val_fraction held out). Batches are
drawn by a seeded shuffle (not qforge's sampler order); throughput does not depend on the values.
--data random uses uniform random ids of the same shape instead.

Prints one JSON object on stdout: total wall, per-step times, in-loop tokens/s (all steps, like
qforge's own "tokens/s") and steady-state tokens/s (excluding the first --skip steps).
"""
import argparse
import glob
import json
import math
import os
import struct
import sys
import time

T_PROCESS_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ----------------------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_cos_sin(head_dim, theta, T, dtype):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    inv = inv.float()
    pos = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.h, self.kv, self.hd = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(n_heads * self.hd, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.h // self.kv
        if rep > 1:
            k = k.repeat_interleave(rep, 1)
            v = v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.hd))


class MLP(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.self_attn = Attention(a.dim, a.n_heads, a.n_kv_heads)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.mlp = MLP(a.dim, a.ffn_dim)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList([Layer(a) for _ in range(a.n_layers)])
        self.norm = RMSNorm(a.dim, a.norm_eps)
        with torch.no_grad():  # qforge init: N(0, init_std) for matrices, ones for norms
            for n, p in self.named_parameters():
                if "norm" in n:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, a.init_std)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed_tokens(ids)
        # qforge recomputes cos/sin every forward too (rope_cos_sin in LlamaForCausalLM::forward)
        cos, sin = rope_cos_sin(self.a.dim // self.a.n_heads, self.a.rope_theta, T, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return F.linear(x, self.embed_tokens.weight)  # tied lm_head


# ----------------------------------------------------------------------------- data
def load_qforge_tokens(path_glob, seq_len, val_fraction):
    files = sorted(glob.glob(path_glob), key=os.path.getmtime)
    if not files:
        return None, None
    f = files[-1]
    with open(f, "rb") as fh:
        hdr = fh.read(40)
        magic, version, endian, n_tokens, n_docs, _h = struct.unpack("<8sIIqqQ", hdr)
        if magic != b"QFTOKENS" or version != 1 or endian != 0x01020304:
            raise SystemExit(f"{f}: not a qforge token cache (v1)")
        ids = np.fromfile(fh, dtype=np.int32, count=n_tokens)
        mask = np.fromfile(fh, dtype=np.uint8, count=n_tokens)
    W = seq_len + 1
    N = n_tokens // W
    n_val = max(1, math.ceil(N * val_fraction - 1e-9)) if val_fraction > 0 else 0
    n_train = N - n_val
    toks = ids[: N * W].reshape(N, W).astype(np.int64)[:n_train]
    m = mask[: N * W].reshape(N, W)[:n_train, 1:] != 0
    return (torch.from_numpy(toks), torch.from_numpy(m)), f


def lr_factor(step, warmup, total, min_ratio):  # trainer_config.cpp ScheduleConfig::factor (cosine)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps excluded from steady-state tokens/s")
    # shape: configs/tiny_pretrain.yaml (vocab from runs/tokenizers/kjv_bpe4k.model = 4096)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--n-kv-heads", type=int, default=4)
    ap.add_argument("--ffn-dim", type=int, default=704)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--norm-eps", type=float, default=1e-5)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95])
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--total-steps", type=int, default=600, help="cosine horizon (qforge: trainer.schedule.total_steps)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--metrics", default="", help="append one JSON line per step here (like qforge log_every=1)")
    ap.add_argument("--data", choices=["qforge-cache", "random"], default="qforge-cache")
    ap.add_argument("--tokens", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                     ".cache/qforge/tokens/tokens-*.bin"))
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    data_src = "random"
    train = None
    if a.data == "qforge-cache":
        train, f = load_qforge_tokens(a.tokens, a.seq_len, a.val_fraction)
        if train is None:
            print(f"warning: no qforge token cache matches {a.tokens}; using random ids", file=sys.stderr)
        else:
            data_src = os.path.relpath(f)
            if int(train[0].max()) >= a.vocab_size:
                raise SystemExit(f"token id {int(train[0].max())} >= --vocab-size {a.vocab_size}")

    model = Llama(a)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=tuple(a.betas), eps=a.eps)

    def batch():
        if train is None:
            toks = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len + 1))
            return toks[:, :-1], toks[:, 1:].contiguous()
        idx = torch.from_numpy(rng.integers(0, train[0].shape[0], a.batch_size))
        toks, m = train[0][idx], train[1][idx]
        labels = toks[:, 1:].masked_fill(~m, -100)
        return toks[:, :-1].contiguous(), labels

    mf = open(a.metrics, "a") if a.metrics else None
    tokens_seen = 0
    step_times, losses = [], []
    t_setup = time.perf_counter() - T_PROCESS_START
    t0 = time.perf_counter()
    for step in range(a.steps):
        ts = time.perf_counter()
        ids, labels = batch()
        n_tok = int((labels != -100).sum().item())
        lr = a.lr * lr_factor(step, a.warmup_steps, a.total_steps, a.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        logits = model(ids)
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), reduction="sum",
                               ignore_index=-100) / max(1, n_tok)
        v = loss.item()
        if not math.isfinite(v):
            raise SystemExit(f"non-finite loss at step {step + 1}")
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)) if a.grad_clip > 0 else 0.0
        opt.step()
        losses.append(v)
        tokens_seen += ids.numel()
        if mf:
            mf.write(json.dumps({"step": step + 1, "loss": v, "lr": lr, "grad_norm": gnorm, "tokens": tokens_seen}) + "\n")
            mf.flush()
        step_times.append(time.perf_counter() - ts)
    loop = time.perf_counter() - t0
    tok_per_step = a.batch_size * a.seq_len
    steady = step_times[a.skip:] if len(step_times) > a.skip else step_times
    out = {
        "impl": "pytorch-eager",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": a.steps,
        "batch_size": a.batch_size,
        "seq_len": a.seq_len,
        "tokens_per_step": tok_per_step,
        "params": sum(p.numel() for p in model.parameters()),
        "data": data_src,
        "setup_s": t_setup,
        "loop_s": loop,
        "tokens_per_s_loop": tok_per_step * a.steps / loop,
        "tokens_per_s_steady": tok_per_step * len(steady) / sum(steady),
        "step_s_median": float(np.median(steady)),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "last_grad_norm": gnorm,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
