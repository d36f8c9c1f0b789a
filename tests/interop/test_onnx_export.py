"""`qforge export --format onnx` run by onnxruntime and Optimum (live peers from PyPI).

For every family's tiny random checkpoint (test_hf_models' layouts: tied Llama 3 with llama3 rope
scaling, Qwen2 / Mistral with sliding windows, Qwen3 with q/k norms, Gemma 2 with soft-caps, Gemma 3
with local RoPE bases, Phi-4-mini's partial rotary + LongRoPE, OPT pre- and post-LN with projected
embeddings, GPT-2):
  - onnx.checker accepts the model; onnxruntime's logits for a batch of two equal qforge's own
    (interop_hf: qforge loading the same dir) within 1e-4 of the logit scale;
  - greedy decoding through the graph's KV cache (the prompt, then one token per step, each step
    feeding present.N back as past_key_values.N) gives qforge's greedy tokens;
  - a left-padded row (attention_mask 0 on the padding) gives the logits of the same row unpadded;
  - Optimum's ORTModelForCausalLM loads the directory and its generate() gives the same tokens.
Quantized models: RTN int4 groups of 16 become MatMulNBits (symmetric, and -zp with integer zero
points), int8 per channel and int3 groups of 16 (symmetric, and -zp) become DequantizeLinear + MatMul; their logits equal transformers' on qforge's fp32 HF export of the
same converted run (the codes' exact dequantization) within 1e-4. Formats ONNX has no operator for
(FP8, llama.cpp blocks) are refused naming the layer, and --fallback f32 writes them dequantized."""
import json
import subprocess

import numpy as np
import onnx  # a missing peer fails here, loudly
import onnxruntime as ort
import pytest
import torch
import transformers
from optimum.onnxruntime import ORTModelForCausalLM

from st_io import interop_tool, read_safetensors, write_safetensors
from test_families import _checkpoint, _qforge, _recipe
from tiny_runs import kjv_corpus

TOL = 1e-4
N_NEW = 12
# Optimum 2.1's ORTModelForCausalLM sizes the empty cache of these model types from hidden_size /
# num_attention_heads and num_attention_heads (it reads head_dim / num_key_value_heads only for the
# model types it lists), so its first step feeds past_key_values of the wrong shape: Gemma 2 and
# Phi-3 (not listed: GQA taken for MHA) and Qwen3 with head_dim != hidden / heads (as Qwen3-0.6B has).
# Plain onnxruntime runs them (above); Optimum runs every other family.
OPTIMUM_CACHE_SHAPE_UNSUPPORTED = {"gemma2", "phi4_longrope", "qwen3"}
KINDS = ["llama3_tied", "qwen2_sw", "qwen3", "mistral_sw", "gemma2", "gemma3", "phi4_longrope", "opt", "opt_350m",
         "gpt2"]
IDS = (torch.arange(2 * 14).reshape(2, 14) * 37 + 5) % 150


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return kjv_corpus(tmp_path_factory.mktemp("corpus") / "kjv.txt", 1500)


