"""The nine KV-cache types llama.cpp accepts for --cache-type-k/-v, as ggml defines them: its type_traits.

One TypeInfo per type holds what ggml's ``type_traits`` (ggml.c) and ``type_traits_cpu`` hold: block
size, bytes per block, and the kernels. The CPU row functions (kvlab.kernels.<type>) load with
``import kvlab``; the GPU ones (kvlab.kernels.cuda.quantizers) on the first call of ``gpu_codec()``, so
that numba.cuda loads only when a GPU array is used.
"""
from dataclasses import dataclass, field
from typing import Callable

from kvlab.kernels import FLAVORS, bf16, f16, f32, iq4_nl, q4_0, q4_1, q5_0, q5_1, q8_0

FLAVOR_CODES = {name: code for code, name in enumerate(FLAVORS)}  # kernels take the int


def _gpu():
    from kvlab.kernels.cuda import quantizers    # numba.cuda loads here, not at `import kvlab`
    return quantizers


@dataclass(frozen=True)
class TypeInfo:
    name: str
    ggml_type: int          # enum ggml_type value (ggml.h)
    block_size: int         # values per block (ggml_blck_size)
    type_size: int          # bytes per block (ggml_type_size)
    is_quantized: bool
    layout: str             # the block struct, in ggml-common.h's words
    # CPU: (values, raw, flavor_code, rcp_table) -> None. values (n_blocks, block_size) float32 and raw
    # (n_blocks, type_size) uint8 for block types; whole rows (rows, cols) / (rows, row_bytes) for
    # f32/f16/bf16, whose cpu flavor depends on a value's place in its row. rcp_table: the measured
    # rcp.approx table (kvlab.kernels.scalar.rcp_approx_table()) for the cuda flavor's divisions.
    quantize_row: Callable = field(repr=False)
    dequantize_row: Callable = field(repr=False)    # (raw, values) -> None, the same views
    # GPU: () -> kvlab.kernels.cuda.quantizers.DeviceCodec, the device functions the CUDA kernels are
    # instantiated with (as set-rows.cu takes quantize_f32_<type>_block as a template argument)
    gpu_codec: Callable = field(repr=False)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        """ggml_row_size: bytes of a row of n values (n a multiple of block_size)."""
        return n // self.block_size * self.type_size

    def __reduce__(self):
        # pickled by name (to another process, say): the table's entry comes back, its kernels with it
        return type_info, (self.name,)


TYPES = {t.name: t for t in (
    TypeInfo("f32", 0, 1, 4, False, "float32",
             f32.quantize_row_f32, f32.dequantize_row_f32, lambda: _gpu().F32),
    TypeInfo("f16", 1, 1, 2, False, "IEEE half, round to nearest even",
             f16.quantize_row_f16, f16.dequantize_row_f16, lambda: _gpu().F16),
    TypeInfo("bf16", 30, 1, 2, False, "bfloat16 (top half of float32), round to nearest even",
             bf16.quantize_row_bf16, bf16.dequantize_row_bf16, lambda: _gpu().BF16),
    TypeInfo("q8_0", 8, 32, 34, True, "block_q8_0 { ggml_half d; int8_t qs[32]; }  x = d*q",
             q8_0.quantize_row_q8_0, q8_0.dequantize_row_q8_0, lambda: _gpu().Q8_0),
    TypeInfo("q4_0", 2, 32, 18, True,
             "block_q4_0 { ggml_half d; uint8_t qs[16]; }  x = d*(q-8); "
             "qs[j] = q[j] | q[j+16] << 4",
             q4_0.quantize_row_q4_0, q4_0.dequantize_row_q4_0, lambda: _gpu().Q4_0),
    TypeInfo("q4_1", 3, 32, 20, True,
             "block_q4_1 { ggml_half d, m; uint8_t qs[16]; }  x = d*q + m; "
             "qs[j] = q[j] | q[j+16] << 4",
             q4_1.quantize_row_q4_1, q4_1.dequantize_row_q4_1, lambda: _gpu().Q4_1),
    TypeInfo("iq4_nl", 20, 32, 18, True,
             "block_iq4_nl { ggml_half d; uint8_t qs[16]; }  x = d*kvalues_iq4nl[q]; "
             "qs[j] = q[j] | q[j+16] << 4",
             iq4_nl.quantize_row_iq4_nl, iq4_nl.dequantize_row_iq4_nl, lambda: _gpu().IQ4_NL),
    TypeInfo("q5_0", 6, 32, 22, True,
             "block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }  x = d*(q-16); "
             "low nibbles as q4_0, bit 4 of q[j] in qh bit j",
             q5_0.quantize_row_q5_0, q5_0.dequantize_row_q5_0, lambda: _gpu().Q5_0),
    TypeInfo("q5_1", 7, 32, 24, True,
             "block_q5_1 { ggml_half d, m; uint8_t qh[4]; uint8_t qs[16]; }  x = d*q + m; "
             "low nibbles as q4_1, bit 4 of q[j] in qh bit j",
             q5_1.quantize_row_q5_1, q5_1.dequantize_row_q5_1, lambda: _gpu().Q5_1),
)}


def type_info(name: str) -> TypeInfo:
    """The TypeInfo for a ggml type name in any case (`Q8_0`, gguf-py's spelling, is q8_0), or a ValueError
    listing the valid names. Its `.name` is the canonical (ggml, lower-case) spelling."""
    try:
        return TYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown KV type {name!r}: expected one of {', '.join(TYPES)}") from None


def flavor_code(flavor: str) -> int:
    try:
        return FLAVOR_CODES[flavor]
    except (KeyError, TypeError):
        raise ValueError(f"unknown flavor {flavor!r}: expected one of {', '.join(FLAVORS)} "
                         "(ref = quantize_row_*_ref, cpu = ggml-cpu from_float on x86-64, "
                         "cuda = ggml-cuda set_rows)") from None
