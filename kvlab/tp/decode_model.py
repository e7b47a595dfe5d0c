"""A bandwidth model of decode under tensor parallelism: KV-cache bytes per device, tokens per second.

Decode of one sequence is memory bound: every token, each device streams its shard of the weights and
of the KV cache once. The KV split follows llama.cpp (whole KV heads per device, the remainder device
rotating with the layer: kvlab.split.static), so uneven device counts show their real imbalance.
"""
from dataclasses import dataclass

from kvlab.shape import HeadShape
from kvlab.types import TYPES


@dataclass(frozen=True)
class ModelShape(HeadShape):
    """The parts of a decoder that decode speed and KV memory depend on (default: Llama-3-8B, whose heads are
    HeadShape's defaults)."""
    n_layers: int = 32
    n_params: float = 8.0e9
    weight_bits: float = 16.0     # f16 weights; ~4.5 for a Q4_0 model


@dataclass(frozen=True)
class DecodeModel:
    """Decode is memory bound: each device streams its weight shard and its KV shard once per token;
    tensor parallelism adds two all-reduces per layer (after attention and after the FFN)."""
    hbm_gbs: float = 3350.0       # H100 SXM HBM3
    allreduce_us: float = 8.0     # one small all-reduce over NVLink


def kv_bytes_per_device(shape: ModelShape, type_k: str, type_v: str, context: int, n_devices: int) -> list:
    """Bytes of K and V cache on each device for `context` tokens, all layers, split as llama.cpp does
    (whole KV heads per device; the device taking the remainder rotates with the layer)."""
    from kvlab.split.state import Axis
    from kvlab.split.static import static_state
    width = shape.n_head_kv * shape.head_dim
    total = [0] * n_devices
    for layer in range(shape.n_layers):
        state = static_state("kv", Axis.AXIS_0, width, layer=layer, n_devices=n_devices, version="0.3.36",
                             weight_block=1, **shape.head_fields())
        for j, values in enumerate(state.per_device):
            total[j] += context * sum(TYPES[t].row_bytes(values) for t in (type_k, type_v))
    return total


def kv_memory_table(shape: ModelShape, pairs, context: int, devices=(1, 2, 4, 8)):
    """GiB of KV cache on the fullest device, per K/V pair (rows) and device count (columns)."""
    import pandas as pd
    return pd.DataFrame({f"{n} dev": [max(kv_bytes_per_device(shape, tk, tv, context, n)) / 2 ** 30
                                      for tk, tv in pairs] for n in devices},
                        index=pd.Index([f"{tk}/{tv}" for tk, tv in pairs], name=f"GiB at {context} tokens"))


def decode_tokens_per_s(shape: ModelShape, model: DecodeModel, type_k: str, type_v: str, context: int,
                        n_devices: int) -> float:
    """Tokens per second of one sequence: the slowest device's bytes over HBM bandwidth, plus all-reduces."""
    weights = shape.n_params * shape.weight_bits / 8 / n_devices
    seconds = (weights + max(kv_bytes_per_device(shape, type_k, type_v, context, n_devices))) / (model.hbm_gbs * 1e9)
    if n_devices > 1:
        seconds += 2 * shape.n_layers * model.allreduce_us * 1e-6
    return 1.0 / seconds
