"""random_llama_gguf.py PATH: a random-weight Llama-3.2-1B-shaped GGUF (f16 weights, no vocab) for llama-bench
vocab 128256, hidden 2048, ffn 8192, 16 layers, 32 heads, 8 KV heads, head_dim 64 (the HF bench's shape)."""
import os
import sys

import numpy as np
import gguf

V, E, F, L, H, HKV, D = 128256, 2048, 8192, 16, 32, 8, 64
rng = np.random.default_rng(0)
tmp = sys.argv[1] + ".tmp"       # renamed when whole: a reader never sees half a file
w = gguf.GGUFWriter(tmp, "llama")
w.add_name("kvlab random 1B")
w.add_context_length(131072)
w.add_embedding_length(E)
w.add_block_count(L)
w.add_feed_forward_length(F)
w.add_head_count(H)
w.add_head_count_kv(HKV)
w.add_key_length(D)
w.add_value_length(D)
w.add_rope_dimension_count(D)
w.add_rope_freq_base(500000.0)
w.add_layer_norm_rms_eps(1e-5)
w.add_vocab_size(V)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
w.add_tokenizer_model("no_vocab")


def mat(rows, cols):
    return (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float16)


w.add_tensor("token_embd.weight", mat(V, E))
w.add_tensor("output_norm.weight", np.ones(E, np.float32))
w.add_tensor("output.weight", mat(V, E))
for i in range(L):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(E, np.float32))
    w.add_tensor(p + "ffn_norm.weight", np.ones(E, np.float32))
    w.add_tensor(p + "attn_q.weight", mat(H * D, E))
    w.add_tensor(p + "attn_k.weight", mat(HKV * D, E))
    w.add_tensor(p + "attn_v.weight", mat(HKV * D, E))
    w.add_tensor(p + "attn_output.weight", mat(E, H * D))
    w.add_tensor(p + "ffn_gate.weight", mat(F, E))
    w.add_tensor(p + "ffn_up.weight", mat(F, E))
    w.add_tensor(p + "ffn_down.weight", mat(E, F))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
os.replace(tmp, sys.argv[1])
print("gguf written", sys.argv[1], flush=True)
