#!/usr/bin/env python3
"""Makes the GGUF parity fixtures under tests/fixtures/gguf/ (run by hand; cargo test never needs
Python), with the `gguf` package (llama.cpp's gguf-py) as the reference.

    pip install "gguf==0.19.0" safetensors numpy torch
    python3 scripts/make_gguf_fixtures.py

types.gguf: one tensor per ggml type the crate reads, the quantized ones made of random block
bytes (their f16 scales set to finite values), a 3-D tensor, and metadata of every value type
(nested arrays included). expected.safetensors: each tensor as `gguf.quants.dequantize` gives it
(f32, in numpy's shape order).
"""
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf")

# byte offsets of the f16 scales in each block type
SCALES = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q4_K: [0, 2], T.Q6_K: [208]}


def quantized(rng, qtype, shape):
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    raw = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    for off in SCALES[qtype]:
        scale = (rng.standard_normal(raw.shape[0]) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], cols // block * nbytes)


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(os.path.join(OUT, "types.gguf"), "llama")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_uint64("test.u64", 2**60)
    w.add_int64("test.i64", -(2**60))
    w.add_float32("test.f32", 0.15625)
    w.add_float64("test.f64", -2.5e-300)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo")
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.i32s", [1, -2, 3])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_context_length(2048)
    expected = {}

    def add(name, arr, raw_dtype=None, shape=None):
        if raw_dtype is None:
            w.add_tensor(name, arr)
            expected[name] = arr.astype(np.float32)
        else:
            w.add_tensor(name, arr, raw_dtype=raw_dtype)
            expected[name] = gguf.quants.dequantize(arr, raw_dtype).astype(np.float32)

    add("f32", rng.standard_normal((3, 8)).astype(np.float32))
    add("f16", rng.standard_normal((2, 16)).astype(np.float16))
    bf = (rng.standard_normal((2, 16)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    w.add_tensor("bf16", bf, raw_dtype=T.BF16)
    expected["bf16"] = (bf.astype(np.uint32) << 16).view(np.float32)
    for qtype, shape in [(T.Q8_0, (2, 64)), (T.Q4_0, (2, 64)), (T.Q4_1, (2, 64)), (T.Q5_0, (2, 64)),
                         (T.Q5_1, (2, 64)), (T.Q4_K, (2, 256)), (T.Q6_K, (2, 512)), (T.Q8_0, (2, 3, 32))]:
        name = qtype.name.lower() + ("_3d" if len(shape) == 3 else "")
        add(name, quantized(rng, qtype, shape), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file({k: np.ascontiguousarray(v) for k, v in expected.items()}, os.path.join(OUT, "expected.safetensors"))
    r = gguf.GGUFReader(os.path.join(OUT, "types.gguf"))
    print("wrote", OUT, [(t.name, t.tensor_type.name, list(t.shape)) for t in r.tensors])


if __name__ == "__main__":
    main()
