"""qforge's GPTQ (`qforge quantize --method gptq`) against GPTQModel 4.2.5, the peer, on the same
trained tiny Llama and the same 64 calibration sequences (the windows qforge's calibration picks,
saved by `qforge eval --save-tokens`). GPTQModel runs on the CPU with the classic GPTQ options
(damp 0.01 without auto-increment, no MSE grid, no act-group-aware reordering, true sequential,
fp32 model). Both results are read back from GPTQ checkpoints by one decoder and scored by
transformers on the held-out windows:
  - held-out perplexity within 1% of the peer's;
  - mean per-linear output error ||X Wq^T - X W^T|| / ||X W^T|| on the float model's calibration
    inputs no worse than the peer's (5% slack; per linear 25%), and both below round-to-nearest's.
Plain order, act-order with static groups, and act-order with a per-column g_idx (desc_act, the
GPTQ file's own layout; also loaded by transformers' GPTQ path). A missing peer fails at import, loudly."""
import os
import subprocess

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # gptqmodel would torch.compile its CPU kernel
import gptqmodel  # noqa: E402  - the peer
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tiny_runs import QFORGE, tiny_recipe, train  # noqa: E402

N_CALIB = 64
GROUP = 32


def _qf(*args):
    r = subprocess.run([QFORGE, "-q", *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("ptq")
    cfg = tiny_recipe(d, "fp", tie=False, max_steps=150)
    train(cfg)
    _qf("export", d / "fp", "--format", "hf", "--dtype", "fp32", "--out", d / "hf")
    _qf("eval", d / "fp", "--split", "train", "--save-tokens", d / "train.st")
    _qf("eval", d / "fp", "--split", "val", "--save-tokens", d / "val.st")
    train_tok = load_file(str(d / "train.st"))["tokens"]
    # qforge's calibration: N evenly spaced training windows (trainer::calibration_tokens).
    idx = torch.arange(N_CALIB) * train_tok.shape[0] // N_CALIB
    calib = train_tok[idx, :-1].contiguous()
    val = load_file(str(d / "val.st"))["tokens"][:, :-1].contiguous()
    return d, calib, val


def _peer_gptq(d, calib, act_order, static, out):
    """GPTQModel.quantize on the float HF dir; load() insists on a tokenizer with a pad id, so it
    gets a stage dir of symlinks plus a WordLevel stand-in (the ids go in pre-tokenized)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    stage = d / f"stage_{out.name}"
    stage.mkdir()
    for f in os.listdir(d / "hf"):
        if not f.startswith("tokenizer") and f != "special_tokens_map.json":
            os.symlink(d / "hf" / f, stage / f)
    vocab = transformers.AutoConfig.from_pretrained(str(d / "hf")).vocab_size
    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", unk_token="t0").save_pretrained(str(stage))
    qc = gptqmodel.QuantizeConfig(bits=4, group_size=GROUP, sym=True, desc_act=act_order, static_groups=static,
                                  damp_percent=0.01, damp_auto_increment=0.0, mse=0.0, act_group_aware=False, v2=False,
                                  true_sequential=True, device="cpu")
    m = gptqmodel.GPTQModel.load(str(stage), qc, torch_dtype=torch.float32)
    rows = [{"input_ids": r[None], "attention_mask": torch.ones_like(r)[None]} for r in calib]
    cwd = os.getcwd()
    os.chdir(d)  # gptqmodel writes its log files into the working directory
    try:
        m.quantize(rows, batch_size=1, calibration_data_min_length=0)
        m.save(str(out))
    finally:
        os.chdir(cwd)


def _decode_gptq(path):
    """GPTQ v1 checkpoint -> {linear name: fp32 weight [out, in]} (stored zero = zero - 1)."""
    t = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            t.update(load_file(os.path.join(path, f)))
    out = {}
    shifts = torch.arange(8, dtype=torch.int32) * 4
    for k in t:
        if not k.endswith(".qweight"):
            continue
        name = k[: -len(".qweight")]
        qw, qz = t[k], t[name + ".qzeros"]
        q = ((qw.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15).reshape(qw.shape[0] * 8, qw.shape[1])  # [in, out]
        z = ((qz.unsqueeze(2) >> shifts.view(1, 1, 8)) & 15).reshape(qz.shape[0], -1) + 1  # [groups, out]
        g = t[name + ".g_idx"].long()
        out[name] = (t[name + ".scales"].float()[g] * (q.float() - z[g].float())).t().contiguous()
    return out


def _float_inputs(hf, calib):
    """Each linear's inputs in the float model on the calibration windows."""
    m = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    xs, hooks = {}, []
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            hooks.append(mod.register_forward_pre_hook(
                lambda mod, a, name=name: xs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        m(calib)
    for h in hooks:
        h.remove()
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    return m, {n: torch.cat(v) for n, v in xs.items()}, weights


def _ppl(m, weights, ids):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n[: -len(".weight")] in weights:
                p.copy_(weights[n[: -len(".weight")]])
        logits = m(ids).logits.float()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    return float(torch.exp(nll))


def _rel_err(x, w, wq):
    ref = x @ w.t()
    return float((x @ wq.t() - ref).norm() / ref.norm())


def _rtn(w):
    """Symmetric int4 round-to-nearest per group (GPTQ's own quantizer without error feedback)."""
    g = w.reshape(w.shape[0], -1, GROUP)
    s = g.abs().amax(-1, keepdim=True) / 7.5
    return (torch.clamp(torch.round(g / s), -8, 7) * s).reshape(w.shape)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, True), (True, False)],
                         ids=["plain", "act_order_static_groups", "act_order_g_idx"])
def test_gptq_matches_gptqmodel(model, act_order, static):
    d, calib, val = model
    tag = ("ao" if act_order else "plain") + ("_static" if static else "")
    flags = (["--act-order"] if act_order else []) + (["--static-groups"] if static else [])
    _qf("quantize", d / "fp", "--method", "gptq", "--quant", "int4-g32", "--samples", N_CALIB, "--out", d / f"q_{tag}",
        "--no-eval", *flags)
    _qf("export", d / f"q_{tag}", "--format", "gptq", "--out", d / f"qgptq_{tag}")
    _peer_gptq(d, calib, act_order, static, d / f"peer_{tag}")
    ours, theirs = _decode_gptq(d / f"qgptq_{tag}"), _decode_gptq(d / f"peer_{tag}")
    g_idx = load_file(str(d / f"qgptq_{tag}" / "model.safetensors"))["model.layers.0.mlp.down_proj.g_idx"]
    contiguous = torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // GROUP)
    assert contiguous == (not act_order or static), "act-order without static groups writes a permuted g_idx"
    assert sorted(ours) == sorted(theirs) and len(ours) == 14

    m, xs, w = _float_inputs(d / "hf", calib)
    fp = _ppl(m, {}, val)
    err = {k: (_rel_err(xs[k], w[k + ".weight"], ours[k]), _rel_err(xs[k], w[k + ".weight"], theirs[k]),
               _rel_err(xs[k], w[k + ".weight"], _rtn(w[k + ".weight"]))) for k in ours}
    p_ours, p_theirs = _ppl(m, ours, val), _ppl(m, theirs, val)
    p_rtn = _ppl(m, {k: _rtn(w[k + ".weight"]) for k in ours}, val)
    mean = [sum(e[i] for e in err.values()) / len(err) for i in range(3)]
    print(f"\n[{tag}] held-out ppl: fp {fp:.4f} rtn {p_rtn:.4f} qforge {p_ours:.4f} gptqmodel {p_theirs:.4f}; "
          f"mean rel. output error qforge {mean[0]:.5f} gptqmodel {mean[1]:.5f} rtn {mean[2]:.5f}")
    assert abs(p_ours - p_theirs) / p_theirs < 0.01, (p_ours, p_theirs)
    assert mean[0] <= 1.05 * mean[1], mean
    assert mean[0] < mean[2] and mean[1] < mean[2], mean
    for k, (a, b, _) in err.items():
        assert a <= 1.25 * b, (k, a, b)
