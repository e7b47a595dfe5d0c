"""kvlab.hf.attention (ggml's flash-attention numerics inside a transformers model) and the cache's k_order."""
import numpy as np
import pytest
import torch

from kvlab.hf.attention import attention_as, ggml_attention
from kvlab.hf.cache import LAYER_KWARG, GGMLQuantizedCache, gguf_k_order
from kvlab.hf.evaluate import EvalConfig, evaluate, tiny_llama
from kvlab.quant import quantize
from kvlab.rotation import rotate

N_HEAD, N_KV, D, L = 4, 2, 64, 24


class _Module:  # what ggml_attention reads from transformers' attention module: nothing but its call
    pass


def _filled_layer(type_k, type_v, k, v, rotation=True):
    cache = GGMLQuantizedCache(tiny_llama().config, type_k, type_v, "cpu", rotation, "gguf")
    layer = cache.layers[0]
    layer.update(k, v)
    return layer


@pytest.mark.parametrize("type_k,type_v", [("q4_0", "q8_0"), ("q8_0", "f16"), ("iq4_nl", "q5_1")])
def test_each_row_of_a_batch_equals_decoding_that_token_alone(type_k, type_v):
    """The causal mask skips later cells exactly: row t of a prompt batch is bit for bit the decode of token t
    over a cache holding tokens 0..t (ggml's one-chunk path, taken by these pairs)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, N_HEAD, L, D, generator=g)
    k, v = torch.randn(1, N_KV, L, D, generator=g), torch.randn(1, N_KV, L, D, generator=g)
    layer = _filled_layer(type_k, type_v, k, v)
    batch = ggml_attention(_Module(), q, None, None, None, backend="cpu", **{LAYER_KWARG: layer})[0]  # (1, L, H, D)
    for t in (0, 7, L - 1):
        single = _filled_layer(type_k, type_v, k[:, :, :t + 1], v[:, :, :t + 1])
        one = ggml_attention(_Module(), q[:, :, t:t + 1], None, None, None, backend="cpu", **{LAYER_KWARG: single})[0]
        assert torch.equal(batch[:, t], one[:, 0])


def test_gguf_k_order_stores_permuted_heads_and_attends_the_same():
    model = tiny_llama()
    ids = torch.arange(40).view(1, -1) % 256
    caches = {}
    for order in ("model", "gguf"):
        caches[order] = GGMLQuantizedCache(model.config, "f32", "f32", "ref", None, order, storage="floats")
        with torch.no_grad():
            caches[order].logits = model(ids, cache=caches[order], use_cache=True).logits
    assert torch.equal(caches["model"].logits, caches["gguf"].logits)   # a gather: same floats, same attention
    for a, b in zip(caches["model"].layers, caches["gguf"].layers):
        assert torch.equal(a.keys, b.keys)
        k_model = torch.from_numpy(np.asarray(a.quantized_keys.raw)).view(torch.float32)
        k_gguf = torch.from_numpy(np.asarray(b.quantized_keys.raw)).view(torch.float32)
        assert torch.equal(k_gguf, k_model[..., gguf_k_order(k_model.shape[-1])])


def test_gguf_k_order_is_convert_hf_to_gguf_permute():
    """llama.cpp's channel 2j is HF's j and 2j+1 is HF's j + D/2 (LlamaModel.permute on W_k's rows)."""
    order = gguf_k_order(8)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    w = np.arange(2 * 8 * 3).reshape(16, 3)            # 2 heads of 8 rows
    permuted = w.reshape(2, 2, 4, 3).swapaxes(1, 2).reshape(w.shape)   # convert_hf_to_gguf's permute
    assert np.array_equal(permuted, w.reshape(2, 8, 3)[:, order].reshape(w.shape))


def test_quantized_keys_in_gguf_order_are_the_rotated_permuted_rows():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, N_KV, 5, D, generator=g), torch.randn(1, N_KV, 5, D, generator=g)
    layer = _filled_layer("q4_0", "q8_0", k, v)
    expected = quantize(rotate(k[..., gguf_k_order(D)], layer.plan.k), "q4_0", "cpu")
    assert np.array_equal(np.asarray(layer.quantized_keys.raw), np.asarray(expected.raw))


def test_ggml_attention_needs_the_ggml_cache():
    model = tiny_llama()
    with pytest.raises(ValueError, match="GGMLQuantizedCache"):
        with attention_as(model, "ggml-cpu"), torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long))   # no cache: nothing to read
    with pytest.raises(ValueError, match="unknown attention"):
        with attention_as(model, "flash"):
            pass
    with pytest.raises(ValueError, match="base cannot be 'dynamic'"):
        EvalConfig(attention="ggml-cpu", base="dynamic")


def test_evaluate_with_ggml_attention_puts_the_model_attention_back():
    model = tiny_llama()
    own = model.config._attn_implementation
    tokens = np.random.default_rng(0).integers(0, 256, 64)
    result = evaluate(model, tokens, [("q8_0", "q8_0")], EvalConfig(n_ctx=32, flavor="cpu", attention="ggml-cpu"),
                      progress=False)
    assert model.config._attn_implementation == own
    (row,) = result.summaries()
    assert row["tokens"] == 2 * 15 and row["mean_kld"] > 0


def test_attention_as_nests_and_model_means_the_one_it_had():
    model = tiny_llama()
    own = model.config._attn_implementation
    with attention_as(model, "ggml-cpu"):
        assert model.config._attn_implementation == "kvlab_ggml_cpu"
        with attention_as(model, "model"):
            assert model.config._attn_implementation == "kvlab_ggml_cpu"   # the one it had on entering
        with attention_as(model, "ggml-cuda"):
            assert model.config._attn_implementation == "kvlab_ggml_cuda"
        assert model.config._attn_implementation == "kvlab_ggml_cpu"
    assert model.config._attn_implementation == own
