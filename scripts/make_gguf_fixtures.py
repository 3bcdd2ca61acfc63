#!/usr/bin/env python3
"""Makes the GGUF parity fixtures under tests/fixtures/gguf/ (run by hand; cargo test never needs
Python), with the `gguf` package (llama.cpp's gguf-py) as the reference.

    pip install "gguf==0.19.0" safetensors numpy torch
    python3 scripts/make_gguf_fixtures.py

types.gguf: one tensor per ggml type the crate reads, the quantized ones made of random block
bytes (their f16 scales set to finite values), a 3-D tensor, and metadata of every value type
(nested arrays included). expected.safetensors: each tensor as `gguf.quants.dequantize` gives it
(f32, in numpy's shape order). llama.gguf and llama-io.safetensors: see llama_gguf().
tokenizer-*.gguf and tokenizer-expected.json (`--tokenizer`): see tokenizer_gguf().
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
    llama_gguf()


def permute(w, n_head):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_gguf():
    """The tiny bf16 Llama of tests/fixtures/bnb/llama-src as a GGUF file with llama.cpp's names,
    q/k permutation and a mix of types (llama.gguf), and the logits transformers computes from
    that file (`from_pretrained(dir, gguf_file=...)`, f32, eager attention) in llama-io.safetensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    src = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bnb", "llama-src")
    cfg = LlamaConfig.from_pretrained(src)
    sd = {k: v.float().numpy() for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    path = os.path.join(OUT, "llama.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    types = {"attn_q": T.Q8_0, "attn_k": T.Q4_0, "attn_v": T.Q4_1, "attn_output": T.Q5_0,
             "ffn_gate": T.Q5_1, "ffn_up": T.Q8_0, "ffn_down": T.Q4_0}

    def put(name, arr, qtype):
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if qtype == T.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"], T.Q8_0)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], T.F32)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], T.F32)
        for g, h in hf.items():
            wt = sd[p + h + ".weight"]
            if g == "attn_q":
                wt = permute(wt, cfg.num_attention_heads)
            elif g == "attn_k":
                wt = permute(wt, cfg.num_key_value_heads)
            put(f"blk.{i}.{g}.weight", wt, types[g])
    put("output_norm.weight", sd["model.norm.weight"], T.F32)
    put("output.weight", sd["lm_head.weight"], T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = AutoModelForCausalLM.from_pretrained(OUT, gguf_file="llama.gguf", dtype=torch.float32,
                                             attn_implementation="eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    from safetensors.torch import save_file as save_torch
    save_torch({"input_ids": ids, "logits": logits.contiguous()}, os.path.join(OUT, "llama-io.safetensors"))


TEXTS = [
    "Hello world", " Hello world", "hello, World! It's 2026-12-03 and 12345 + 678 = 13023.",
    "Tokenizers split   runs of spaces\tand\nnew lines\r\n", "naïve café, Zürich — “quotes”",
    "中文字符和日本語のテキスト", "emoji 🚀🔥 and <|im_start|>user\nhi<|im_end|>", "", "  leading",
    "it's they're we've I'm you'll he'd", "<think>reasoning</think> done",
]


def tokenizer_gguf():
    """A small byte-level BPE vocabulary (trained here with the `tokenizers` package on a few
    lines) as llama.cpp writes one into a GGUF file (`tokenizer.ggml.model` "gpt2": tokens,
    token types with control and user-defined tokens, merges, special ids) in
    tokenizer-<pre>.gguf, for a `tokenizer.ggml.pre` transformers splits with its own regex
    ("llama-bpe") and one it leaves to the byte-level default ("smollm"), and the first again
    with `add_bos_token` (tokenizer-llama-bpe-bos.gguf); and
    tokenizer-expected.json: the ids transformers' tokenizer from each file
    (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) gives for TEXTS, and its decoding."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    corpus = [t * 3 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 4,
                                        "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000", "ÄÖÜ äöü ß é è ê"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    tokens += ["<think>", "</think>"]  # user-defined, as llama.cpp marks added tokens
    types = [3 if t in special else 4 if t in ("<think>", "</think>") else 1 for t in tokens]
    expected = {}
    for pre, bos in (("llama-bpe", False), ("smollm", False), ("llama-bpe", True)):
        key = pre + ("-bos" if bos else "")
        name = f"tokenizer-{key}.gguf"
        w = gguf.GGUFWriter(os.path.join(OUT, name), "llama")
        w.add_context_length(2048)
        w.add_embedding_length(64)
        w.add_block_count(1)
        w.add_feed_forward_length(128)
        w.add_head_count(4)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(bos)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        t = AutoTokenizer.from_pretrained(OUT, gguf_file=name)
        ids = [t(x, add_special_tokens=True)["input_ids"] for x in TEXTS]
        expected[key] = {"texts": TEXTS, "ids": ids,
                         "decoded": [t.decode(i, skip_special_tokens=False) for i in ids]}
    with open(os.path.join(OUT, "tokenizer-expected.json"), "w") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    import sys

    if "--tokenizer" in sys.argv:
        tokenizer_gguf()
    else:
        main()
