"""A Hugging Face transformers KV cache that stores K and V as llama.cpp does: ggml bytes, rotated.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kvlab.hf.cache import GGMLQuantizedCache

    model = AutoModelForCausalLM.from_pretrained("/models/Qwen2.5-0.5B", local_files_only=True)
    tok = AutoTokenizer.from_pretrained("/models/Qwen2.5-0.5B", local_files_only=True)
    cache = GGMLQuantizedCache(model.config, type_k="q4_0", type_v="q8_0")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, cache=cache, max_new_tokens=20)
    cache.layers[0].quantized_keys          # QTensor: the ggml bytes of layer 0's K cache

Real weights: any local directory `from_pretrained` accepts (config.json + safetensors +
tokenizer files, e.g. a `huggingface-cli download` snapshot) works, offline with
`local_files_only=True`; `kvlab eval --model DIR --text FILE` measures a K/V pair on it.
Models whose layers are all full attention are supported (as transformers' own QuantizedCache);
head_dim must be a multiple of 32 (the ggml block size).

How a layer follows llama.cpp (src/llama-graph.cpp build_attn, src/llama-kv-cache.cpp):
every new K/V row is written in the cache's ggml type before attention reads it (ggml_set_rows),
so the tokens of the current batch are also seen quantized, and rows are never re-quantized.
Rotation follows `kvlab.rotation_plan` (the attn_rot_k/attn_rot_v gate, LLAMA_ATTN_ROT_DISABLE).
llama.cpp rotates Q and K with H_k, stores K H_k, and computes (Q H_k) deq(K H_k)^T; it stores
V H_v and rotates the attention output back with H_v. Inside a transformers model Q cannot be
reached from the cache, so this cache stores K H_k and hands attention deq(K H_k) H_k, and
V likewise deq(V H_v) H_v. Since H is symmetric with H H = I, Q (deq(K H) H)^T = (Q H) deq(K H)^T
and softmax . (deq(V H) H) = (softmax . deq(V H)) H: the same attention, up to float rounding.

Identical to llama.cpp: the bytes stored for a given float32 K/V row (kvlab's kernels, by
flavor; a row here is one head of one token, and ggml's blocks never straddle heads, so the
bytes equal llama.cpp's per-token rows cut per head), the rotation gate and sizes, quantizing
the current batch before attention. Not identical: the K/V floats themselves (transformers
computes the projections and RoPE, not ggml), the rotation's rounding (kvlab.rotate is a
float32 FWHT; ggml rotates with mul_mat or its backends' FWHT paths, in their own order),
the extra H applied on read instead of to Q and to the output, and the attention kernel
(transformers' eager/sdpa in the model's dtype, not ggml's flash attention with its f16 Q and
accumulators). A model running in f16/bf16 gives its K/V to the quantizer as float32 (exact)
and gets the dequantized values back rounded to its dtype.
"""
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, get_layer_types_and_kwargs

from kvlab.quant import QTensor, check_head_dim, dequantize, quantize
from kvlab.rotation import rotate, rotation_plan
from kvlab.types import flavor_code, type_info


K_ORDERS = ("model", "gguf")
STORAGES = ("bytes", "floats")
# The name under which a layer hands itself to the attention function (kvlab.hf.attention).
LAYER_KWARG = "kvlab_cache_layer"
# transformers attention implementations (AttentionInterface names) that read a layer's stored rows through
# LAYER_KWARG themselves (kvlab.hf.bytes_attention, kvlab.hf.attention register theirs): a bytes-only layer
# hands them placeholders instead of dequantizing the whole cache for them.
READS_ROWS: set[str] = set()


