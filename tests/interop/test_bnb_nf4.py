"""qforge's NF4 (quant/nf4.cpp) against bitsandbytes itself: for random tensors of several shapes
and dtypes, the packed 4-bit bytes, the double-quantized absmax codes, the nested absmax, the
offset and the dequantized values must be identical to bitsandbytes.functional.quantize_4bit(...,
quant_type="nf4", compress_statistics=True) / dequantize_4bit on CPU (and without double quant).

bitsandbytes 0.50.2's CPU dequantize_4bit kernel disagrees with its own quantizer (and with its
CUDA and torch backends) when blocks span rows (row width not a multiple of the blocksize):
e.g. [64, 64] at blocksize 256 reads the wrong scale for 80% of the values. For those shapes the
expected values are built from bitsandbytes' pieces instead: its NF4 code table indexed by its
packed codes, times its dequantized block scales (dequantize_blockwise of the nested statistics
plus the offset), i.e. what its CUDA kernel and its default backend compute."""
import subprocess

import bitsandbytes.functional as F  # a missing peer fails here, loudly
import pytest
import torch

from st_io import interop_tool, read_safetensors, write_safetensors

SHAPES = [(64, 64), (128, 256), (256, 704), (704, 256), (3, 1000), (4096, 33), (1, 4160)]


def _cases():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, shape in enumerate(SHAPES):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(shape, generator=g) * (0.02 if i % 2 else 1.0)
            if i == 2:
                x[0, :64] = 0  # an all-zero block
            if i == 3:
                x = x + torch.randn(shape[0], 1, generator=g) * 3  # rows with their own scale
            out[f"t{i}_{str(dt).split('.')[-1]}"] = x.to(dt)
    return out


def _bnb_dequant(x, q, st, blocksize):
    if x.shape[-1] % blocksize == 0:
        return F.dequantize_4bit(q, st)
    scales = F.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
    b = q.reshape(-1)
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[: x.numel()].long()
    vals = st.code[codes].float() * scales.float().repeat_interleave(blocksize)[: x.numel()]
    return vals.reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("blocksize", [64, 32, 256])
def test_nf4_matches_bitsandbytes(tmp_path, blocksize):
    cases = _cases()
    write_safetensors(tmp_path / "in.safetensors", cases)
    subprocess.run([interop_tool("interop_nf4"), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                    str(blocksize)], check=True)
    ours = read_safetensors(tmp_path / "out.safetensors")
    code = F.create_dynamic_map(signed=True)
    assert torch.equal(ours["dynamic_map"], code)
    for name, x in cases.items():
        q, st = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        assert torch.equal(ours[f"{name}/packed"], q.reshape(-1)), name
        assert torch.equal(ours[f"{name}/absmax"], st.absmax), name
        assert torch.equal(ours[f"{name}/nested_absmax"], st.state2.absmax), name
        assert torch.equal(ours[f"{name}/offset"], st.offset.reshape(1)), name
        dq = _bnb_dequant(x, q, st, blocksize)
        assert torch.equal(ours[f"{name}/dq"].reshape(dq.shape), dq), name
        q2, st2 = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        assert torch.equal(ours[f"{name}/absmax_plain"], st2.absmax), name
        dq2 = _bnb_dequant(x, q2, st2, blocksize)
        assert torch.equal(ours[f"{name}/dq_plain"].reshape(dq2.shape), dq2), name
