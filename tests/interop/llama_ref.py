"""llama.cpp itself as the reference, from the llama-cpp-python wheel scripts/setup.sh builds
(vendored llama.cpp 0c1e570):
  * quantize(type, x, imatrix=None): ggml_quantize_chunk from libggml-base.so. Without an importance
    matrix it runs quantize_row_<type>_ref for every type used here (ggml-quants.c), the quantizer
    llama-quantize uses; with one (float32 [cols]) quantize_<type>'s weighted path, as
    llama-quantize --imatrix does.
  * dequantize(type, blocks, rows, cols): the type's to_float (ggml_get_type_traits), for the types
    gguf-py 0.19 cannot dequantize (Q1_0, Q2_0).
  * llama_quantize(src, dst, ftype, imatrix=None, pure=False): llama_model_quantize, i.e. the
    llama-quantize tool (per-tensor type choice, shape fallbacks and all); `imatrix` {tensor name:
    float32 [cols]} is what tools/quantize hands it after reading an imatrix file (--imatrix).
A missing wheel is a failure (ImportError / OSError), never a skip."""
import ctypes
import importlib.util
from pathlib import Path

import numpy as np

GGML_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
             "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23, "TQ1_0": 34, "TQ2_0": 35, "Q1_0": 41,
             "Q2_0": 42}
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
               "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q2_k_s": 21,
               "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "tq1_0": 36, "tq2_0": 37, "q1_0": 40, "q2_0": 41}
_lib = None


def _ggml():
    global _lib
    if _lib is None:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.origin:
            raise ImportError("llama_cpp (llama-cpp-python) is not installed in the venv; run scripts/setup.sh")
        _lib = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        _lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        _lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        _lib.ggml_row_size.restype = ctypes.c_size_t
        _lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        _lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return _lib


class _TypeTraits(ctypes.Structure):  # ggml.h struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


def dequantize(type_name, blocks, rows, cols):
    """ggml's block bytes of a [rows, cols] tensor -> float32 [rows, cols] through the type's to_float."""
    t = GGML_TYPE[type_name.upper()]
    raw = bytes(blocks)
    assert len(raw) == int(_ggml().ggml_row_size(t, cols)) * rows
    src = ctypes.create_string_buffer(raw, len(raw))
    out = np.empty((rows, cols), np.float32)
    _ggml().ggml_get_type_traits(t).contents.to_float(ctypes.addressof(src), out.ctypes.data, rows * cols)
    return out


def quantize(type_name, x, imatrix=None):
    """float32 [rows, cols] (and an optional float32 [cols] importance matrix) -> ggml's block bytes
    (rows * row_size)."""
    t = GGML_TYPE[type_name.upper()]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    n = int(_ggml().ggml_row_size(t, cols)) * rows
    out = ctypes.create_string_buffer(n)
    im = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (cols,), imatrix.shape
        im = imatrix.ctypes.data
    got = _ggml().ggml_quantize_chunk(t, x.ctypes.data, ctypes.addressof(out), 0, rows, cols, im)
    assert got == n, (got, n)
    return out.raw


def llama_quantize(src, dst, ftype, nthread=2, imatrix=None, pure=False, output_type=None, token_embd_type=None):
    """llama-quantize SRC DST FTYPE [--imatrix] [--pure] [--output-tensor-type T] [--token-embedding-type T]
    through the library call the tool makes (T: a GGML_TYPE name); raises on failure."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = LLAMA_FTYPE[ftype]
    p.nthread = nthread
    p.pure = pure
    if output_type:
        p.output_tensor_type = GGML_TYPE[output_type.upper()]
    if token_embd_type:
        p.token_embedding_type = GGML_TYPE[token_embd_type.upper()]
    if imatrix:  # entries + the {NULL, NULL, 0} terminator, kept alive until the call returns
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
        for i, (k, v) in enumerate(arrays.items()):
            entries[i].name = k.encode()
            entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = v.size
        p.imatrix = entries
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {ftype}) returned {rc}")