def _qforge_reference(tmp_path, d, ids):
    """qforge's own fp32 logits on `ids` and greedy tokens from ids[0] (tests/interop/interop_hf)."""
    write_safetensors(tmp_path / "ids.safetensors", {"ids": ids})
    out = tmp_path / "ref.safetensors"
    r = subprocess.run([interop_tool("interop_hf"), str(d), str(tmp_path / "ids.safetensors"), str(out), str(N_NEW)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = read_safetensors(out)
    return got["logits"].numpy(), got["generated"].tolist()


class Graph:
    def __init__(self, d, exact=True):
        """exact: onnxruntime's DequantizeLinear -> MatMul fusion (into MatMulNBits) keeps fp32
        activations (session.qdq_matmulnbits_accuracy_level 0); its default, 4, quantizes them to int8."""
        onnx.checker.check_model(str(d / "model.onnx"))  # the proto qforge wrote, with its external data
        so = ort.SessionOptions()
        if exact:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.s = ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.s.get_inputs()]
        self.outputs = [o.name for o in self.s.get_outputs()]
        past = [i for i in self.s.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layers = len(past) // 2
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]

    def run(self, ids, mask=None, past=None, start=0):
        ids = np.asarray(ids, np.int64)
        b, s = ids.shape
        p = 0 if past is None else past[0].shape[2]
        mask = np.ones((b, p + s), np.int64) if mask is None else np.asarray(mask, np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.inputs:  # transformers' positions for left padding: cumsum(mask) - 1
            pos = np.cumsum(mask, 1) - 1
            feed["position_ids"] = np.where(mask == 0, 1, pos)[:, p:]
        for i in range(self.n_layers):
            for j, kv in enumerate(("key", "value")):
                feed[f"past_key_values.{i}.{kv}"] = (np.zeros((b, self.kv_heads, 0, self.head_dim), np.float32)
                                                     if past is None else past[2 * i + j])
        out = self.s.run(None, feed)
        assert self.outputs[0] == "logits"
        present = [out[self.outputs.index(f"present.{i}.{kv}")] for i in range(self.n_layers) for kv in ("key", "value")]
        return out[0], present

    def greedy(self, prompt, n):
        logits, past = self.run(np.asarray(prompt)[None])
        toks = []
        for _ in range(n):
            t = int(logits[0, -1].argmax())
            toks.append(t)
            logits, past = self.run([[t]], past=past)
        return toks


def _rtn(tmp_path, d, quant, corpus, *extra):
    run = tmp_path / f"rtn_{quant}"
    _qforge("quantize", d, "--method", "rtn", "--quant", quant, "--calib", _recipe(tmp_path, "calib", d, corpus, ""),
            "--samples", "8", "--no-eval", "--out", run, *extra)
    return run


def _export(src, out, *extra):
    r = _qforge("export", src, "--format", "onnx", "--out", out, *extra)
    return r


@pytest.mark.parametrize("kind", KINDS)
def test_family_graph_matches_qforge_with_and_without_the_cache(tmp_path, kind, corpus):
    d = _checkpoint(tmp_path, kind, corpus)
    want_logits, want_gen = _qforge_reference(tmp_path, d, IDS)
    out = tmp_path / "onnx"
    _export(d, out)
    g = Graph(out)
    logits, _ = g.run(IDS.numpy())
    scale = max(1.0, float(np.abs(want_logits).max()))
    err = float(np.abs(logits - want_logits).max())
    print(f"{kind}: max |onnxruntime - qforge| {err:.3g} at logit scale {scale:.3g}")
    assert err <= TOL * scale, f"{kind}: max |onnxruntime - qforge| = {err}"
    # The KV cache: prompt, then one token per step, is qforge's greedy decoding.
    assert g.greedy(IDS[0].tolist(), N_NEW) == want_gen, kind
    # Left padding: row 1 shifted right by 3 pad tokens gives row 1's logits.
    padded = np.concatenate([np.zeros((1, 3), np.int64), IDS[1:].numpy()], 1)
    mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones((1, 14), np.int64)], 1)
    lp, _ = g.run(padded, mask=mask)
    err = float(np.abs(lp[0, 3:] - want_logits[1]).max())
    assert err <= TOL * scale, f"{kind}: left-padded row differs by {err}"
    # Optimum loads the directory as a causal LM with a cache and decodes the same tokens.
    if kind in OPTIMUM_CACHE_SHAPE_UNSUPPORTED:
        return
    m = ORTModelForCausalLM.from_pretrained(out, use_cache=True, provider="CPUExecutionProvider")
    gen = m.generate(IDS[:1], max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                     pad_token_id=0)[0, 14:].tolist()
    assert gen == want_gen, f"{kind}: Optimum's generate {gen} != qforge's {want_gen}"


def _node_types(out):
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    return [n.op_type for n in m.graph.node]


