"""The real ggml C library through ctypes: the ground truth kvlab's bytes are checked against.

Needs only the two shared libraries (no compiler at run time): libggml-base.so (type traits:
`from_float_ref` = quantize_row_<type>_ref, `to_float` = dequantize_row_<type>) and libggml-cpu.so
(`from_float` = what the CPU backend's set_rows writes). Build them with `tools/build_ggml.sh`,
or install ggml-python, which ships them in `ggml/lib/`. `find_lib_dir` and `open_libraries` are the
one way kvlab finds and opens them (kvlab.ggml.meta's child process too, which loads this file on its
own, without the kvlab package: so kvlab.types is imported where the type traits need it).

    lib = kvlab.ggml.load()                   # KVLAB_GGML_LIB, then ggml-python's ggml/lib/
    raw = lib.quantize_ref(x, "q4_0")         # (*x.shape[:-1], row_bytes) uint8
    y = lib.dequantize(raw, "q4_0", x.shape[-1])

Struct layouts are those of llama-cpp-python 0.3.36's ggml.h / ggml-cpu.h (0.3.24's are the same);
`load` checks them against kvlab.TYPES so a different layout fails loudly, not silently.
ctypes releases the GIL around each call, so row chunks can run in parallel Python threads.
"""
import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np

LIBRARIES = ("libggml-base.so", "libggml-cpu.so")

# typedef void (*ggml_to_float_t)  (const void * x, float * y, int64_t k);
# typedef void (*ggml_from_float_t)(const float * x, void * y, int64_t k);   k = number of values
_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):        # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class _TypeTraitsCpu(ctypes.Structure):     # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


def find_lib_dir(path=None) -> Path:
    """The directory holding libggml-base.so and libggml-cpu.so: `path` (that directory or either .so in
    it), else $KVLAB_GGML_LIB, else ggml-python's ggml/lib/."""
    if path is None:
        path = os.environ.get("KVLAB_GGML_LIB")
    if path is None:
        spec = importlib.util.find_spec("ggml")   # ggml-python ships the libraries in ggml/lib/
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "ggml C library not found: set KVLAB_GGML_LIB to the directory holding libggml-base.so and "
                "libggml-cpu.so (tools/build_ggml.sh prints it), or pip install ggml-python")
        path = Path(next(iter(spec.submodule_search_locations))) / "lib"
    p = Path(path)
    d = p.parent if p.is_file() or p.suffix == ".so" else p
    for lib in LIBRARIES:
        if not (d / lib).exists():
            raise FileNotFoundError(f"{d} has no {lib}: expected the directory of a ggml build "
                                    f"(tools/build_ggml.sh) or of ggml-python's ggml/lib")
    return d


def llama_cpp_lib_dir() -> Path | None:
    """llama-cpp-python's own libggml (llama_cpp/lib/), where it is installed: the ggml of the llama.cpp it
    vendors (0.3.36: ggml 0.25.3), built from its sdist for this CPU. None without it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return d if all((d / lib).exists() for lib in LIBRARIES) else None


def open_libraries(lib_dir: Path) -> tuple:
    """(libggml-base, libggml-cpu) as ctypes.CDLL, each bound to itself: two ggml builds can live in one
    process (ggml-python's and llama-cpp-python's export the same names, ggml_vec_dot_f16 among them).
    RTLD_LOCAL keeps this copy's symbols out of everyone else's lookups; RTLD_DEEPBIND makes its own calls
    (libggml-cpu to its functions and to the ggml-base its $ORIGIN runpath finds, loaded here first) take
    its own definitions before any copy loaded earlier."""
    mode = ctypes.RTLD_LOCAL | os.RTLD_DEEPBIND
    return tuple(ctypes.CDLL(str(Path(lib_dir) / lib), mode=mode) for lib in LIBRARIES)


def _context_blocks(block_size):
    """Two blocks after which iq4_nl's stale qs differ in every byte: L = all 0 (qs 0x00), then
    L = 0 at the block's max and 15 elsewhere (qs 0xF0, 0xFF, ...)."""
    spread = np.full(block_size, -0.875, np.float32)
    spread[0] = 1.0
    return np.ones(block_size, np.float32), spread