def gguf_k_order(head_dim: int) -> np.ndarray:
    """Channel order of a K head in llama.cpp's cache for a Llama converted by convert_hf_to_gguf.

    The converter permutes W_q/W_k rows (LlamaModel.permute) so llama.cpp's NORM RoPE (pairs 2j, 2j+1)
    equals HF's rotate_half (pairs j, j + head_dim/2): llama.cpp's channel 2j is HF's j, 2j+1 is HF's
    j + head_dim/2. Returns order with k_llama = k_hf[..., order].
    """
    return np.arange(head_dim).reshape(2, head_dim // 2).T.reshape(-1)  # (2, D/2) -> (D/2, 2) -> (D,)


@dataclass(frozen=True)
class CacheTypes:
    """What a GGMLQuantizedCache stores: the K and V types, the code path writing them, the rotation."""
    type_k: str = "f16"
    type_v: str = "f16"
    flavor: str = "ref"
    rotation: bool | None = None  # None: llama.cpp's default (on, unless LLAMA_ATTN_ROT_DISABLE)
    k_order: str = "model"        # "gguf": K heads stored in llama.cpp's channel order (gguf_k_order)

    def __post_init__(self):
        type_info(self.type_k)
        type_info(self.type_v)
        flavor_code(self.flavor)
        if self.rotation not in (None, True, False):
            raise TypeError(f"rotation must be None, True or False, got {self.rotation!r}")
        if self.k_order not in K_ORDERS:
            raise ValueError(f"k_order must be one of {', '.join(K_ORDERS)}, got {self.k_order!r}")


class GGMLQuantizedLayer(BaseQuantizedLayer):
    """One attention layer's cache: ggml bytes of K and V, and their dequantized, un-rotated values.

    `keys`/`values` (batch, n_kv_heads, seq, head_dim) are what attention reads; `quantized_keys` /
    `quantized_values` are the stored ggml rows, (batch, n_kv_heads, seq, row_bytes).
    """

    # Each row is quantized once, on its own, and never rewritten: dropping rows undoes appending them.
    is_croppable = True

    def __init__(self, types: CacheTypes):
        super().__init__()
        self.types = types
        self.plan = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for what, states, type_name in (("K", key_states, self.types.type_k), ("V", value_states, self.types.type_v)):
            block = type_info(type_name).block_size
            if states.shape[-1] % block:
                raise ValueError(f"GGMLQuantizedCache: {what} head_dim {states.shape[-1]} is not a multiple of "
                                 f"{type_name}'s block size {block}")
        self.device = key_states.device
        self.k_order = None
        if self.types.k_order == "gguf":
            order = torch.as_tensor(gguf_k_order(key_states.shape[-1]), device=key_states.device)
            self.k_order = (order, torch.argsort(order))  # (to llama.cpp's order, back to the model's)
        self.plan = rotation_plan(self.types.type_k, self.types.type_v, key_states.shape[-1], value_states.shape[-1],
                                  disable=None if self.types.rotation is None else not self.types.rotation)
        self.keys = key_states.new_empty(key_states.shape[:-2] + (0, key_states.shape[-1]))
        self.values = value_states.new_empty(value_states.shape[:-2] + (0, value_states.shape[-1]))
        self._quantized_keys = self._empty_rows(key_states, self.types.type_k)
        self._quantized_values = self._empty_rows(value_states, self.types.type_v)
        self.is_initialized = True

    @staticmethod
    def _empty_rows(states: torch.Tensor, type_name: str) -> torch.Tensor:
        row_bytes = type_info(type_name).row_bytes(states.shape[-1])
        return torch.empty(states.shape[:-2] + (0, row_bytes), dtype=torch.uint8, device=states.device)

    def to_cache_basis(self, states: torch.Tensor, rotation: int | None, reorder: bool) -> torch.Tensor:
        """float32 rows in the basis the cache stores: K heads in k_order's channel order, then rotated.

        Applied to Q as well by an attention that reads the stored K as llama.cpp does (kvlab.hf.attention).
        """
        x = states.detach().to(torch.float32)
        if reorder and self.k_order is not None:
            x = x[..., self.k_order[0]]
        return rotate(x, rotation) if rotation else x

    def _quantize(self, states: torch.Tensor, type_name: str, rotation: int | None, reorder: bool) -> QTensor:
        """ggml_set_rows' bytes for new rows: float32 in the cache's basis, then quantized."""
        return quantize(self.to_cache_basis(states, rotation, reorder), type_name, self.types.flavor)

    def _dequantize(self, q: QTensor, rotation: int | None, reorder: bool) -> torch.Tensor:
        """What attention reads from stored rows: dequantized, rotated back, in the model's order (float32)."""
        y = dequantize(q)
        y = rotate(y, rotation) if rotation else y
        return y[..., self.k_order[1]] if reorder and self.k_order is not None else y

    # torch.compile cannot trace the Numba kernels (dynamo walks into numba's compiler and fails): the
    # cache update runs eagerly, as a graph break, and the rest of the model compiles around it.
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new rows in the cache's types (set_rows), return all K and V as attention reads them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        # transformers' attention modules pass their **kwargs dict to the cache and then unpack the same
        # dict into the attention function: an attention that reads the bytes (kvlab.hf.attention) finds
        # this layer there. Other attention functions ignore the extra keyword.
        forward_kwargs = kwargs.get("kwargs")
        if isinstance(forward_kwargs, dict):
            forward_kwargs[LAYER_KWARG] = self
        qk = self._quantize(key_states, self.types.type_k, self.plan.k, reorder=True)
        qv = self._quantize(value_states, self.types.type_v, self.plan.v, reorder=False)
        # Stored rows never change, so only the new ones are dequantized; the rest is kept from before.
        new_k = self._dequantize(qk, self.plan.k, reorder=True).to(device=self.device, dtype=key_states.dtype)
        new_v = self._dequantize(qv, self.plan.v, reorder=False).to(device=self.device, dtype=value_states.dtype)
        self._quantized_keys = torch.cat([self._quantized_keys, qk.raw.to(self.device)], dim=-2)
        self._quantized_values = torch.cat([self._quantized_values, qv.raw.to(self.device)], dim=-2)
        self.keys = torch.cat([self.keys, new_k], dim=-2)
        self.values = torch.cat([self.values, new_v], dim=-2)
        return self.keys, self.values

    def _check_written(self, what: str) -> None:
        if not self.is_initialized:
            raise ValueError(f"{what}: this layer holds no rows yet (it is filled by the model's first forward)")

    @property
    def quantized_keys(self) -> QTensor:
        """The K cache's ggml bytes (rotated when plan.k is set, channels in k_order), one row per (batch, head, token)."""
        self._check_written("quantized_keys")
        return QTensor.from_raw(self._quantized_keys, self.types.type_k,
                                self._quantized_keys.shape[:-1] + (self.keys.shape[-1],), self.types.flavor)

    @property
    def quantized_values(self) -> QTensor:
        """The V cache's ggml bytes (rotated when plan.v is set), one row per (batch, head, token)."""
        self._check_written("quantized_values")
        return QTensor.from_raw(self._quantized_values, self.types.type_v,
                                self._quantized_values.shape[:-1] + (self.values.shape[-1],), self.types.flavor)

    def _map(self, fn) -> None:
        """Apply the same row/batch selection to the bytes and to the values read from them."""
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self._quantized_keys, self._quantized_values = fn(self._quantized_keys), fn(self._quantized_values)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._map(lambda t: t[..., :tokens_to_remove, :])
        self.cumulative_length = self.keys.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


KV_PAGE = 256   # rows: llama_kv_cache::get_n_kv pads the cache view to a multiple of 256


class GGMLBytesLayer(GGMLQuantizedLayer):
    """One layer's cache as ggml rows only (GGMLQuantizedCache(storage="bytes")).

    K and V rows each in one uint8 buffer, (batch, n_kv_heads, capacity, row_bytes), as llama.cpp's
    per-layer cache (ne = [row bytes, n_ctx]); new rows are written in place (set_rows); the buffer starts
    at whole 256-row pages and doubles when full (amortised O(1) per row, only the filled rows copied);
    `max_cache_len` preallocates exactly, as llama.cpp's n_ctx does. `quantized_keys`/`quantized_values` view the filled rows.
    No float copy of the cache is held. What `update` returns depends on the model's attention (read from
    `config._attn_implementation` at every call, so switching it later works):
      - one that reads the rows itself (READS_ROWS: kvlab.hf.bytes_attention's flash decoding, kvlab.hf.attention's
        ggml models): zero-byte placeholders, tensors on the "meta" device with the cache's shape;
      - any other (eager, sdpa, ...): every filled row dequantized into the model's dtype, made for this call
        and dropped after it (transformers' QuantizedCache reads its cache the same way), the values the
        floats storage would hold."""

    def __init__(self, types, max_cache_len: int | None = None, config=None):
        super().__init__(types)
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a positive int or None, got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self.config = config

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.head_dims = (key_states.shape[-1], value_states.shape[-1])
        self.dtype = key_states.dtype
        capacity = self.max_cache_len or 0
        self._quantized_keys = self._rows(key_states, self.types.type_k, capacity)
        self._quantized_values = self._rows(value_states, self.types.type_v, capacity)

    @staticmethod
    def _rows(states: torch.Tensor, type_name: str, capacity: int) -> torch.Tensor:
        row_bytes = type_info(type_name).row_bytes(states.shape[-1])
        return torch.empty(states.shape[:-2] + (capacity, row_bytes), dtype=torch.uint8, device=states.device)

    def _reserve(self, n_rows: int) -> None:
        """Capacity for n_rows rows: the first allocation rounded up to whole 256-row pages (llama.cpp pads
        n_kv to 256), then doubling when full, copying only the filled rows."""
        capacity = self._quantized_keys.shape[-2]
        if n_rows <= capacity:
            return
        grown = max(-(-n_rows // KV_PAGE) * KV_PAGE, 2 * capacity)
        n = self.cumulative_length
        for name in ("_quantized_keys", "_quantized_values"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:-2] + (grown, old.shape[-1]))   # (batch, heads, grown, row_bytes)
            new[..., :n, :] = old[..., :n, :]
            setattr(self, name, new)

    @torch.compiler.disable   # as GGMLQuantizedLayer.update: the Numba kernels are a graph break
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """set_rows of the new K/V rows into the buffers; returns (meta) placeholders of the cache's shape."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        forward_kwargs = kwargs.get("kwargs")
        if isinstance(forward_kwargs, dict):
            forward_kwargs[LAYER_KWARG] = self
        n, new = self.cumulative_length, key_states.shape[-2]
        qk = self._quantize(key_states, self.types.type_k, self.plan.k, reorder=True)
        qv = self._quantize(value_states, self.types.type_v, self.plan.v, reorder=False)
        self._reserve(n + new)
        self._quantized_keys[..., n:n + new, :] = qk.raw.to(self.device)
        self._quantized_values[..., n:n + new, :] = qv.raw.to(self.device)
        self.cumulative_length = n + new
        if getattr(self.config, "_attn_implementation", None) in READS_ROWS:
            return self._placeholders()
        return self._read_all()

    def _read_all(self):
        """Every filled row as the model's attention reads it: dequantized, rotated back, in the model's
        dtype, (batch, n_kv_heads, seq, head_dim) each; not kept."""
        k, v = self.quantized_keys, self.quantized_values
        k = QTensor.from_raw(k.raw.contiguous(), k.type, k.shape, k.flavor)
        v = QTensor.from_raw(v.raw.contiguous(), v.type, v.shape, v.flavor)
        return (self._dequantize(k, self.plan.k, reorder=True).to(self.dtype),
                self._dequantize(v, self.plan.v, reorder=False).to(self.dtype))

    def _placeholders(self):
        shape = self._quantized_keys.shape[:-2] + (self.cumulative_length,)
        return (torch.empty(shape + (self.head_dims[0],), dtype=self.dtype, device="meta"),
                torch.empty(shape + (self.head_dims[1],), dtype=self.dtype, device="meta"))

    @property
    def keys_raw(self) -> torch.Tensor:
        """(batch, n_kv_heads, seq, row_bytes) uint8: the filled K rows (a view of the buffer)."""
        return self._quantized_keys[..., :self.cumulative_length, :]

    @property
    def values_raw(self) -> torch.Tensor:
        return self._quantized_values[..., :self.cumulative_length, :]

    @property
    def quantized_keys(self) -> QTensor:
        self._check_written("quantized_keys")
        raw = self.keys_raw
        return QTensor.from_raw(raw, self.types.type_k, raw.shape[:-1] + (self.head_dims[0],), self.types.flavor)

    @property
    def quantized_values(self) -> QTensor:
        self._check_written("quantized_values")
        raw = self.values_raw
        return QTensor.from_raw(raw, self.types.type_v, raw.shape[:-1] + (self.head_dims[1],), self.types.flavor)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not only the filled rows)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._quantized_keys, self._quantized_values))

    def _map(self, fn) -> None:
        """Apply a batch selection to the buffers."""
        if self.is_initialized:
            self._quantized_keys, self._quantized_values = fn(self._quantized_keys), fn(self._quantized_values)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop: pass a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self.cumulative_length = max(0, self.cumulative_length + tokens_to_remove)

    def offload(self):
        raise NotImplementedError("GGMLQuantizedCache(storage='bytes') does not offload layers")

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


class GGMLQuantizedCache(Cache):
    """A transformers Cache storing K and V in ggml types (f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1).

    config: the model's config (its layers must all be full attention). flavor: which ggml code
    path's bytes ("ref", "cpu", "cuda"). rotation: None follows llama.cpp (Hadamard rotation of a
    quantized K/V when head_dim allows, unless LLAMA_ATTN_ROT_DISABLE is set), True/False force it.
    k_order: "model" stores K heads in the model's channel order; "gguf" in llama.cpp's for a model
    whose GGUF conversion permutes Q/K for RoPE (Llama, Mistral: `gguf_k_order`), so the blocks
    group the same channels as llama.cpp's cache does (attention is unchanged either way).
    storage: "bytes" (the default) keeps only the ggml rows (GGMLBytesLayer: growing buffers,
    `max_cache_len` preallocates); the attention that reads them directly is the fast one
    (`kvlab.hf.bytes_attention.use_bytes_attention(model)`: flash decoding over the bytes), any other
    attention gets the rows dequantized at each call. "floats" also keeps the dequantized K/V beside the
    bytes (GGMLQuantizedLayer: 1.1-2x the memory of DynamicCache, no dequantizing per step).
    Pass it as `model(..., cache=cache, use_cache=True)` or `model.generate(..., cache=cache)`.
    """

    def __init__(self, config, type_k: str = "f16", type_v: str = "f16", flavor: str = "ref",
                 rotation: bool | None = None, k_order: str = "model", storage: str = "bytes",
                 max_cache_len: int | None = None):
        self.types = CacheTypes(type_k, type_v, flavor, rotation, k_order)
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(repr(s) for s in STORAGES)}, got {storage!r}")
        if storage == "floats" and max_cache_len is not None:
            raise ValueError("max_cache_len preallocates storage='bytes' buffers; 'floats' grows by concatenation")
        text_config = config.get_text_config(decoder=True)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        check_head_dim(head_dim, (type_k, type_v), "GGMLQuantizedCache")   # as llama.cpp refuses it at load
        layer_types, _ = get_layer_types_and_kwargs(text_config)
        unsupported = set(layer_types) - {"full_attention"}
        if unsupported:
            raise ValueError(f"GGMLQuantizedCache supports models whose layers are all full attention; "
                             f"this config has {sorted(unsupported)}")
        self.storage = storage
        if storage == "bytes":
            layers = [GGMLBytesLayer(self.types, max_cache_len, config) for _ in layer_types]
        else:
            layers = [GGMLQuantizedLayer(self.types) for _ in layer_types]
        super().__init__(layers=layers)

    def __repr__(self):
        t = self.types
        return (f"GGMLQuantizedCache(type_k={t.type_k}, type_v={t.type_v}, flavor={t.flavor}, "
                f"rotation={t.rotation}, k_order={t.k_order}, storage={self.storage}, layers={len(self.layers)})")
