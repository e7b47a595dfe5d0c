"""The three designs, each pinned to real code: which rules, which rotation graph, which init guard.

| era       | meta-backend rules            | rotation graph                          | TP + quantized KV guard |
|-----------|-------------------------------|-----------------------------------------|-------------------------|
| flatten   | 0.3.24 (no nr)                | 2D: reshape_2d, mul_mat, reshape_4d     | yes (llama-context.cpp) |
| pr23225   | 0.3.24 + MIRRORED x AXIS_2/3  | 4D: reshape_4d(n, ne0/n, ne1, ne2*ne3)  | removed                 |
| pr23792   | 0.3.36 (segments repeat nr)   | 2D (llama_mul_mat_hadamard, unchanged)  | removed                 |

llama-cpp-python 0.3.24 vendors llama.cpp of 2026-06-01, 0.3.36 the October 2026 code after PR #23792.
PR #23225 was never merged; its diff is not public in the sources kvlab read, so its 4D reshape is
reconstructed from the PR text ("keep the rotation path in 4D form", "mirrored rotation matrices applied
to tensors split on axis 2/3") and reports of "the same reshape_4d + mirrored+axis-2/3 handler".
The CUDA flash-attention build follows the same sdists (ggml/src/ggml-cuda/fattn.cu).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Era:
    name: str
    source: str                    # which real code it follows
    rules_version: str             # "0.3.24" or "0.3.36" (ggml-backend-meta.cpp)
    mirrored_batched_mul_mat: bool  # PR #23225's handle_mul_mat addition
    rotation_4d: bool              # PR #23225's 4D rotation instead of the 2D flatten
    tp_quant_guard: bool           # llama_init_from_model refuses SPLIT_MODE_TENSOR + quantized K or V
    granularity_version: str       # llama_meta_device_get_split_state of that version
    cuda_version: str              # ggml-cuda fattn.cu of that version

    @property
    def has_nr(self) -> bool:
        return self.rules_version == "0.3.36"


ERAS = {e.name: e for e in (
    Era("flatten", "llama-cpp-python 0.3.24 (llama.cpp 2026-06-01)", "0.3.24", False, False, True,
        "0.3.24", "0.3.24"),
    Era("pr23225", "llama-cpp-python 0.3.24 + PR #23225 (4D rotation, one mul_mat rule, guard removed)",
        "0.3.24", True, True, False, "0.3.24", "0.3.24"),
    Era("pr23792", "llama-cpp-python 0.3.36 (llama.cpp October 2026, PR #23792 merged)", "0.3.36", False,
        False, False, "0.3.36", "0.3.36"),
)}


def get_era(era) -> Era:
    if isinstance(era, Era):
        return era
    try:
        return ERAS[era]
    except (KeyError, TypeError):
        raise ValueError(f"unknown era {era!r}: expected one of {', '.join(ERAS)}") from None
