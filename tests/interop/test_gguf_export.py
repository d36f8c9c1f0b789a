"""`qforge export --format gguf` read back by gguf-py: a QAT q4_0 run (converted) and a float run
(RTN at export) written as llama.cpp GGUF files; gguf-py's reader finds llama's hyper-parameters and
a sentencepiece vocabulary, the tensor names and types llama.cpp expects, and gguf-py's
dequantization of every block tensor equals qforge's own weights (from `export --format hf
--dtype fp32` of the same run) after convert_hf_to_gguf.py's Q/K row permutation - bit-exact for
the QAT run, whose blocks are the trained ones. (Running the files in llama.cpp itself comes with
the llama-cpp-python build.)"""
import subprocess

import gguf  # a missing peer fails here, loudly
import numpy as np
import pytest

from st_io import read_safetensors
from tiny_runs import QFORGE, tiny_recipe, train



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=10)
    train(cfg)
    train(cfg, f"run.out_dir={d}/qat", f"run.init_from={d}/fp",
          "quant.rules=[{pattern: 'model.layers.*', weight: {preset: q4_0}}]", "trainer.max_steps=4")
    return d


def _permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


@pytest.mark.parametrize("run,quant,layer_type", [("qat/converted", "q4_0", "Q4_0"), ("fp", "q8_0", "Q8_0")])
def test_gguf_export_reads_back_in_gguf_py(tmp_path, runs, run, quant, layer_type):
    out = tmp_path / "m.gguf"
    r = subprocess.run([QFORGE, "-q", "export", str(runs / run), "--format", "gguf", "--quant", quant, "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf = tmp_path / "hf"
    subprocess.run([QFORGE, "-q", "export", str(runs / run), "--format", "hf", "--dtype", "fp32", "--out", str(hf)],
                   check=True, capture_output=True)
    ours = read_safetensors(hf / "model.safetensors")
    g = gguf.GGUFReader(str(out))
    f = lambda k: g.fields[k].contents()
    assert f("general.architecture") == "llama"
    assert (f("llama.block_count"), f("llama.embedding_length"), f("llama.feed_forward_length")) == (2, 64, 160)
    assert (f("llama.attention.head_count"), f("llama.attention.head_count_kv"), f("llama.rope.dimension_count")) == (4, 2, 16)
    assert f("tokenizer.ggml.model") == "llama" and len(f("tokenizer.ggml.tokens")) == 400
    assert f("tokenizer.ggml.tokens")[:3] == ["<unk>", "<s>", "</s>"] and f("tokenizer.ggml.bos_token_id") == 1
    tensors = {t.name: t for t in g.tensors}
    want = {"token_embd.weight": ours["model.embed_tokens.weight"], "output_norm.weight": ours["model.norm.weight"],
            "output.weight": ours["lm_head.weight"]}
    for i in range(2):
        for k, v in GGUF_NAMES.items():
            w = ours[f"model.layers.{i}.{k}"]
            if k.startswith("self_attn.q_proj"):
                w = _permute(w, 4)
            if k.startswith("self_attn.k_proj"):
                w = _permute(w, 2)
            want[f"blk.{i}.{v}"] = w
    assert sorted(tensors) == sorted(want)
    for name, w in want.items():
        t = tensors[name]
        if name.startswith("blk.") and "norm" not in name:
            assert t.tensor_type.name == layer_type, name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if run.startswith("qat") or t.tensor_type.name == "F32":
            assert np.array_equal(got, w.numpy()), name  # the trained blocks / float values, exactly
        else:
            assert np.abs(got - w.numpy()).max() <= np.abs(w.numpy()).max() / 100, name  # RTN q8_0 of float weights
    if run == "fp":
        assert tensors["output.weight"].tensor_type.name in ("Q6_K", "Q8_0")


def test_gguf_export_fallbacks_and_refusals(tmp_path, runs):
    # width 64 fits no 256-block: llama.cpp's fallbacks (Q4_K -> Q5_0, output Q6_K -> Q8_0), each announced
    r = subprocess.run([QFORGE, "export", str(runs / "fp"), "--format", "gguf", "--quant", "q4_k", "--out",
                        str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "blk.0.attn_q.weight - ncols 64 not divisible by 256 (required for type q4_K) -> falling back to q5_0" in r.stderr
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "x.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["output.weight"] == "Q8_0", types
    r = subprocess.run([QFORGE, "-q", "export", str(runs / "fp"), "--format", "gguf", "--quant", "q3", "--out",
                        str(tmp_path / "y.gguf")], capture_output=True, text=True)
    assert r.returncode == 1 and "mixture 'q3' is not one of" in r.stderr, r.stderr
    assert not (tmp_path / "y.gguf").exists()
    # an unwritable destination: a clear error naming it, nothing left behind
    r = subprocess.run([QFORGE, "-q", "export", str(runs / "fp"), "--format", "gguf", "--quant", "q8_0", "--out",
                        "/proc/qforge.gguf"], capture_output=True, text=True)
    assert r.returncode == 1 and "/proc/qforge.gguf" in r.stderr, r.stderr


def _llama_logits(path, ids):
    import llama_cpp  # built from its sdist by scripts/setup.sh; a missing peer fails here, loudly
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    gen = []
    for _ in range(8):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        gen.append(tok)
        llm.eval([tok])
    return logits, gen


def llama_vs_qforge(tmp_path, gguf_path, hf_dir, tok_model, tol, label):
    """llama.cpp's logits of gguf_path vs qforge's forward of hf_dir (interop_hf) on a KJV prompt:
    max |diff| <= tol * logit scale and the same 8 greedy tokens. Returns (ids, llama's, qforge's)."""
    import sentencepiece as spm
    from st_io import interop_tool, write_safetensors
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    ids = ([sp.bos_id()] + sp.encode("And it came to pass, when men began to multiply on the face of the earth"))[:32]
    write_safetensors(tmp_path / "ids.safetensors", {"ids": np.array([ids], dtype=np.int64)})
    subprocess.run([interop_tool("interop_hf"), str(hf_dir), str(tmp_path / "ids.safetensors"),
                    str(tmp_path / "o.safetensors"), "8"], check=True)
    ours = read_safetensors(tmp_path / "o.safetensors")
    q_logits = ours["logits"][0].numpy()
    l_logits, l_gen = _llama_logits(gguf_path, ids)
    scale = max(1.0, float(np.abs(q_logits).max()))
    err = float(np.abs(l_logits - q_logits).max())
    print(f"\nLLAMA_CPP {label}: max|diff| {err:.3g} scale {scale:.3g}")
    assert err <= tol * scale, f"{label}: max |llama.cpp - qforge| = {err} (scale {scale})"
    assert l_gen == ours["generated"].tolist(), f"{label}: greedy tokens differ"
    return ids, l_logits, q_logits


# What llama.cpp computes differently from qforge, and the tolerance it earns (max |logit diff| over
# the logit scale; measured on the tiny run: 4e-7, 1.5e-3, 2.6e-3). F32 weights: summation order
# only (1e-5). Q4_0/Q8_0 weights: llama.cpp also quantizes the activations to Q8_0 inside each
# matmul (vec_dot_q4_0_q8_0), qforge does not (1e-2).
@pytest.mark.parametrize("run,quant,tol", [("fp", "f32", 1e-5), ("qat/converted", "q4_0", 1e-2), ("fp", "q8_0", 1e-2)])
def test_llama_cpp_runs_the_exported_gguf_like_qforge(tmp_path, runs, run, quant, tol):
    from st_io import write_safetensors
    out = tmp_path / "m.gguf"
    subprocess.run([QFORGE, "-q", "export", str(runs / run), "--format", "gguf", "--quant", quant, "--out", str(out)],
                   check=True, capture_output=True)
    # qforge's own forward on the same weights: the run exported as fp32 HF weights (dequantized
    # exactly as QuantizedLinear computes; for the RTN rows, dequantized from the GGUF itself).
    hf = tmp_path / "hf"
    subprocess.run([QFORGE, "-q", "export", str(runs / run), "--format", "hf", "--dtype", "fp32", "--out", str(hf)],
                   check=True, capture_output=True)
    if run == "fp" and quant != "f32":  # compare like with like: qforge on the RTN-quantized weights
        import torch
        g = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
        st = read_safetensors(hf / "model.safetensors")
        inv = {v: k for k, v in GGUF_NAMES.items()}
        for name, t in g.items():
            if not name.startswith("blk.") or "norm" in name:
                continue
            i, short = name.split(".")[1], ".".join(name.split(".")[2:])
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(st[f"model.layers.{i}.{inv[short]}"].shape)
            heads = 4 if short == "attn_q.weight" else 2 if short == "attn_k.weight" else 0
            if heads:  # undo the rotate-half -> interleaved permutation
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            st[f"model.layers.{i}.{inv[short]}"] = torch.from_numpy(np.ascontiguousarray(w))
        te = g["token_embd.weight"]  # quantized too, as llama-quantize does
        st["model.embed_tokens.weight"] = torch.from_numpy(gguf.quants.dequantize(te.data, te.tensor_type).reshape(
            st["model.embed_tokens.weight"].shape).copy())
        ow = g["output.weight"]
        st["lm_head.weight"] = torch.from_numpy(gguf.quants.dequantize(ow.data, ow.tensor_type).reshape(
            st["lm_head.weight"].shape).copy())
        write_safetensors(hf / "model.safetensors", st)
    ids, l_logits, q_logits = llama_vs_qforge(tmp_path, out, hf, runs / "tok.model", tol, f"{run} {quant}")

    def ppl(logits):
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll = -np.mean([lp[t, ids[t + 1]] for t in range(len(ids) - 1)])
        return float(np.exp(nll))
    print(f"LLAMA_CPP ppl llama.cpp {ppl(l_logits):.4f} qforge {ppl(q_logits):.4f}")
    assert abs(ppl(l_logits) / ppl(q_logits) - 1) <= 0.005, (ppl(l_logits), ppl(q_logits))
