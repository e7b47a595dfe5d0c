"""Attention that reads a GGMLQuantizedCache as ggml's flash attention does, for transformers models.

transformers' own attention (eager/sdpa) is exact float attention on the dequantized cache. llama.cpp
runs ggml_flash_attn_ext on the stored rows instead: Q rotated like K (and, for a quantized K, rounded
to q8_0/q8_1 by the CPU's vec_dot), an fp16 accumulator for an f16 V, the output rotated back.
This module registers that math -- kvlab.accuracy.attention's "cpu"/"cuda" backends, the same
functions `attention_error` uses -- through transformers' AttentionInterface:

    from kvlab.hf.attention import attention_as
    with attention_as(model, "ggml-cpu"):     # "model": the model's own; restored on leaving
        model(ids, cache=GGMLQuantizedCache(model.config, "q8_0", "q8_0", flavor="cpu"), use_cache=True)

It needs the cache's bytes, so it works only with a GGMLQuantizedCache (the cache's layer hands itself
over in the forward's keyword arguments, see GGMLQuantizedLayer.update). Masks: causal (sdpa-style
boolean masks; masked keys are skipped, as ggml skips -inf mask entries). CPU, float32, slow next to
sdpa: it is a numerics model, for measuring, not for serving.
"""
from contextlib import contextmanager

import numpy as np
import torch

from kvlab.accuracy.attention import VCaches, attend_cache, unrotate
from kvlab.hf.cache import LAYER_KWARG, READS_ROWS, GGMLQuantizedLayer
from kvlab.quant import dequantize

ATTENTIONS = {"model": None, "ggml-cpu": "kvlab_ggml_cpu", "ggml-cuda": "kvlab_ggml_cuda"}


def ggml_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, backend: str,
                   **kwargs):
    """transformers attention signature; query (b, n_head, n_q, D), key/value (b, n_head_kv, L, D).

    Returns ((b, n_q, n_head, D) in query's dtype, None). key/value are not read: the stored bytes are.
    """
    layer = kwargs.get(LAYER_KWARG)
    if not isinstance(layer, GGMLQuantizedLayer):
        raise ValueError("the ggml attention reads a GGMLQuantizedCache's bytes: run the model with "
                         "cache=GGMLQuantizedCache(...) and use_cache=True")
    if dropout:
        raise ValueError("the ggml attention has no dropout (put the model in eval mode)")
    types, plan = layer.types, layer.plan
    b, n_head, n_q, d = query.shape
    scale = float(scaling if scaling is not None else d ** -0.5)
    k_raw = layer.quantized_keys.raw.cpu().numpy()              # (b, n_head_kv, L, row bytes)
    k_cache = dequantize(layer.quantized_keys).cpu().numpy()    # (b, n_head_kv, L, D) cache basis
    v_cache = dequantize(layer.quantized_values).cpu().numpy()  # (b, n_head_kv, L, D) cache basis
    q_rot = layer.to_cache_basis(query, plan.k, reorder=True).cpu().numpy()  # (b, n_head, n_q, D)
    n_head_kv, n_kv = k_cache.shape[1], k_cache.shape[2]
    keep = _keep(attention_mask, b, n_q, n_kv)                  # (b, n_q, L) bool
    out = np.empty((b, n_head, n_q, d), np.float32)
    for i in range(b):
        keep_rows = np.tile(keep[i], (n_head // n_head_kv, 1))   # (n_gqa * n_q, L): query row r is query r % n_q
        v_caches = VCaches({types.type_v: v_cache[i]})
        [(_, [(_, _, out_rot)])] = attend_cache(q_rot[i], (k_cache[i], k_raw[i]), types.type_k, v_caches, n_kv,
                                                backend, scale, keep=keep_rows)
        out[i] = unrotate(np.asarray(out_rot, np.float32), plan.v).reshape(n_head, n_q, d)  # from (G, n_gqa * n_q, D)
    return torch.from_numpy(out).transpose(1, 2).to(device=query.device, dtype=query.dtype), None


def _keep(mask, b: int, n_q: int, n_kv: int) -> np.ndarray:
    """(b, n_q, L) True where a query sees a key: a boolean sdpa-style mask, or causal when there is none."""
    if mask is None:  # sdpa_mask skips a purely causal mask: the queries are the last n_q positions
        q_pos = np.arange(n_kv - n_q, n_kv)[:, None]
        return np.broadcast_to(np.arange(n_kv)[None, :] <= q_pos, (b, n_q, n_kv))
    if mask.dtype != torch.bool or mask.shape[1] != 1:
        raise ValueError(f"the ggml attention takes a boolean (b, 1, n_q, L) mask, got {mask.dtype} {tuple(mask.shape)}")
    keep = mask[:, 0, :, -n_kv:].expand(b, n_q, n_kv).cpu().numpy()
    if not keep[..., 0].all():  # ggml's online softmax starts from the first cell; a causal mask keeps it
        raise ValueError("the ggml attention takes causal masks only (no left padding): every query must see key 0")
    return keep


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    for backend in ("cpu", "cuda"):
        name = ATTENTIONS[f"ggml-{backend}"]
        AttentionInterface.register(name, lambda *a, _b=backend, **kw: ggml_attention(*a, backend=_b, **kw))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
        READS_ROWS.add(name)


_register()


@contextmanager
def attention_as(model, attention: str):
    """Run `model` with an attention by kvlab's name inside the block: "ggml-cpu", "ggml-cuda", or "model"
    (the implementation it had when the block was entered); the model gets that one back on leaving."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}: expected one of {', '.join(ATTENTIONS)}")
    before = model.config._attn_implementation
    if ATTENTIONS[attention] is not None:
        model.set_attn_implementation(ATTENTIONS[attention])
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
