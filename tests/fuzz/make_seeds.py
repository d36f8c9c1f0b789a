#!/usr/bin/env python3
"""Writes the seed corpus of tests/fuzz/fuzz_safetensors.cpp into tests/fuzz/seeds/ (committed):
small valid safetensors files (several dtypes, an empty tensor, metadata) and a few classic
invalid ones (hole, overlap, duplicate key, truncated). Re-run after changing it."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")


def blob(header, data=b"", pad=True):
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {
        "valid_two": blob({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                           "b": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]},
                           "__metadata__": {"format": "pt"}}, bytes(19)),
        "valid_empty_tensor": blob({"e": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [0, 0]},
                                    "f": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}}, bytes(8)),
        "valid_f8": blob({"x": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)),
        "hole": blob({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, bytes(4)),
        "overlap": blob({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                         "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, bytes(4)),
        "duplicate": b"",  # filled below (json.dumps cannot write duplicate keys)
        "truncated": blob({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, bytes(20)),
    }
    dup = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    seeds["duplicate"] = struct.pack("<Q", len(dup)) + dup + b"\0"
    for name, data in seeds.items():
        with open(os.path.join(OUT, name + ".safetensors"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
