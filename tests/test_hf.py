"""kvlab.hf (a ggml-typed transformers cache) and kvlab.hf.evaluate (`kvlab eval`), on a tiny random Llama, offline."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402

import kvlab  # noqa: E402
from kvlab.cli import main  # noqa: E402
from kvlab.hf import evaluate  # noqa: E402
from kvlab.hf.cache import GGMLQuantizedCache  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 12, 3


@pytest.fixture(scope="module")
def model():
    return evaluate.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, evaluate.TINY_VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def run_steps(model, ids, cache):
    """Prefill all but the last two tokens, then decode them one at a time: logits of every step."""
    with torch.no_grad():
        steps = [model(ids[:, :-2], cache=cache, use_cache=True).logits]
        for i in (-2, -1):
            steps.append(model(ids[:, i:i + 1 or None], cache=cache, use_cache=True).logits)
    return steps


class RoundingLayer(DynamicLayer):
    """transformers' own layer, with K and V rounded through a torch dtype: the reference for f16/bf16."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def update(self, key_states, value_states, *args, **kwargs):
        def rounded(t):
            return t.to(self.dtype).to(t.dtype)
        return super().update(rounded(key_states), rounded(value_states), *args, **kwargs)


@pytest.mark.parametrize("storage", ["bytes", "floats"])
def test_f32_cache_reproduces_dynamic_cache_exactly(model, prompt, storage):
    """Under the model's own attention (sdpa): the bytes storage dequantizes every row at each call, the floats
    storage keeps them; both give DynamicCache's logits bit for bit."""
    expected = run_steps(model, prompt, DynamicCache(config=model.config))
    got = run_steps(model, prompt, GGMLQuantizedCache(model.config, "f32", "f32", storage=storage))
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    out_dyn = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    out = model.generate(prompt, cache=GGMLQuantizedCache(model.config, "f32", "f32", storage=storage),
                         max_new_tokens=NEW_TOKENS,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, out_dyn.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, out_dyn.logits))


