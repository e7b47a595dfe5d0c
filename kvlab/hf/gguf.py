"""Write a transformers Llama as a GGUF file llama.cpp loads, with gguf-py: same weights, float32.

What convert_hf_to_gguf.py (LlamaModel, llama.cpp 0.3.36) does for a Llama, and no more:
architecture "llama", the hyper-parameters llama.cpp reads, tensors under ggml's names, and Q/K
weights permuted for llama.cpp's RoPE. HF's Llama rotates channel pairs (j, j + head_dim/2)
(rotate_half, NEOX style); llama.cpp's LLM_ARCH_LLAMA rotates adjacent pairs (2j, 2j+1) (NORM
style), so the converter reorders the rows of each head of W_q and W_k: llama.cpp's channel 2j is
HF's j and 2j+1 is HF's j + head_dim/2 (`gguf_k_order`). Q.K is unchanged, but llama.cpp's K cache
holds each head in that order: its quantization blocks group other channels than HF's order does
(GGMLQuantizedCache(k_order="gguf") stores K as llama.cpp does).
No tokenizer: `tokenizer.ggml.model = "no_vocab"` with the vocabulary size; llama.cpp then takes
token ids only (its low-level API), which is all kvlab's comparisons need.
"""
from pathlib import Path

import numpy as np

from kvlab._io import atomic_path
from kvlab.hf.cache import gguf_k_order

TENSOR_NAMES = {  # transformers LlamaForCausalLM name -> GGUF name (gguf-py's TENSOR_NAMES for LLAMA)
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TENSOR_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in TENSOR_NAMES:
        return TENSOR_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model . layers . N . rest
    if parts[:2] != ["model", "layers"] or parts[3] not in LAYER_TENSOR_NAMES:
        raise ValueError(f"write_llama_gguf: no GGUF name for tensor {hf_name!r} (a plain Llama has none such)")
    return f"blk.{parts[2]}.{LAYER_TENSOR_NAMES[parts[3]]}"


def rope_permute(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: the rows of each head in llama.cpp's RoPE channel order."""
    out_features = weight.shape[0]
    heads = weight.reshape(out_features // head_dim, head_dim, -1)  # (n_head, head_dim, n_embd)
    return heads[:, gguf_k_order(head_dim), :].reshape(weight.shape)


def check_llama(config) -> None:
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type {config.model_type!r} (only 'llama')")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("biases")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r}")
    if config.tie_word_embeddings:
        problems.append("tied embeddings")
    if problems:
        raise ValueError("write_llama_gguf writes a plain Llama; this one has " + ", ".join(problems))


def write_llama_gguf(model, path) -> Path:
    """Write `model` (transformers LlamaForCausalLM) to `path` as a float32 GGUF; returns the path.

    The file is written under a temporary name and renamed, so a reader never sees half a file.
    """
    import gguf
    config = model.config
    check_llama(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("kvlab check model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("no_vocab")
    for name, tensor in model.state_dict().items():
        w = tensor.detach().to("cpu").float().numpy()
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            w = rope_permute(w, head_dim)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(w))
    with atomic_path(path) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)
