"""GGMLQuantizedCache(storage="bytes") (kvlab.hf.cache.GGMLBytesLayer) and the attention that reads its
bytes (kvlab.hf.bytes_attention), on the tiny random Llama of kvlab.hf.evaluate, offline."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import kvlab  # noqa: E402
from kvlab.accuracy import cpu_fa  # noqa: E402
from kvlab.hf import evaluate  # noqa: E402
from kvlab.hf.bytes_attention import bytes_attention, use_bytes_attention  # noqa: E402
from kvlab.hf.cache import LAYER_KWARG, GGMLQuantizedCache  # noqa: E402

PROMPT = 12


@pytest.fixture(scope="module")
def model():
    m = evaluate.tiny_llama(seed=0)
    use_bytes_attention(m)
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, evaluate.TINY_VOCAB, (2, PROMPT + 2), generator=torch.Generator().manual_seed(1))


def forward(model, ids, cache):
    with torch.no_grad():
        return model(ids, cache=cache, use_cache=True).logits


def test_holds_only_the_rows_in_a_doubling_buffer(model, ids):
    cache = GGMLQuantizedCache(model.config, "q4_0", "q8_0", storage="bytes")
    forward(model, ids[:, :PROMPT], cache)
    floats = GGMLQuantizedCache(model.config, "q4_0", "q8_0", storage="floats")
    model.set_attn_implementation("sdpa")
    try:
        forward(model, ids[:, :PROMPT], floats)
    finally:
        use_bytes_attention(model)
    layer = cache.layers[0]
    assert layer._quantized_keys.shape[-2] == 256                     # the first allocation: one 256-row page
    forward(model, ids[:, PROMPT:], cache)
    assert layer._quantized_keys.shape[-2] == 256 and cache.get_seq_length() == PROMPT + 2
    for bl, fl in zip(cache.layers, floats.layers):
        assert bl.keys.numel() == 0 and bl.values.numel() == 0       # no float copy of the cache
        assert torch.equal(bl.keys_raw[..., :PROMPT, :], fl.quantized_keys.raw)    # the same ggml bytes
        assert torch.equal(bl.values_raw[..., :PROMPT, :], fl.quantized_values.raw)
        b, h = bl.keys_raw.shape[:2]
        assert bl.nbytes == b * h * 256 * (36 + 68)                     # q4_0 and q8_0 rows of 64 values
    rows = layer.keys_raw.clone()
    layer.update(torch.randn(2, 2, 250, 64), torch.randn(2, 2, 250, 64))   # 264 rows: full, doubled
    assert layer._quantized_keys.shape[-2] == 512 and torch.equal(layer.keys_raw[..., :PROMPT + 2, :], rows)


def test_max_cache_len_preallocates_exactly(model, ids):
    cache = GGMLQuantizedCache(model.config, "q4_0", "q4_0", storage="bytes", max_cache_len=PROMPT + 2)
    forward(model, ids[:, :PROMPT], cache)
    before = [layer.nbytes for layer in cache.layers]
    forward(model, ids[:, PROMPT:PROMPT + 1], cache)
    forward(model, ids[:, PROMPT + 1:], cache)
    assert [layer.nbytes for layer in cache.layers] == before == [2 * 2 * (PROMPT + 2) * 2 * 36] * 2


@pytest.mark.parametrize("pair", ["q4_0/q4_0", "q5_1/iq4_nl", "f16/bf16"])
def test_prompt_equals_the_floats_storage(model, ids, pair):
    """A prompt batch reads the dequantized rows one KV head at a time with sdpa: the logits are those of
    the floats storage under sdpa, bit for bit (rotation on for the quantized pairs)."""
    type_k, type_v = pair.split("/")
    got = forward(model, ids, GGMLQuantizedCache(model.config, type_k, type_v, storage="bytes"))
    model.set_attn_implementation("sdpa")
    try:
        want = forward(model, ids, GGMLQuantizedCache(model.config, type_k, type_v, storage="floats"))
    finally:
        use_bytes_attention(model)
    assert torch.equal(got, want)


@pytest.mark.parametrize("pair", ["q4_0/q4_0", "q4_1/f16", "iq4_nl/q8_0"])
def test_decode_is_ggml_cpu_flash_attention_on_the_bytes(model, ids, pair):
    """One query: ggml-cpu's flash_attn_ext over the stored rows (kvlab.accuracy.cpu_fa on the same bytes),
    Q rotated into the cache's basis, the output rotated back with H_v, left padding masked."""
    type_k, type_v = pair.split("/")
    cache = GGMLQuantizedCache(model.config, type_k, type_v, storage="bytes")
    forward(model, ids[:, :PROMPT], cache)
    layer = cache.layers[1]
    query = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(2))
    layer.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    n = layer.cumulative_length
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :3] = False                                         # sequence 1 starts 3 rows late
    got, _ = bytes_attention(None, query, None, None, mask, scaling=0.125, **{LAYER_KWARG: layer})
    assert got.shape == (2, 1, 4, 64) and got.dtype == query.dtype
    plan = layer.plan
    q = layer.to_cache_basis(query[:, :, 0], plan.k, reorder=True).numpy()            # (2, 4, 64)
    k_raw, v_raw = layer.keys_raw.numpy(), layer.values_raw.numpy()
    k_val, v_val = kvlab.dequantize(layer.quantized_keys), kvlab.dequantize(layer.quantized_values)
    for b, first in ((0, 0), (1, 3)):
        out = cpu_fa.flash_attn(q[b].reshape(2, 2, 64), k_raw[b, :, first:], k_val[b, :, first:].numpy(),
                                v_val[b, :, first:].numpy(), type_k, type_v, np.float32(0.125), 1)
        want = kvlab.rotate(out.reshape(4, 64), plan.v) if plan.v else out.reshape(4, 64)
        assert np.array_equal(got[b, 0].numpy().view(np.uint32), want.view(np.uint32))


