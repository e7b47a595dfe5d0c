"""The nine KV-cache types llama.cpp accepts for --cache-type-k/-v, as ggml defines them."""
from dataclasses import dataclass

FLAVORS = ("ref", "cpu", "cuda")
FLAVOR_CODES = {name: code for code, name in enumerate(FLAVORS)}  # kernels take the int


@dataclass(frozen=True)
class TypeInfo:
    name: str
    ggml_type: int          # enum ggml_type value (ggml.h)
    block_size: int         # values per block (ggml_blck_size)
    type_size: int          # bytes per block (ggml_type_size)
    is_quantized: bool
    layout: str             # the block struct, in ggml-common.h's words
    flavors: tuple = FLAVORS

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        """ggml_row_size: bytes of a row of n values (n a multiple of block_size)."""
        return n // self.block_size * self.type_size


TYPES = {t.name: t for t in (
    TypeInfo("f32", 0, 1, 4, False, "float32"),
    TypeInfo("f16", 1, 1, 2, False, "IEEE half, round to nearest even"),
    TypeInfo("bf16", 30, 1, 2, False, "bfloat16 (top half of float32), round to nearest even"),
    TypeInfo("q8_0", 8, 32, 34, True, "block_q8_0 { ggml_half d; int8_t qs[32]; }  x = d*q"),
    TypeInfo("q4_0", 2, 32, 18, True,
             "block_q4_0 { ggml_half d; uint8_t qs[16]; }  x = d*(q-8); "
             "qs[j] = q[j] | q[j+16] << 4"),
    TypeInfo("q4_1", 3, 32, 20, True,
             "block_q4_1 { ggml_half d, m; uint8_t qs[16]; }  x = d*q + m; "
             "qs[j] = q[j] | q[j+16] << 4"),
    TypeInfo("iq4_nl", 20, 32, 18, True,
             "block_iq4_nl { ggml_half d; uint8_t qs[16]; }  x = d*kvalues_iq4nl[q]; "
             "qs[j] = q[j] | q[j+16] << 4"),
    TypeInfo("q5_0", 6, 32, 22, True,
             "block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }  x = d*(q-16); "
             "low nibbles as q4_0, bit 4 of q[j] in qh bit j"),
    TypeInfo("q5_1", 7, 32, 24, True,
             "block_q5_1 { ggml_half d, m; uint8_t qh[4]; uint8_t qs[16]; }  x = d*q + m; "
             "low nibbles as q4_1, bit 4 of q[j] in qh bit j"),
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
