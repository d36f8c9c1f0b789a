"""Minimal safetensors read/write for the interop tests (the `safetensors` package is not a
dependency): u64-LE header length, JSON header, raw little-endian bytes. Accepts torch tensors or
numpy arrays; read() returns torch tensors, read_numpy() numpy arrays (F32/U8/I32 only)."""
import json
import struct

import numpy as np
import torch

_DT = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
       torch.int64: "I64", torch.int8: "I8", torch.float64: "F64"}
_TD = {v: k for k, v in _DT.items()}


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(t))
        b = t.detach().contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DT[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out, base = {}, 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = torch.frombuffer(bytearray(data[base + a:base + b]), dtype=torch.uint8)
        out[name] = raw.view(_TD[info["dtype"]]).reshape(info["shape"])
    return out


def read_safetensors_numpy(path):
    return {k: v.numpy() for k, v in read_safetensors(path).items()}


def interop_tool(name):
    """Path of a C++ interop driver built under $QFORGE_BUILD_DIR/interop/ (ctest sets the variable)."""
    import os
    build = os.environ.get("QFORGE_BUILD_DIR")
    assert build, "QFORGE_BUILD_DIR is not set; point it at the CMake build directory (ctest sets it)"
    path = os.path.join(build, "interop", name)
    assert os.path.isfile(path) and os.access(path, os.X_OK), f"{path} is missing or not executable; build the {name} target"
    return path
