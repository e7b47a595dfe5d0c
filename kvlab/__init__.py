"""kvlab: llama.cpp's quantized KV caches under tensor parallelism, bit-exact, in Python.

    import kvlab
    q = kvlab.quantize(x, "q4_0", flavor="ref")   # q.raw: ggml's bytes
    y = kvlab.dequantize(q)
    xr = kvlab.rotate(x, 128)                     # x @ H_128 per 128-chunk

Callable names never collide with modules: `kvlab.sweep(cfg)` is the function
kvlab.accuracy.sweep.sweep (the module lives in kvlab.accuracy). Type names are
accepted in any case (`Q8_0` is q8_0). `import kvlab` loads numpy and numba only;
torch, pandas, plotly, ipywidgets and transformers load where they are used, and
CUDA only when a GPU array is passed.
"""
from kvlab import _threads  # noqa: F401  numba's threading layer, chosen before any kernel runs
from kvlab.types import FLAVORS, TYPES, TypeInfo
from kvlab.quant import QTensor, dequantize, empty_cache, quantize, set_rows
from kvlab.rotation import RotationPlan, hadamard, rotate, rotation_plan
from kvlab.accuracy.attention import BACKENDS, attention_error
from kvlab.accuracy.synthetic import SyntheticConfig, synthetic_kv
from kvlab.accuracy.sample import KVSample, as_sample, captured_sample, synthetic_sample, load_sample, save_sample
from kvlab.accuracy.sweep import SweepConfig, run_sweep, sweep
from kvlab.accuracy.table import save_table
from kvlab.accuracy.depth import StackConfig, layer_growth

__version__ = "0.1.0"

__all__ = [
    "FLAVORS", "TYPES", "TypeInfo", "QTensor", "quantize", "dequantize", "set_rows", "empty_cache",
    "hadamard", "rotate", "rotation_plan", "RotationPlan",
    "attention_error", "BACKENDS", "synthetic_kv", "SyntheticConfig", "run_sweep", "sweep", "SweepConfig",
    "KVSample", "as_sample", "captured_sample", "synthetic_sample", "load_sample", "save_sample",
    "save_table", "layer_growth", "StackConfig",
]