@pytest.mark.parametrize("kind,quant,op", [("llama3_tied", "int4-g16", "MatMulNBits"), ("phi4_longrope", "int4-g16", "MatMulNBits"),
                                           ("qwen3", "int8-per-channel", "DequantizeLinear"),
                                           ("gpt2", "int3-g16", "DequantizeLinear"),
                                           ("qwen2_sw", "int4-g16-zp", "MatMulNBits"),
                                           ("gemma3", "int3-g16-zp", "DequantizeLinear")])
def test_quantized_codes_run_as_matmulnbits_or_qdq(tmp_path, kind, quant, op, corpus):
    d = _checkpoint(tmp_path, kind, corpus)
    run = _rtn(tmp_path, d, quant, corpus)
    out, hf = tmp_path / "onnx", tmp_path / "hf"
    r = _export(run, out)
    _qforge("export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
    types = _node_types(out)
    n_linears = {"phi4_longrope": 8, "gpt2": 8}.get(kind, 14)
    assert types.count(op) == n_linears, (types.count(op), r.stdout)
    g = Graph(out)
    logits, _ = g.run(IDS.numpy())
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = ref(IDS).logits.numpy()
        want_gen = ref.generate(IDS[:1], max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 14:].tolist()
    err = float(np.abs(logits - want).max())
    assert err <= TOL * max(1.0, float(np.abs(want).max())), f"{kind} {quant}: max |diff| {err}"
    assert g.greedy(IDS[0].tolist(), N_NEW) == want_gen
    # onnxruntime's default session: QDQ weights fused into MatMulNBits with int8 activations
    # (accuracy level 4), within a few percent of the logit scale; explicit MatMulNBits nodes stay exact.
    d_logits, _ = Graph(out, exact=False).run(IDS.numpy())
    d_err = float(np.abs(d_logits - want).max())
    print(f"{kind} {quant}: exact session max |diff| {err:.3g}, default session {d_err:.3g}, logit scale {np.abs(want).max():.3g}")
    assert d_err <= (0.05 if op == "DequantizeLinear" else TOL) * max(1.0, float(np.abs(want).max()))
    # The packed weights are smaller than the float graph's.
    f = tmp_path / "onnx_float"
    _export(d, f)
    assert (out / "model.onnx_data").stat().st_size < 0.7 * (f / "model.onnx_data").stat().st_size


def test_fp16_weights_halve_the_file_and_compute_in_fp32(tmp_path, corpus):
    d = _checkpoint(tmp_path, "qwen3", corpus)
    want, _ = _qforge_reference(tmp_path, d, IDS)
    a, b = tmp_path / "f32", tmp_path / "f16"
    _export(d, a)
    _export(d, b, "--dtype", "fp16")
    assert (b / "model.onnx_data").stat().st_size < 0.6 * (a / "model.onnx_data").stat().st_size
    logits, _ = Graph(b).run(IDS.numpy())
    assert float(np.abs(logits - want).max()) <= 2e-2 * max(1.0, float(np.abs(want).max()))


def test_formats_without_an_onnx_operator_are_refused_or_dequantized(tmp_path, corpus):
    d = _checkpoint(tmp_path, "llama3_tied", corpus, ffn=192)  # every width a multiple of q4_0's 32
    run = _rtn(tmp_path, d, "q4_0", corpus)  # llama.cpp blocks
    out = tmp_path / "onnx"
    r = _qforge("export", run, "--format", "onnx", "--out", out, check=False)
    assert r.returncode != 0
    assert "model.layers.0.self_attn.q_proj" in r.stderr and "--fallback f32" in r.stderr, r.stderr
    assert not out.exists()
    _export(run, out, "--fallback", "f32")
    hf = tmp_path / "hf"
    _qforge("export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = ref(IDS).logits.numpy()
    logits, _ = Graph(out).run(IDS.numpy())
    assert float(np.abs(logits - want).max()) <= TOL * max(1.0, float(np.abs(want).max()))
    # --dtype bf16 has no onnxruntime CPU kernels: refused with the dtypes that work.
    r = _qforge("export", d, "--format", "onnx", "--out", tmp_path / "bf16", "--dtype", "bf16", check=False)
    assert r.returncode != 0 and "--dtype fp32" in r.stderr, r.stderr
