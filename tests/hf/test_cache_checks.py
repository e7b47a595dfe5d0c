"""kvlab.hf.cache's checks (issue 16): head_dim refused at construction, no bytes before the first update,
and a torch.compile'd forward through the cache."""
import pytest
import torch


def test_hf_cache_refuses_the_head_dim_at_construction():
    from transformers import LlamaConfig
    from kvlab.hf.cache import GGMLQuantizedCache
    config = LlamaConfig(hidden_size=96, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=32)          # head_dim 48
    with pytest.raises(ValueError, match="GGMLQuantizedCache: head_dim 48 is not a multiple of q4_0's block size"):
        GGMLQuantizedCache(config, "q4_0", "f16")
    for storage in ("floats", "bytes"):
        cache = GGMLQuantizedCache(config, "f16", "bf16", storage=storage)
        with pytest.raises(ValueError, match="holds no rows yet"):
            cache.layers[0].quantized_keys
        with pytest.raises(ValueError, match="holds no rows yet"):
            cache.layers[0].quantized_values


def test_a_compiled_forward_runs_through_the_cache():
    """torch.compile traced into the Numba kernels and crashed in numba's parfor lowering; the cache
    update is now a graph break. backend="eager" (dynamo's tracing without inductor's C++ build) keeps
    this fast on CI's CPU; inductor would only change how the rest of the graph is compiled."""
    from kvlab.hf.evaluate import tiny_llama
    from kvlab.hf.cache import GGMLQuantizedCache
    config = tiny_llama(seed=0).config
    d = config.head_dim
    rng = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, config.num_key_value_heads, 8, d, generator=rng) for _ in range(3))

    def attend(cache):   # one attention step of a decoder layer: write K/V into the cache, read them back
        keys, values = cache.layers[0].update(k, v)
        return torch.softmax(q @ keys.transpose(-1, -2) / d ** 0.5, dim=-1) @ values

    eager = attend(GGMLQuantizedCache(config, "q4_0", "q8_0"))
    compiled_cache = GGMLQuantizedCache(config, "q4_0", "q8_0")
    got = torch.compile(attend, backend="eager")(compiled_cache)
    assert torch.equal(got, eager)
    assert compiled_cache.layers[0].quantized_keys.raw.shape == (1, config.num_key_value_heads, 8, d // 32 * 18)
    bytes_cache = GGMLQuantizedCache(config, "q4_0", "q8_0", storage="bytes")   # its own update: also a graph break
    torch.compile(lambda c: c.layers[0].update(k, v)[0].shape, backend="eager")(bytes_cache)
    assert bytes_cache.layers[0].quantized_keys.raw.numpy().tobytes() == \
        compiled_cache.layers[0].quantized_keys.raw.numpy().tobytes()
