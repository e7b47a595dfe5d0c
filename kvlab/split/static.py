"""How llama.cpp splits weights and the KV cache across devices: `llama_meta_device_get_split_state`
(src/llama-model.cpp), for the tensors of a plain attention block, without --tensor-split.

Device j's upper bound along the split dim is `ne*(j+1)/n`, rounded down to the granularity; the last
device takes the rest. Layer `il` rotates which device index each slice goes to (`rotation = il % n`
for a model whose layers are all alike), so the device holding the remainder alternates by layer.
Granularity keeps whole GQA groups together: Q (and attn_output) in units of n_gqa heads, K/V weights
and caches in units of one KV head, both at least the quantization block of attn_output.weight.
"""
from math import gcd

from kvlab.split.state import Axis, SplitError, SplitState


def _lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)


def granularity(role: str, *, head_dim: int, n_head: int, n_head_kv: int, n_devices: int,
                weight_block: int, version: str) -> int:
    """get_split_granularity for role "q" (attn_q.weight), "kv" (attn_k/v.weight, cache_k/v), "o" (attn_output)."""
    n_gqa = n_head // n_head_kv
    n_embd_q = n_gqa * head_dim
    if version == "0.3.36":
        # "to handle head sizes like 80, only increase granularity while it doesn't cause underutilization"
        blck_perf = weight_block
        while blck_perf < 128 and blck_perf * n_devices < n_embd_q:
            blck_perf *= 2
        granularity_q = _lcm(n_embd_q, blck_perf)
        if role == "o":
            return granularity_q // head_dim * head_dim   # granularity_head * n_embd_head_v (head_v == head_k)
    else:
        granularity_q = _lcm(n_embd_q, weight_block)
        if role == "o":
            return granularity_q
    if role == "q":
        return granularity_q
    if role == "kv":
        return granularity_q // n_gqa
    raise ValueError(f"granularity: unknown role {role!r} (expected 'q', 'kv' or 'o')")


def split_counts(ne: int, granularity_: int, n_devices: int, rotation: int) -> tuple:
    """Per-device counts of one segment of ne elements (no --tensor-split)."""
    counts = [0] * n_devices
    low = 0
    for j in range(n_devices - 1):
        high = ne * (j + 1) // n_devices
        high -= high % granularity_
        counts[(j + rotation) % n_devices] = high - low
        low = high
    counts[(n_devices - 1 + rotation) % n_devices] = ne - low
    return tuple(counts)


def static_state(role: str, axis: Axis, ne: int, *, layer: int, n_devices: int, version: str, **shape) -> SplitState:
    """The state llama.cpp assigns a weight or cache of `ne` elements along `axis` in layer `layer`."""
    g = granularity(role, n_devices=n_devices, version=version, **shape)
    if version == "0.3.24" and ne % g:
        raise SplitError(f"GGML_ASSERT(ne_full % g_s == 0) failed in llama_meta_device_get_split_state: "
                         f"{ne} elements are not a multiple of the split granularity {g}",
                         node=role, op="NONE", rule="GGML_ASSERT(ne_full % g_s == 0)",
                         c_function="llama_meta_device_get_split_state",
                         hint="n_head*head_dim must be a multiple of lcm(n_gqa*head_dim, weight block size)")
    return SplitState.split(axis, split_counts(ne, g, n_devices, layer % n_devices))
