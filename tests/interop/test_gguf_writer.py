"""qforge's GGUF v3 container writer (export/gguf_writer.cpp) read back by gguf-py's GGUFReader:
metadata of every value type qforge writes comes back with the same values, every tensor with its
name, shape, ggml type and alignment, and gguf-py's dequantization of the tensor bytes equals
qforge's own (bit-exact). Loading into llama.cpp itself comes with the model exporter."""
import subprocess

import gguf  # a missing peer fails here, loudly
import numpy as np

from st_io import interop_tool, read_safetensors


def _field(r, key):
    f = r.fields[key]
    return f


def test_gguf_writer_round_trips_through_gguf_py(tmp_path):
    out, ref = tmp_path / "t.gguf", tmp_path / "ref.safetensors"
    subprocess.run([interop_tool("interop_gguf"), str(out), str(ref)], check=True)
    r = gguf.GGUFReader(str(out))
    assert r.alignment == 64
    s = lambda k: _field(r, k).contents()
    assert s("general.architecture") == "llama"
    assert s("general.name") == "qforge gguf writer test ✓"
    assert s("test.u32") == 4000000000 and s("test.i32") == -7 and s("test.u64") == 1 << 40
    assert s("test.f32") == 0.25 and s("test.bool") is True
    assert s("test.strings") == ["<s>", "▁the", "", "中"]
    assert s("test.f32s") == [0.0, -1.5, 3.25] and s("test.i32s") == [1, -2, 3]
    types = {f.name: f.types for f in r.fields.values()}
    assert types["test.u32"] == [gguf.GGUFValueType.UINT32] and types["test.i32s"][0] == gguf.GGUFValueType.ARRAY
    want = read_safetensors(ref)
    expect_type = {"t.f32": "F32", "t.f16": "F16", "t.q8_0": "Q8_0", "t.q4_0": "Q4_0", "t.q4_1": "Q4_1", "t.q4_k": "Q4_K",
                   "t.q6_k": "Q6_K", "t.q8_0_1d": "Q8_0"}
    assert sorted(t.name for t in r.tensors) == sorted(expect_type)
    for t in r.tensors:
        assert t.tensor_type.name == expect_type[t.name], t.name
        assert t.data_offset % 64 == 0, t.name
        w = want[t.name].numpy()
        assert list(reversed([int(x) for x in t.shape])) == list(w.shape), t.name  # gguf-py: ne0 first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape).astype(np.float32)
        assert np.array_equal(got, w), t.name
