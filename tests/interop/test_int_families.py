"""`qforge export --format gptq | compressed-tensors` for every family whose HF layers are nn.Linear:
a GPTQ run (`qforge quantize` from the family's tiny transformers checkpoint, int4 group 16, the
family's sequential groups) is written with its codes and scales, and transformers (GPTQ through
optimum + gptqmodel's CPU kernel, compressed-tensors through its package) loads it with qforge's own
logits of the same converted model (1e-4 of the logit scale, fp32). GPT-2's Conv1D layers are
refused with the reason. Runs in the overlay venv (.venv-gptq), like test_int_export.py."""
import os
import subprocess

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # gptqmodel's CPU kernel would torch.compile itself
import compressed_tensors  # noqa: E402,F401  - the peers, loudly
import gptqmodel  # noqa: E402,F401
import optimum  # noqa: E402,F401
import torch  # noqa: E402
import transformers  # noqa: E402

from st_io import interop_tool, read_safetensors, write_safetensors  # noqa: E402
from test_families import _checkpoint, _recipe  # noqa: E402
from tiny_runs import QFORGE, kjv_corpus  # noqa: E402

KINDS = ["llama3_tied", "qwen2_sw", "qwen3", "mistral_sw", "gemma2", "gemma3", "phi4_longrope", "opt"]


def _qforge(*args):
    r = subprocess.run([QFORGE, "-q", *map(str, args)], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return kjv_corpus(tmp_path_factory.mktemp("corpus") / "kjv.txt", 1500)


def _qforge_logits(tmp_path, run, ids):
    hf = tmp_path / "hf_ref"
    r = _qforge("export", run, "--format", "hf", "--dtype", "fp32", "--out", hf)
    assert r.returncode == 0, r.stderr
    write_safetensors(tmp_path / "ids.safetensors", {"ids": ids})
    subprocess.run([interop_tool("interop_hf"), str(hf), str(tmp_path / "ids.safetensors"), str(tmp_path / "o.safetensors"),
                    "4"], check=True, capture_output=True)
    return read_safetensors(tmp_path / "o.safetensors")["logits"]


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_and_compressed_tensors_exports_load_in_transformers(tmp_path, kind, corpus):
    d = _checkpoint(tmp_path, kind, corpus, ffn=192)  # gptqmodel's kernel needs widths in multiples of 32
    calib = _recipe(tmp_path, "calib", d, corpus, "")
    r = _qforge("quantize", d, "--method", "gptq", "--quant", "int4-g16", "--calib", calib, "--samples", "16",
                "--no-eval", "--out", tmp_path / "q")
    assert r.returncode == 0, r.stderr[-3000:]
    ids = (torch.arange(2 * 12).reshape(2, 12) * 29 + 3) % 150
    want = _qforge_logits(tmp_path, tmp_path / "q", ids)
    for fmt in ("gptq", "compressed-tensors"):
        out = tmp_path / fmt
        r = _qforge("export", tmp_path / "q", "--format", fmt, "--out", out)
        assert r.returncode == 0, f"{kind} {fmt}: {r.stderr[-3000:]}"
        m = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32,
                                                         attn_implementation="eager").eval()
        with torch.no_grad():
            got = m(ids).logits
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * max(1.0, want.abs().max().item()), f"{kind} {fmt}: max |diff| {err}"


def test_conv1d_families_are_refused(tmp_path, corpus):
    d = _checkpoint(tmp_path, "gpt2", corpus)
    r = _qforge("export", d, "--format", "gptq", "--out", tmp_path / "g")
    assert r.returncode == 1 and "Conv1D" in r.stderr, r.stderr
    assert not (tmp_path / "g").exists()