@pytest.mark.parametrize("storage", ["bytes", "floats"])
@pytest.mark.parametrize("type_name,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_cache_is_the_dynamic_cache_rounded_to_half(model, prompt, type_name, dtype, storage):
    rounded = Cache(layers=[RoundingLayer(dtype) for _ in range(model.config.num_hidden_layers)])
    expected = run_steps(model, prompt, rounded)
    got = run_steps(model, prompt, GGMLQuantizedCache(model.config, type_name, type_name, storage=storage))
    unrounded = run_steps(model, prompt, DynamicCache(config=model.config))
    for e, g, u in zip(expected, got, unrounded):
        assert torch.equal(e, g)
        assert not torch.equal(g, u)  # the rounding is really there


@pytest.mark.parametrize("rotation", [True, False])
def test_stored_bytes_are_ggml_rows_of_the_rotated_keys(model, prompt, rotation):
    exact, cache = DynamicCache(config=model.config), GGMLQuantizedCache(model.config, "q4_0", "q5_1",
                                                                         rotation=rotation, storage="floats")
    with torch.no_grad():
        model(prompt, cache=exact, use_cache=True)
        model(prompt, cache=cache, use_cache=True)
    layer, k, v = cache.layers[0], exact.layers[0].keys, exact.layers[0].values  # layer 0 sees the same K/V
    assert layer.plan == (kvlab.RotationPlan(64, 64) if rotation else kvlab.RotationPlan(None, None))
    stored_k = kvlab.rotate(k, 64) if rotation else k
    stored_v = kvlab.rotate(v, 64) if rotation else v
    qk, qv = kvlab.quantize(stored_k, "q4_0"), kvlab.quantize(stored_v, "q5_1")
    assert layer.quantized_keys.raw.numpy().tobytes() == qk.raw.numpy().tobytes()
    assert layer.quantized_values.raw.numpy().tobytes() == qv.raw.numpy().tobytes()
    read_k = kvlab.dequantize(qk)
    assert torch.equal(layer.keys, kvlab.rotate(read_k, 64) if rotation else read_k)
    if rotation:
        # what llama.cpp computes, (Q H)(deq(K H))^T, equals Q (deq(K H) H)^T up to float rounding
        q = torch.randn(2, 2, PROMPT_LEN, 64, generator=torch.Generator().manual_seed(3))
        llama_cpp = kvlab.rotate(q, 64) @ read_k.transpose(-1, -2)
        assert torch.allclose(q @ layer.keys.transpose(-1, -2), llama_cpp, rtol=1e-5, atol=1e-5)


def test_generate_runs_with_all_81_pairs(model, prompt):
    for type_k in kvlab.TYPES:
        for type_v in kvlab.TYPES:
            cache = GGMLQuantizedCache(model.config, type_k, type_v)
            out = model.generate(prompt, cache=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
            assert out.shape == (2, PROMPT_LEN + NEW_TOKENS), (type_k, type_v)
            n_cached = PROMPT_LEN + NEW_TOKENS - 1  # the last token is sampled, never fed back
            for layer in cache.layers:
                assert cache.get_seq_length() == n_cached
                assert layer.quantized_keys.shape == (2, 2, n_cached, 64)
                assert layer.quantized_values.raw.shape[-1] == kvlab.TYPES[type_v].row_bytes(64)


def test_crop_and_reorder_keep_bytes_and_values_together(model, prompt):
    cache = GGMLQuantizedCache(model.config, "q8_0", "iq4_nl", storage="floats")
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
    layer = cache.layers[1]
    raw, keys = layer.quantized_keys.raw.clone(), layer.keys.clone()
    cache.crop(-3)
    assert cache.get_seq_length() == PROMPT_LEN - 3
    assert torch.equal(layer.quantized_keys.raw, raw[..., :-3, :]) and torch.equal(layer.keys, keys[..., :-3, :])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.quantized_keys.raw, raw[[1, 0], :, :-3]) and torch.equal(layer.keys, keys[[1, 0], :, :-3])
    cache.reset()
    assert cache.get_seq_length() == 0


def test_bad_input_is_refused_clearly(model):
    with pytest.raises(ValueError, match="unknown KV type"):
        GGMLQuantizedCache(model.config, "q3_k", "f16")
    with pytest.raises(ValueError, match="flavor"):
        GGMLQuantizedCache(model.config, "q8_0", "q8_0", flavor="metal")
    sliding = LlamaConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    with pytest.raises(ValueError, match="full attention"):
        GGMLQuantizedCache(sliding, "q8_0", "q8_0")
    cache = GGMLQuantizedCache(model.config, "q8_0", "f16")
    with pytest.raises(ValueError, match="head_dim 48 is not a multiple of q8_0's block size 32"):
        cache.update(torch.zeros(1, 2, 3, 48), torch.zeros(1, 2, 3, 48), 0)
    with pytest.raises(ValueError, match="K/V"):
        evaluate.parse_pairs(["q4_0/q8_0/f16"])


def test_parse_pairs():
    assert evaluate.parse_pairs(["q4_0/q8_0", "q8_0", "q4_0/q8_0"]) == [("q4_0", "q8_0"), ("q8_0", "q8_0")]
    assert len(evaluate.parse_pairs(["all"])) == 81


def tokens(n, seed=2):
    return torch.randint(0, evaluate.TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_eval_is_exactly_zero_for_the_f32_cache_against_transformers_cache(model):
    config = evaluate.EvalConfig(n_ctx=48, n_batch=20, base="dynamic")  # batches of 20, 20, 8
    result = evaluate.evaluate(model, tokens(100), [("f32", "f32")], config, progress=False)
    [row] = result.summaries()
    assert result.n_chunks == 2 and row["tokens"] == 2 * (48 - 1 - 24)
    assert row["mean_kld"] == 0.0 and row["same_top"] == 1.0 and row["delta_ppl"] == 0.0


def test_eval_batches_and_ppl_match_a_plain_forward(model):
    chunk = tokens(64).view(1, -1)
    config = evaluate.EvalConfig(n_ctx=64, n_batch=24)
    batched = evaluate.chunk_logits(model, chunk, lambda: DynamicCache(config=model.config), config)
    with torch.no_grad():
        whole = model(chunk).logits[0, 32:63]
    assert batched.shape == whole.shape and torch.allclose(batched, whole, atol=1e-4)
    result = evaluate.evaluate(model, chunk[0], [("q8_0", "q8_0")], evaluate.EvalConfig(n_ctx=64, base="dynamic"),
                               progress=False)
    ce = torch.nn.functional.cross_entropy(whole.double(), chunk[0, 33:])
    assert result.summaries()[0]["ppl_base"] == pytest.approx(float(ce.exp()), rel=1e-6)


def test_kld_grows_as_bits_shrink(model):
    pairs = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")]
    config = evaluate.EvalConfig(n_ctx=64, n_chunks=3, base="f32")
    rows = evaluate.evaluate(model, tokens(192, seed=5), pairs, config, progress=False).summaries()
    kld = [r["mean_kld"] for r in rows]
    assert 0 < kld[0] < kld[1] < kld[2]
    assert rows[2]["same_top"] < rows[0]["same_top"]


def test_eval_command_prints_the_kld_table(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "kld.json"
    assert main(["eval", "--tiny", "--text", str(text), "--ctx", "64", "--chunks", "2", "--quiet",
                 "--pairs", "q8_0/q8_0,q4_0/q4_0", "--json", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "2 chunk(s) of n_ctx=64" in table and "Mean KLD" in table
    assert [line.split()[0] for line in table.splitlines()[3:]] == ["q8_0/q8_0", "q4_0/q4_0"]
    rows = json.loads(out.read_text())["pairs"]
    assert [(r["type_k"], r["type_v"]) for r in rows] == [("q8_0", "q8_0"), ("q4_0", "q4_0")]
    assert np.isfinite([r["mean_kld"] for r in rows]).all() and rows[0]["mean_kld"] < rows[1]["mean_kld"]
    assert main(["eval", "--tiny", "--text", str(text), "--pairs", "q3_k"]) == 2
    assert "kvlab eval: error: argument --pairs: unknown KV type 'q3_k'" in capsys.readouterr().err
