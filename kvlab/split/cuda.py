"""Does ggml-cuda run flash attention for this K/V pair at all? A separate question from the split rules.

ggml-cuda only compiles some FA vector kernels (cmake GGML_CUDA_FA_QUANTS, default
"q4_0-q4_0;q8_0-q8_0;f16-f16;bf16-bf16"; GGML_CUDA_FA_ALL_QUANTS compiles all). What a missing kernel
does depends on the version (ggml/src/ggml-cuda/fattn.cu):
- 0.3.24: `ggml_cuda_get_best_fattn_kernel` returns NONE when K and V types differ or K is
  q4_1/q5_0/q5_1 (unless GGML_CUDA_FA_ALL_QUANTS), so supports_op is false and the op cannot run on the
  GPUs: the "crashes with combinations other than q8_0/q8_0 & q4_0/q4_0" of PR #23225's thread.
- 0.3.36: any pair of f32/f16/bf16/q4_0/q4_1/q5_0/q5_1/q8_0 is supported; a pair without a compiled
  vector kernel has K and V converted to f16 first ("slow"). iq4_nl has no FA kernel in either version.
An f32 cache never reaches FA as f32: build_attn_mha casts it to f16 first.
"""
from dataclasses import dataclass

from kvlab.types import type_info
from kvlab.split.eras import get_era

DEFAULT_FA_QUANTS = "q4_0-q4_0;q8_0-q8_0;f16-f16;bf16-bf16"
_FA_TYPES = ("f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
_HEAD_SIZES = (40, 64, 72, 80, 96, 112, 128, 256)   # K head sizes whose V head size is the same


@dataclass(frozen=True)
class CudaFA:
    runs: bool
    kernel: str      # "vec" (compiled instance), "f16 conversion", or "none"
    reason: str
    read_k: str = ""  # the K and V types the kernel reads, where it runs (f32 reads as f16; f16 after a conversion)
    read_v: str = ""


def _compiled_pairs(fa_quants: str, all_quants: bool) -> set:
    """ggml_cuda_fattn_vec_instances (cmake/common.cmake 0.3.36): f16-f16 always, plus the listed pairs."""
    spec = "all" if all_quants else fa_quants.strip().lower()
    if spec == "all":
        return {(k, v) for k in _FA_TYPES for v in _FA_TYPES}
    pairs = {("f16", "f16")}
    for combo in spec.replace(",", ";").split(";"):
        k, sep, v = combo.strip().partition("-")
        if not sep or k not in _FA_TYPES or v not in _FA_TYPES:
            raise ValueError(f"GGML_CUDA_FA_QUANTS: {combo.strip()!r} is not 'all' or a <type_K>-<type_V> pair of "
                             f"{', '.join(_FA_TYPES)}")
        pairs.add((k, v))
    return pairs


def cuda_flash_attn(type_k: str, type_v: str, head_dim: int = 128, era="pr23792",
                    fa_quants: str = DEFAULT_FA_QUANTS, all_quants: bool = False) -> CudaFA:
    """Whether the era's ggml-cuda build runs FLASH_ATTN_EXT for this cache pair, and with which kernel."""
    era = get_era(era)
    type_info(type_k), type_info(type_v)
    k = "f16" if type_k == "f32" else type_k
    v = "f16" if type_v == "f32" else type_v
    if head_dim not in _HEAD_SIZES:
        return CudaFA(False, "none", f"no FA kernel for head size {head_dim} with equal K/V head sizes "
                                     f"(fattn.cu supports {', '.join(map(str, _HEAD_SIZES))})")
    missing = [t for t in (k, v) if t not in _FA_TYPES]
    if era.cuda_version == "0.3.24":
        if not all_quants:
            if k != v:
                return CudaFA(False, "none", f"K {k} and V {v} differ: without GGML_CUDA_FA_ALL_QUANTS, fattn.cu "
                                             "returns BEST_FATTN_KERNEL_NONE for K->type != V->type")
            if k in ("q4_1", "q5_0", "q5_1"):
                return CudaFA(False, "none", f"{k}/{v}: without GGML_CUDA_FA_ALL_QUANTS, fattn.cu returns "
                                             "BEST_FATTN_KERNEL_NONE for q4_1/q5_0/q5_1 K")
        if k not in _FA_TYPES:
            return CudaFA(False, "none", f"fattn.cu has no kernel for K type {k}")
        if missing:   # only K's type is checked; the vector kernel then finds no instance and aborts
            return CudaFA(False, "none", f"no FA vector kernel for V type {v}: ggml_cuda_flash_attn_ext_vec "
                                         "reaches GGML_ABORT")
        return CudaFA(True, "vec", "kernel compiled" + (" (GGML_CUDA_FA_ALL_QUANTS)" if all_quants else ""), k, v)
    if missing:
        return CudaFA(False, "none", f"ggml_cuda_fattn_kv_type_supported({missing[0]}) is false: no FA kernel")
    if (k, v) in _compiled_pairs(fa_quants, all_quants):
        return CudaFA(True, "vec", f"vector kernel {k}-{v} compiled", k, v)
    return CudaFA(True, "f16 conversion", f"no FlashAttention vector kernel compiled for K/V types {k}-{v}, "
                                          f"converting K and V to f16 instead (slow); add \"{k}-{v}\" to "
                                          "GGML_CUDA_FA_QUANTS to compile it", "f16", "f16")