class GGML:
    """libggml-base + libggml-cpu loaded from one directory; quantize/dequantize whole arrays."""

    def __init__(self, lib_dir=None):
        from kvlab.types import TYPES
        self.lib_dir = find_lib_dir(lib_dir)
        self.base, self.cpu = open_libraries(self.lib_dir)
        self.base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        self.base.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.cpu.ggml_cpu_init()              # fills the fp16 tables some CPU from_float paths read
        for name in TYPES:
            self._check_layout(name)

    @property
    def version(self) -> str:
        """ggml's version and commit, where the library exports them (older builds do not)."""
        try:
            version, commit = self.base.ggml_version, self.base.ggml_commit
        except AttributeError:
            return "unknown"
        version.restype = commit.restype = ctypes.c_char_p
        return f"{version().decode()} ({commit().decode()})"

    def _traits(self, name: str) -> _TypeTraits:
        return self.base.ggml_get_type_traits(_info(name).ggml_type).contents

    def _check_layout(self, name: str) -> None:
        info, traits = _info(name), self._traits(name)
        seen = (traits.type_name, traits.blck_size, traits.type_size)
        if seen != (name.encode(), info.block_size, info.type_size):
            raise RuntimeError(f"ggml in {self.lib_dir} does not match the 0.3.36 ggml_type_traits layout: "
                               f"type {info.ggml_type} reads as {seen}, expected {name, info.block_size, info.type_size}")

    def row_fn(self, name: str, path: str):
        """The C function of one path: 'ref' (from_float_ref), 'cpu' (from_float) or 'to_float'.

        None where ggml has none: f32 has neither from_float_ref nor to_float (its rows are copied)."""
        if path == "cpu":
            pointer = self.cpu.ggml_get_type_traits_cpu(_info(name).ggml_type).contents.from_float
        elif path in ("ref", "to_float"):
            pointer = getattr(self._traits(name), "from_float_ref" if path == "ref" else "to_float")
        else:
            raise ValueError(f"unknown ggml path {path!r}: expected 'ref', 'cpu' or 'to_float'")
        return _ROW_FN(pointer) if pointer else None

    def quantize_ref(self, x, name: str, out=None):
        """quantize_row_<type>_ref over x's last axis: (*x.shape[:-1], row_bytes) uint8."""
        return self._quantize(x, name, "ref", out)

    def quantize_cpu(self, x, name: str, out=None):
        """The CPU backend's from_float (SIMD where this build has it) over x's last axis."""
        return self._quantize(x, name, "cpu", out)

    def quantize_defined(self, x, name: str, path: str):
        """(bytes, mask of the bytes the input decides) of one quantize path ('ref' or 'cpu') on x.

        Some C paths do not write every byte from the block's own input: iq4_nl's ref packs a block
        with max|x| < 1e-15 from a stack array that earlier blocks of the same call (or nothing)
        filled. So each block is also quantized right after each of two context blocks; a byte is
        defined where all three runs agree.
        """
        info = _info(name)
        quantize = self.quantize_ref if path == "ref" else self.quantize_cpu
        plain = quantize(x, name, out=np.zeros((*np.shape(x)[:-1], info.row_bytes(np.shape(x)[-1])), np.uint8))
        defined = np.ones(plain.shape, bool)
        blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, info.block_size)  # (n_blocks, block_size)
        for context in _context_blocks(info.block_size):
            pairs = np.empty((len(blocks), 2, info.block_size), np.float32)    # (n_blocks, context + block)
            pairs[:, 0], pairs[:, 1] = context, blocks
            out = np.full((len(blocks), 2 * info.type_size), 0xA5, np.uint8)   # (n_blocks, 2 blocks of bytes)
            quantize(pairs.reshape(len(blocks), -1), name, out=out)
            defined &= plain == out[:, info.type_size:].reshape(plain.shape)
        return plain, defined

    def _quantize(self, x, name, path, out):
        info = _info(name)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 0 or x.shape[-1] % info.block_size:
            raise ValueError(f"{name}: last dim must be a multiple of {info.block_size}, got shape {x.shape}")
        shape = (*x.shape[:-1], info.row_bytes(x.shape[-1]))
        out = _checked_out(out, shape, np.uint8)
        fn = self.row_fn(name, path)
        if fn is None:                        # f32: ggml copies the floats as they are
            out[...] = x.view(np.uint8).reshape(shape)
        elif info.is_quantized:               # blocks are independent: one call for the whole array
            fn(x.ctypes.data, out.ctypes.data, x.size)
        else:
            # one call per row, as set_rows makes them: the CPU path converts a row's body with F16C
            # and its tail in software, and the two differ on NaN payloads
            rows, row_bytes = x.reshape(-1, x.shape[-1]), out.reshape(-1, shape[-1])  # (n_rows, n), (n_rows, bytes)
            for r in range(rows.shape[0]):
                fn(rows[r].ctypes.data, row_bytes[r].ctypes.data, rows.shape[1])
        return out

    def dequantize(self, raw, name: str, n: int, out=None):
        """to_float (dequantize_row_<type>) of rows of n values: (*raw.shape[:-1], n) float32."""
        info = _info(name)
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if n % info.block_size or raw.shape[-1] != info.row_bytes(n):
            raise ValueError(f"{name}: rows of {n} values take {info.row_bytes(n)} bytes, got shape {raw.shape}")
        out = _checked_out(out, (*raw.shape[:-1], n), np.float32)
        fn = self.row_fn(name, "to_float")
        if fn is None:                        # f32: the bytes are the floats
            out[...] = raw.view(np.float32)
        else:
            fn(raw.ctypes.data, out.ctypes.data, out.size)
        return out


def _checked_out(out, shape, dtype):
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, "
                         f"got {out.dtype} {out.shape}")
    return out


_loaded: dict = {}


def _info(name: str):
    """kvlab.types.type_info, imported here rather than at the top (see the module docstring)."""
    from kvlab.types import type_info
    return type_info(name)


def load(lib_dir=None) -> GGML:
    """The library in lib_dir (default: KVLAB_GGML_LIB, then ggml-python's), loaded once per directory."""
    key = str(find_lib_dir(lib_dir))
    if key not in _loaded:
        _loaded[key] = GGML(key)
    return _loaded[key]