def test_generate_with_left_padding(model):
    """Greedy generation over a bytes-only cache: a left-padded sequence decodes as it does alone."""
    ids = torch.randint(1, evaluate.TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    ids[1, :4] = 0
    attn = torch.ones_like(ids)
    attn[1, :4] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    both = model.generate(ids, attention_mask=attn, cache=GGMLQuantizedCache(model.config, "q8_0", "q8_0",
                                                                             storage="bytes"), **kwargs)
    alone = model.generate(ids[1:, 4:], cache=GGMLQuantizedCache(model.config, "q8_0", "q8_0", storage="bytes"),
                           **kwargs)
    assert torch.equal(both[1, 10:], alone[0, 6:])


def test_reorder_crop_and_select_act_on_the_rows(model, ids):
    cache = GGMLQuantizedCache(model.config, "q4_0", "q4_0", storage="bytes")
    forward(model, ids[:, :PROMPT], cache)
    layer = cache.layers[0]
    rows = layer.keys_raw.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys_raw, rows.flip(0))
    cache.crop(-3)
    assert cache.get_seq_length() == PROMPT - 3 and torch.equal(layer.keys_raw, rows.flip(0)[..., :PROMPT - 3, :])
    cache.batch_select_indices(torch.tensor([0]))
    assert torch.equal(layer.keys_raw, rows[1:, :, :PROMPT - 3])


def test_the_default_storage_serves_any_attention(model, ids):
    """storage="bytes" is the default. Under sdpa each call gets every row dequantized (made for that call,
    not kept): the logits of the floats storage bit for bit, no float copy held; switching the model to the
    bytes attention afterwards gives it placeholders (the config is read at every call)."""
    cache = GGMLQuantizedCache(model.config, "q4_0", "q5_1")
    assert cache.storage == "bytes"
    model.set_attn_implementation("sdpa")
    try:
        got = [forward(model, ids[:, :PROMPT], cache), forward(model, ids[:, PROMPT:PROMPT + 1], cache)]
        floats = GGMLQuantizedCache(model.config, "q4_0", "q5_1", storage="floats")
        want = [forward(model, ids[:, :PROMPT], floats), forward(model, ids[:, PROMPT:PROMPT + 1], floats)]
    finally:
        use_bytes_attention(model)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    layer = cache.layers[0]
    assert layer.keys.numel() == 0 and layer.values.numel() == 0
    keys, values = layer.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    assert keys.device.type == "meta" and keys.shape == (2, 2, PROMPT + 2, 64) and values.device.type == "meta"


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="storage"):
        GGMLQuantizedCache(model.config, storage="float")
    with pytest.raises(ValueError, match="max_cache_len"):
        GGMLQuantizedCache(model.config, storage="floats", max_cache_len=8)
    with pytest.raises(ValueError, match="max_cache_len"):
        GGMLQuantizedCache(model.config, storage="bytes", max_cache_len=0)
    with pytest.raises(ValueError, match="GGMLQuantizedCache"):
        bytes_attention(None, torch.zeros(1, 4, 1, 64), None, None, None)
