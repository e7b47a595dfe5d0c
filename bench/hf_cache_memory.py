"""Memory held by a transformers KV cache: DynamicCache vs GGMLQuantizedCache (floats and bytes storage) and
transformers' own 4-bit QuantizedCache (quanto, HQQ: where they install), one JSON line per (cache, scenario).

    python bench/hf_cache_memory.py [--tokens 4096] [--pairs q4_0/q4_0,q8_0/q8_0] [--device cpu]

The cache is driven as a model's attention drives it (Cache.update per layer) with K/V of a 1B-class
Llama in bf16 (Llama-3.2-1B's shape: 16 layers, 8 KV heads, head_dim 64), no weights needed.
"Held" counts every tensor the cache keeps (buffer capacity included, not only the filled rows);
bits_per_value = held bits / (layers * 2 * kv_heads * tokens * head_dim); ratio = held / DynamicCache's.
Scenarios: "prefill" (all tokens in one update), "decode" (tokens - 96 in one update, then 96 updates of
one token), "prealloc" (bytes storage with max_cache_len = tokens). Goals (issue 18): q4_0/q4_0 <= 0.30x,
q8_0/q8_0 <= 0.55x DynamicCache in a bf16 model.
"""
import argparse
import json

GOALS = {"q4_0/q4_0": 0.30, "q8_0/q8_0": 0.55}
# transformers' QuantizedCache backends (where optimum-quanto / hqq install), with the axes its docs recommend
PEERS = {"quanto": dict(axis_key=0, axis_value=0), "hqq": dict(axis_key=1, axis_value=1)}
LAYERS, KV_HEADS, HEAD_DIM = 16, 8, 64
DECODE_STEPS = 96


def plain_tensors(value):
    """Every plain tensor inside a layer's attribute: a tensor subclass (quanto's packed tensors) by the inner
    tensors it flattens to, tuples, lists and dicts (HQQ's (qtensor, meta)) by their items."""
    import torch
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            for name in value.__tensor_flatten__()[0]:
                yield from plain_tensors(getattr(value, name))
        else:
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from plain_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from plain_tensors(item)


def held_bytes(cache) -> int:
    """Bytes of every distinct tensor storage the cache's layers hold."""
    seen, total = set(), 0
    for layer in cache.layers:
        for value in vars(layer).values():
            for t in plain_tensors(value):
                key = (t.untyped_storage().data_ptr(), t.device)
                if t.device.type != "meta" and key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


def config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=2048, num_hidden_layers=LAYERS, num_attention_heads=32,
                       num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=8192)


def fill(cache, tokens: int, scenario: str, device: str) -> None:
    import torch
    gen = torch.Generator(device=device).manual_seed(0)

    def states(n):
        return torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen, device=device).to(torch.bfloat16)

    steps = [tokens] if scenario in ("prefill", "prealloc") else [tokens - DECODE_STEPS] + [1] * DECODE_STEPS
    for n in steps:
        for i in range(LAYERS):
            cache.update(states(n), states(n), i)


def make(kind: str, pair: str, scenario: str, tokens: int):
    from transformers import DynamicCache, QuantizedCache
    from kvlab.hf.cache import GGMLQuantizedCache
    if kind == "dynamic":
        return DynamicCache(config=config())
    if kind in PEERS:   # transformers' own: 4-bit groups of 64, the last residual_length tokens unquantized
        return QuantizedCache(kind, config(), nbits=4, **PEERS[kind])
    type_k, type_v = pair.split("/")
    extra = {"max_cache_len": tokens} if scenario == "prealloc" else {}
    return GGMLQuantizedCache(config(), type_k, type_v, storage=kind, **extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--pairs", default="q4_0/q4_0,q8_0/q8_0")
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args(argv)
    values = LAYERS * 2 * KV_HEADS * a.tokens * HEAD_DIM
    base = {}
    for scenario in ("prefill", "decode"):
        try:
            cache = make("dynamic", "", scenario, a.tokens)
            fill(cache, a.tokens, scenario, a.device)
            base[scenario] = held_bytes(cache)
            print(json.dumps({"figure": "cache_memory", "cache": "DynamicCache", "dtype": "bfloat16",
                              "scenario": scenario, "tokens": a.tokens, "bytes": base[scenario],
                              "bits_per_value": 8 * base[scenario] / values, "ratio_vs_dynamic": 1.0}), flush=True)
        except Exception as e:  # noqa: BLE001 - one figure's failure is reported, the others still run
            print(json.dumps({"figure": "cache_memory", "cache": "DynamicCache", "scenario": scenario,
                              "error": f"{type(e).__name__}: {e}"}), flush=True)
    for pair in a.pairs.split(","):
        for storage, scenario in (("floats", "prefill"), ("bytes", "prefill"), ("bytes", "decode"),
                                  ("bytes", "prealloc")):
            row = {"figure": "cache_memory", "cache": "GGMLQuantizedCache", "pair": pair, "storage": storage,
                   "dtype": "bfloat16", "scenario": scenario, "tokens": a.tokens}
            try:
                cache = make(storage, pair, scenario, a.tokens)
                fill(cache, a.tokens, scenario, a.device)
                held = held_bytes(cache)
                ratio = held / base["decode" if scenario == "decode" else "prefill"]
                row.update(bytes=held, bits_per_value=8 * held / values, ratio_vs_dynamic=ratio)
                if pair in GOALS:
                    row.update(goal=GOALS[pair], met=ratio <= GOALS[pair])
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(row), flush=True)
    for backend in PEERS:
        for scenario in ("prefill", "decode"):
            row = {"figure": "cache_memory", "cache": f"QuantizedCache({backend!r}, nbits=4)", "dtype": "bfloat16",
                   "scenario": scenario, "tokens": a.tokens}
            try:
                cache = make(backend, "", scenario, a.tokens)
                fill(cache, a.tokens, scenario, a.device)
                held = held_bytes(cache)
                row.update(bytes=held, bits_per_value=8 * held / values, ratio_vs_dynamic=held / base[scenario])
            except Exception as e:  # noqa: BLE001 - not installed, or failing: said, and the others still run
                row["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
