"""The attention that reads a bytes-only GGMLQuantizedCache (storage="bytes", cache.GGMLBytesLayer).

    from kvlab.hf import GGMLQuantizedCache
    from kvlab.hf.bytes_attention import use_bytes_attention
    use_bytes_attention(model)                      # the "kvlab_ggml_bytes" attention below
    cache = GGMLQuantizedCache(model.config, "q4_0", "q4_0")     # storage="bytes", the default
    model.generate(ids, cache=cache, max_new_tokens=20)

Attention ("kvlab_ggml_bytes", registered with transformers' AttentionInterface):
- decode (one query per sequence): kvlab.flash.flash_decode on the stored bytes (CPU: ggml-cpu's
  flash_attn_ext numerics; CUDA: ggml-cuda's vector kernel numerics), Q in the cache's basis (rotated
  with H_k), the output rotated back with H_v, as llama.cpp's build_attn.
- prompt batches: one KV head at a time, its rows are dequantized to the model's dtype and given to
  torch's scaled_dot_product_attention with the model's mask, then dropped: what attention reads
  equals the float-storage cache's values. (ggml runs flash_attn_ext on the whole batch instead: the
  CPU backend the same per-row loop, ggml-cuda its tile/MMA kernels with f16 Q and probabilities.)
"""
import torch

from kvlab.flash import flash_decode
from kvlab.hf.cache import LAYER_KWARG, READS_ROWS, GGMLBytesLayer
from kvlab.quant import QTensor
from kvlab.rotation import rotate

ATTENTION_NAME = "kvlab_ggml_bytes"  # no "flash" in it: transformers reads that as a flash-attn kernel


def bytes_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature; query (b, n_head, n_q, D). key/value are the bytes layer's
    placeholders: the stored rows are read through the layer (kwargs[LAYER_KWARG]).
    Returns ((b, n_q, n_head, Dv) in query's dtype, None)."""
    layer = kwargs.get(LAYER_KWARG)
    if not isinstance(layer, GGMLBytesLayer):
        raise ValueError(f"the {ATTENTION_NAME} attention reads a GGMLQuantizedCache(storage='bytes'): run the "
                         "model with cache=GGMLQuantizedCache(..., storage='bytes') and use_cache=True")
    if dropout:
        raise ValueError(f"the {ATTENTION_NAME} attention has no dropout (put the model in eval mode)")
    b, n_head, n_q, d = query.shape
    scale = float(scaling if scaling is not None else d ** -0.5)
    if n_q == 1:
        keep = None if attention_mask is None else _keep(attention_mask, layer.cumulative_length)[:, 0]
        q = layer.to_cache_basis(query[:, :, 0], layer.plan.k, reorder=True)   # (b, n_head, D) float32
        out = flash_decode(q, layer.keys_raw, layer.values_raw, layer.types.type_k, layer.types.type_v,
                           mask=keep, scale=scale)                                # (b, n_head, Dv) float32
        out = rotate(out, layer.plan.v) if layer.plan.v else out
        return out.to(device=query.device, dtype=query.dtype)[:, None], None
    return _prompt_attention(layer, query, attention_mask, scale), None


def _keep(mask, n_kv: int) -> torch.Tensor:
    """(b, n_q, L) bool from transformers' sdpa mask (b, 1, n_q, >= L), True = attend."""
    if mask.dtype != torch.bool or mask.shape[1] != 1:
        raise ValueError(f"the {ATTENTION_NAME} attention takes a boolean (b, 1, n_q, L) mask, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask[:, 0, :, -n_kv:]


def _prompt_attention(layer, query, attention_mask, scale):
    """Several queries: one KV head at a time, dequantized rows -> the model's dtype -> sdpa."""
    b, n_head, n_q, _ = query.shape
    n_kv = layer.cumulative_length
    k_q, v_q = layer.quantized_keys, layer.quantized_values
    n_head_kv = k_q.shape[1]
    group = n_head // n_head_kv
    causal = attention_mask is None and n_q == n_kv      # sdpa's own causal mask (no (n_q, L) tensor)
    if causal:
        keep = None
    elif attention_mask is None:   # sdpa_mask skipped a purely causal mask: the queries are the last n_q rows
        rows = torch.arange(n_kv - n_q, n_kv, device=query.device)[:, None]
        keep = (torch.arange(n_kv, device=query.device)[None] <= rows)[None, None]   # (1, 1, n_q, L)
    else:
        keep = _keep(attention_mask, n_kv)[:, None]                                 # (b, 1, n_q, L)
    out = query.new_empty(b, n_q, n_head, layer.head_dims[1])
    for h in range(n_head_kv):
        k = _head_values(k_q, h, layer, layer.plan.k, True, query.dtype)    # (b, 1, L, Dk)
        v = _head_values(v_q, h, layer, layer.plan.v, False, query.dtype)   # (b, 1, L, Dv)
        q = query[:, h * group:(h + 1) * group]                              # (b, group, n_q, Dk)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k.expand(b, group, n_kv, k.shape[-1]), v.expand(b, group, n_kv, v.shape[-1]),
            attn_mask=keep, is_causal=causal, scale=scale)                   # (b, group, n_q, Dv)
        out[:, :, h * group:(h + 1) * group] = o.transpose(1, 2)
    return out


def _head_values(q: QTensor, h: int, layer, rotation, reorder: bool, dtype) -> torch.Tensor:
    """One KV head's rows as attention reads them: dequantized, rotated back, in the model's order."""
    raw = q.raw[:, h:h + 1]                                                 # (b, 1, L, row_bytes)
    head = QTensor.from_raw(raw.contiguous(), q.type, raw.shape[:-1] + (q.shape[-1],), q.flavor)
    return layer._dequantize(head, rotation, reorder).to(dtype)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, bytes_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    READS_ROWS.add(ATTENTION_NAME)


_register()


def use_bytes_attention(model) -> str:
    """Switch `model` to the attention that reads a bytes-only cache; returns the implementation it had."""
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    return before
