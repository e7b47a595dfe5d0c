"""kvlab.kernels.cuda: the GPU twins of kvlab.kernels' quantizers (Numba CUDA), same bytes.

Importing this package needs no GPU; the first call of an entry point compiles the kernels
(cached on disk, ``cache=True``). Arrays are anything with ``__cuda_array_interface__`` (numba
device arrays, torch CUDA tensors, CuPy), C-contiguous, and are used in place (zero copy):

    quantize(x, out, info, flavor_code)           x (rows, cols) float32 -> out (rows, row_bytes) uint8
    dequantize(raw, out, info)                    raw (rows, row_bytes) uint8 -> out (rows, cols) float32
    set_rows(cache, row_ids, values, info, flavor_code)
        cache (n_cache_rows, row_bytes) uint8; values (n, cols) float32; row_ids (n,) int32/int64:
        cache[row_ids[k]] <- quantize(values[k])          (ggml_set_rows, as llama.cpp writes K/V)
    rotate_quantize(x, out, info, flavor_code, n, scale, row_ids=None)
        quantize(x @ H_n per n-chunk of each row) without writing the rotated floats anywhere;
        with row_ids, out is a cache and rows land as in set_rows
    dequantize_unrotate(raw, out, info, n, scale) out = dequantize(raw) @ H_n per n-chunk
    rotate(x, out, n, scale)                      out = x @ H_n per n-chunk, x and out (rows, cols) float32
info is the type's kvlab.types.TypeInfo (kvlab.TYPES[name]: the kernels sit below the type table, as
ggml-cuda below ggml's type_traits), row_bytes = info.row_bytes(cols) (ggml_row_size); n is a power of
two dividing cols, at most 4096 (32 .. 4096 for the fused kernels). 16-byte aligned arrays take the fast
paths (torch's and numba's allocations are); others are handled, slower.
``flavor_code`` is kvlab.types.flavor_code(): 0 ref, 1 cpu, 2 cuda; ``scale`` is H_n[0, 0]
(kvlab.rotation.hadamard_scale(n)).

Streams. Every entry point takes ``stream=`` (an int handle, a torch.cuda.Stream, a numba stream, or
anything with ``__cuda_stream__``); without it a call launches on the stream its arrays name: for a CUDA
torch tensor, torch's current stream on the tensor's device (torch.cuda.current_stream(), so a call
inside ``torch.cuda.stream(s)`` or a graph capture goes to that stream), else the ``stream`` entry of
an array's ``__cuda_array_interface__`` (v3: 1 the legacy default stream, 2 the per-thread one, else a
cudaStream_t: the producer's stream, so the call is ordered after the writes that made the array), else
the default stream (0). Every launch of a call (set_rows' ids check included) goes to that one stream.
Calls are asynchronous and never wait for the GPU, allocate nothing on it after the first call (every
array, out= included, is the caller's), and copy nothing between host and device: a call can be
captured into a CUDA graph (torch.cuda.graph, cudaStreamBeginCapture). Make one call of the same shapes
eagerly first (outside the capture: it compiles or loads the kernels and allocates kvlab's few device
words once); torch's own advice, a warm-up on a side stream, does this.
The arguments are checked on the host from the arrays' own description (a CUDA torch tensor's
attributes, else ``__cuda_array_interface__``: shape, dtype, contiguity, alignment); set_rows' ids,
which live on the GPU, are checked there, before anything is written: a call with an id outside the
cache's rows writes nothing and raises ValueError in the first call after the GPU has run it
(``raise_refused()`` asks at any time; after a synchronize it is certain). The verdict is a word of
mapped host memory that the kernel sets, so it works in a replayed CUDA graph too, where no Python
runs: call ``raise_refused()`` after the replay's synchronize. (kvlab.set_rows, the public one, checks
its ids on the host first and copies them to the device: not a call to capture; this one is.)
set_rows with more than 1024 ids checks them in a kernel of its own first, which leaves its verdict in a
device word of the call's stream (one of 256, by stream): calls on different streams do not share it.
Launches: the first call of a kernel and shape goes through numba's dispatcher (compile or cache load,
typing); it leaves the compiled function and its packed parameters behind (_DirectLaunch), and the
call leaves its launches behind, keyed by what its checks depend on (shapes, dtypes, layouts,
alignments, scalars). A later call with that key is checked by finding it, and replays the launches
with its own addresses (cuLaunchKernel): microseconds of host time. The simulator
(NUMBA_ENABLE_CUDASIM=1) always takes the dispatcher, and so does every call with KVLAB_CUDA_DIRECT=0
in the environment (to compare the two). A dequantize of more tiles than the GPU holds at once has its
blocks prefetch (into L2) the bytes of the tile half a wave later (kernels.py, _PREFETCH); the quantizers
can too, but measured slower with it and do not; KVLAB_CUDA_PREFETCH=0 turns it off, =all on for both
(a hint: the bytes are the same either way). iq4_nl's quantize blocks take 4 consecutive tiles each, the
next one's loads in flight while they quantize one (kernels.TILES_PER_BLOCK; KVLAB_CUDA_TILES_PER_BLOCK=K
sets K, for measuring).
"""
import ctypes
import math
import os
import sys
import warnings
from typing import NamedTuple

import numpy as np

_TYPESTR = {np.dtype(t).str: np.dtype(t) for t in (np.float32, np.uint8, np.int32, np.int64, np.uint16,
                                                   np.uint32, np.float16, np.float64, np.int8, np.int16,
                                                   np.bool_)}     # bool: flash_decode's mask


def _k():
    from . import kernels        # numba.cuda loads here, not at `import kvlab`
    return kernels


class _View(NamedTuple):
    """A C-contiguous device array as the kernels need it: its address, shape and dtype; source is the
    object itself (the dispatcher's path and the simulator take it)."""
    ptr: int
    shape: tuple
    dtype: np.dtype
    source: object

    @property
    def size(self):
        return math.prod(self.shape)


def _describe(a):
    """(shape, typestr, contiguous, address, stream) of a device array, read from the array itself
    (torch's tensor attributes, else __cuda_array_interface__; stream: the tensor itself, whose device's
    current stream torch knows, else the interface's 'stream', None where it names none); None for None
    and for what has neither (the simulator's arrays, a CPU tensor, a tensor that requires grad: _view
    says why)."""
    if a is None:
        return None
    typestr = _torch_typestr(a)
    if typestr is not None:
        return tuple(a.shape), typestr, a.is_contiguous(), a.data_ptr(), a
    iface = getattr(a, "__cuda_array_interface__", None)
    if iface is None:
        return None
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    contiguous = strides is None or tuple(strides) == _c_strides(shape, _dtype(iface["typestr"]).itemsize)
    return shape, iface["typestr"], contiguous, iface["data"][0], iface.get("stream")


def _dtype(typestr):
    return _TYPESTR.get(typestr) or np.dtype(typestr)


_TORCH = {}


def _torch_typestr(a):
    """The numpy typestr of a CUDA torch tensor that a kernel may take (no grad), else None."""
    torch = sys.modules.get("torch")         # never imported here just to ask
    if torch is None or not isinstance(a, torch.Tensor) or not a.is_cuda or a.requires_grad:
        return None
    if not _TORCH:
        _TORCH.update({getattr(torch, t.name): t.str for t in _TYPESTR.values() if hasattr(torch, t.name)})
    return _TORCH.get(a.dtype)


def _view(a, what, dtype, ndim):
    d = _describe(a)
    if d is not None:
        shape, typestr, contiguous, ptr, _ = d
        dt = _dtype(typestr)
    elif hasattr(a, "copy_to_host"):          # the simulator's device arrays have no interface
        shape, dt, contiguous, ptr = tuple(a.shape), a.dtype, a.is_c_contiguous(), 0
    else:
        raise TypeError(f"{what}: expected a CUDA array (__cuda_array_interface__), got {type(a).__name__}")
    if (dtype is not None and dt != dtype) or len(shape) != ndim or not contiguous:
        raise ValueError(f"{what}: expected a C-contiguous {ndim}-D {np.dtype(dtype or dt)} array, "
                         f"got {len(shape)}-D {dt}{'' if contiguous else ' (not contiguous)'}")
    return _View(ptr, shape, dt, a)


def _c_strides(shape, itemsize):
    strides = []
    for n in reversed(shape):
        strides.append(itemsize)
        itemsize *= n
    return tuple(reversed(strides))


def _check_info(info):
    # the kernels sit below kvlab.types: the caller looks its TypeInfo up (kvlab.TYPES[name])
    if not hasattr(info, "gpu_codec"):
        raise TypeError(f"expected a kvlab.types.TypeInfo (kvlab.TYPES[name]), got {type(info).__name__}")


def _aligned(v, width):
    """The array's first byte sits on a multiple of width (the simulator's numpy arrays: always)."""
    return v.ptr % width == 0


def _check_value_alignment(v, info, what):
    if not _aligned(v, info.type_size):
        raise ValueError(f"{what}: {info.name} values must start on a {info.type_size}-byte boundary")


# ---- launching -------------------------------------------------------------------------------------
class _Flat(NamedTuple):
    """A kernel argument: the view's elements as a flat 1-D array (the kernels' x, y, out)."""
    view: _View


class _Full(NamedTuple):
    """A kernel argument: the view as it is (N-D), optionally reinterpreted as another dtype."""
    view: _View
    dtype: object = None


class _Value(NamedTuple):
    """A kernel argument: a scalar that calls of one key may vary (it is not part of the key; flash_decode's
    context length), value number `index` of the call's values (_call's values=)."""
    index: int
    value: object


_ARRAY_ARGS = (_Flat, _Full)


def _numba_array(arg):
    from numba import cuda
    v = arg.view
    # sync=False: the launch goes to the call's stream, in order; no host wait on an exported stream
    d = v.source if hasattr(v.source, "copy_to_host") else cuda.as_cuda_array(v.source, sync=False)
    if isinstance(arg, _Flat):
        return d.reshape(d.size)                                   # (elements,)
    return d if arg.dtype is None else d.view(arg.dtype)


def _arg(a):
    """A launch argument as numba's dispatcher takes it."""
    if isinstance(a, _ARRAY_ARGS):
        return _numba_array(a)
    return a.value if isinstance(a, _Value) else a


def _launch(kernel, grid, block, args, stream, shared=0):
    """kernel[grid, block, stream, shared](*args), arrays given as _Flat/_Full views, stream a CUstream handle
    (int), shared the bytes of dynamic shared memory (the kernel is allowed them first: _configured).
    Off the simulator, the first call of a key (kernel, grid, shared, and the arguments but the arrays'
    addresses) takes numba's dispatcher and keeps a _DirectLaunch; the next ones launch through it."""
    if _k().SIM:
        kernel[grid, block, 0, shared](*[_arg(a) for a in args])
        return
    if not _DIRECT_LAUNCH:
        _configured(kernel, grid, block, stream, shared)(*[_arg(a) for a in args])
        return
    ptrs, values = [], []
    key = [kernel, grid, block, shared]
    for pos, a in enumerate(args):
        if isinstance(a, _ARRAY_ARGS):
            ptrs.append(a.view.ptr)
            key.append((a.view.shape, a.view.dtype, a.dtype if isinstance(a, _Full) else 0))
        elif isinstance(a, _Value):
            values.append((pos, a.value))
            key.append((_Value, type(a.value)))
        else:
            key.append(a)
    key = tuple(key)
    direct = _DIRECT.get(key)
    if direct:
        direct(ptrs, stream, values) if values else direct(ptrs, stream)
    else:
        numba_args = [_arg(a) for a in args]
        _configured(kernel, grid, block, stream, shared)(*numba_args)   # compiles or loads, binds the module
        if direct is None:
            if len(_DIRECT) >= _DIRECT_KEYS:         # many shapes (a prefill of every length): start over
                _DIRECT.clear()
            overload = kernel.overloads.get(tuple(kernel.typeof_pyval(a) for a in numba_args))
            # None: the dispatcher converted an argument to an overload of other types; it keeps this key
            direct = _DIRECT[key] = (False if overload is None
                                     else _direct_launch(overload, grid, block, shared, numba_args))
    if _RECORDING:
        _record(_RECORDING[-1], direct, [a.view.source for a in args if isinstance(a, _ARRAY_ARGS)], ptrs,
                [(pos, a.index) for pos, a in enumerate(args) if isinstance(a, _Value)])


def _configured(kernel, grid, block, stream, shared):
    """numba's launch configuration kernel[grid, block, stream, shared], which first allows the compiled kernel
    `shared` bytes of dynamic shared memory (CUDA's default limit is 48 KB with the static)."""
    config = kernel[grid, block, _numba_stream(stream), shared]
    if shared:
        config.pre_launch_callbacks.append(lambda compiled, _: _allow_shared(compiled, shared))
    return config


def _allow_shared(compiled, shared):
    from cuda.bindings import driver
    func = compiled._codelibrary.get_cufunc()                   # its handle: a CUkernel
    attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    _check(driver.cuKernelSetAttribute(attribute, shared, func.handle, func.device.id)[0], "cuKernelSetAttribute")


# ---- streams -----------------------------------------------------------------------------------------
def _stream_handle(stream):
    """A caller's stream= as a CUstream handle (int): an int as it is, a torch.cuda.Stream (cuda_stream),
    an object with __cuda_stream__ (cuda.core's protocol), a numba stream (handle)."""
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, (bool, np.bool_)):
        return int(stream)
    handle = getattr(stream, "cuda_stream", None)
    if handle is None and hasattr(stream, "__cuda_stream__"):
        handle = stream.__cuda_stream__()[1]
    if handle is None and hasattr(stream, "handle") and hasattr(stream, "synchronize"):
        handle = stream.handle
        handle = getattr(handle, "value", handle) or 0      # ctypes c_void_p (None for 0) or CUstream
    if handle is None and type(stream).__module__.startswith("numba.cuda.simulator"):
        handle = 0                                           # the simulator's streams: one order anyway
    if handle is None:
        raise TypeError(f"stream: expected a CUDA stream (an int handle, a torch.cuda.Stream, a numba "
                        f"stream), got {type(stream).__name__}")
    return int(handle)


_TORCH_STREAM = []


def _torch_stream(a):
    """torch's current stream on the device of the CUDA tensor a, as a handle."""
    if not _TORCH_STREAM:
        torch = sys.modules["torch"]
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)     # one C call, no Stream object
        _TORCH_STREAM.append(raw if raw is not None
                             else lambda index: torch.cuda.current_stream(index).cuda_stream)
    return _TORCH_STREAM[0](a.get_device())


def _implied_stream(arrays):
    """The stream a call's arrays name: torch's current stream for a CUDA torch tensor, else the
    __cuda_array_interface__'s 'stream' of the first array that gives one, else 0 (the default stream)."""
    for a in arrays:
        d = _describe(a)
        if d is not None and d[4] is not None:
            return _stream_of(d[4])
    return 0


def _stream_of(named):
    """A stream an array names (_describe's last field): a CUDA torch tensor's device's current stream,
    or the interface's handle."""
    return int(named) if isinstance(named, (int, np.integer)) else _torch_stream(named)


_NUMBA_STREAMS = {}


def _numba_stream(handle):
    """The numba stream object of a handle, for launches through numba's dispatcher."""
    s = _NUMBA_STREAMS.get(handle)
    if s is None:
        from numba import cuda
        s = {0: cuda.default_stream, 1: cuda.legacy_default_stream,
             2: cuda.per_thread_default_stream}.get(handle, lambda: cuda.external_stream(handle))()
        if len(_NUMBA_STREAMS) >= 256:
            _NUMBA_STREAMS.clear()
        _NUMBA_STREAMS[handle] = s
    return s


# ---- a call's launches, replayed ----------------------------------------------------------------------
# Every check of an entry point depends only on its arrays' shapes, dtypes, layouts and alignments and
# on its scalars: a call whose key (those) has been made before, and passed, is checked by finding its
# key; it then replays the launches recorded then, with this call's addresses.
_PLANS = {}
_RECORDING = []      # the call being made the slow way: {"arrays", "launches", "complete"}


def _call(name, scalars, keep, arrays, stream, slow, *args, values=()):
    """slow(*args, stream), or the replay of its launches: name and scalars identify the entry point's
    call (an object by its id(), kept alive in keep), arrays are its array arguments (None where
    absent), stream the caller's stream= (None: the one the arrays name, _implied_stream), values the
    scalars that vary within a key (launched as _Value(i, values[i]))."""
    key = _call_key(name, scalars, arrays)
    if stream is not None:
        stream = _stream_handle(stream)
    elif key is not None:
        stream = 0 if key[2] is None else _stream_of(key[2])
    else:
        stream = _implied_stream(arrays)
    if key is None:
        slow(*args, stream)
        return
    plan = _PLANS.get(key[0])
    if plan is not None:
        ptrs = key[1]
        if plan[2]:                                   # set_rows' ids check word: the stream's own
            ptrs = ptrs + [_flag_view(stream).ptr]
        for direct, base, slots, value_slots in plan[0]:
            for pos, idx in slots:
                base[pos] = ptrs[idx]
            if value_slots:
                direct(base, stream, [(pos, values[i]) for pos, i in value_slots])
            else:
                direct(base, stream)
        return
    _RECORDING.append({"arrays": arrays, "launches": [], "complete": True, "flag": False})
    try:
        slow(*args, stream)
    finally:
        rec = _RECORDING.pop()
    if rec["complete"]:
        if len(_PLANS) >= _DIRECT_KEYS:
            _PLANS.clear()
        _PLANS[key[0]] = rec["launches"], keep, rec["flag"]


def _call_key(name, scalars, arrays):
    """(key, addresses, the stream the arrays name: the first array's that names one, else None) of a
    call, None where some array has no description (the simulator) or every call takes the dispatcher."""
    if not _DIRECT_LAUNCH:
        return None
    key = [name, *scalars]
    ptrs = []
    named = None
    for a in arrays:
        d = None if a is None else _describe(a)
        if d is None and a is not None:
            return None
        key.append(d and (d[0], d[1], d[2], d[3] & 15))
        ptrs.append(d[3] if d else 0)
        if named is None and d is not None:
            named = d[4]
    return tuple(key), ptrs, named


def _record(rec, direct, sources, ptrs, value_slots=()):
    """One launch of the call being recorded: its _DirectLaunch, its array addresses, and which of them
    are the call's arrays or its stream's ids check word (slots: (position, index in the call's arrays;
    len(arrays) for the word)); the others are fixed (zero_ids, refused); value_slots: (argument
    position, index in the call's values) of its _Value arguments."""
    if not direct:
        rec["complete"] = False
        return
    arrays = rec["arrays"]
    slots = [(pos, idx) for pos, src in enumerate(sources) for idx, a in enumerate(arrays) if src is a]
    flags = [(pos, len(arrays)) for pos, src in enumerate(sources) if isinstance(src, _FlagWord)]
    rec["flag"] = rec["flag"] or bool(flags)
    rec["launches"].append((direct, list(ptrs), slots + flags, value_slots))


def _direct_launch(overload, grid, block, shared, numba_args):
    """A _DirectLaunch, or False (the dispatcher keeps the key) where numba-cuda or the CUDA bindings
    are not what it was written against (numba-cuda 0.30.4, cuda-bindings 13)."""
    try:
        return _DirectLaunch(overload, grid, block, shared, numba_args)
    except (AttributeError, ImportError, RuntimeError, TypeError) as e:
        warnings.warn(f"kvlab.kernels.cuda: no direct launch ({type(e).__name__}: {e}); numba's dispatcher "
                      f"launches every call", RuntimeWarning, stacklevel=3)
        return False


_DIRECT = {}
_DIRECT_KEYS = 4096
_DIRECT_LAUNCH = os.environ.get("KVLAB_CUDA_DIRECT", "1") != "0"


class _DirectLaunch:
    """One compiled kernel with its parameters packed as numba passes them (an array is meminfo, parent,
    nitems, itemsize, data, shape.., strides.., each pointer-sized; scalars as their C type), launched
    by cuLaunchKernel; a call sets the arrays' data pointers and, where given, scalars (_Value)."""

    def __init__(self, overload, grid, block, shared, numba_args):
        from cuda.bindings import driver
        from numba.cuda import types
        err, self.func = driver.cuKernelGetFunction(overload._codelibrary.get_cufunc().handle)
        _check(err, "cuKernelGetFunction")
        self.launch = driver.cuLaunchKernel
        self.dims = _dim3(grid) + _dim3(block)
        self.shared = shared
        self.values, self.ptrs, self.first_cell = [], [], []
        for ty, a in zip(overload.argument_types, numba_args):
            self.first_cell.append(len(self.values))            # an argument's first parameter
            self._pack(types, ty, a)
        self.params = (ctypes.c_void_p * len(self.values))(*[ctypes.addressof(v) for v in self.values])
        self.params_ptr = ctypes.addressof(self.params)

    def _pack(self, types, ty, a):
        if isinstance(ty, types.Array):
            fields = [0, 0, a.size, a.dtype.itemsize, 0, *a.shape, *a.strides]
            cells = [ctypes.c_ssize_t(f) for f in fields]
            self.ptrs.append(cells[4])
            self.values += cells
        elif isinstance(ty, types.BaseTuple):                  # numba passes its elements one by one
            for t, x in zip(ty, a):
                self._pack(types, t, x)
        elif ty == types.boolean:
            self.values.append(ctypes.c_bool(a))
        elif ty == types.float32:
            self.values.append(ctypes.c_float(a))
        elif isinstance(ty, types.Integer):
            self.values.append(getattr(ctypes, f"c_{ty}")(a))
        else:
            raise TypeError(f"no direct launch for a {ty} argument")

    def __call__(self, ptrs, stream, scalars=()):
        """ptrs: the arrays' addresses in order; scalars: (argument position, value) of scalars to set."""
        for cell, p in zip(self.ptrs, ptrs):
            cell.value = p
        for pos, x in scalars:
            self.values[self.first_cell[pos]].value = x
        # the driver copies the parameters at the call (a graph capture too): the cells may change
        # right after
        _check(self.launch(self.func, *self.dims, self.shared, stream, self.params_ptr, 0)[0], "cuLaunchKernel")


def _dim3(d):
    d = (d,) if isinstance(d, int) else tuple(d)
    return d + (1,) * (3 - len(d))


def _check(err, what):
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")


# ---- set_rows' ids: checked on the GPU ---------------------------------------------------------------
_STATE = {}


FLAG_WORDS = 256


def _state(name):
    """Device words made once: 'zero_ids' (1 id, for calls without row_ids), 'flags' (FLAG_WORDS words:
    check_rows_kernel's verdict for the next launch of its stream, _flag_view), 'refused' (mapped host
    memory: set by a kernel that refused its ids)."""
    if not _STATE:
        from numba import cuda
        _STATE["zero_ids"] = _view(cuda.to_device(np.zeros(1, np.int64)), "ids", None, 1)
        _STATE["flags"] = _view(cuda.to_device(np.zeros(FLAG_WORDS, np.int32)), "flags", None, 1)
        _STATE["flag_words"] = {}
        refused = cuda.mapped_array(1, np.int32)
        refused[0] = 0
        _STATE["refused_host"] = refused
        # numba-cuda 0.30.4's launch takes no mapped array (its pointer comes out None): the kernels get
        # the device address through the interface, as any foreign array
        seen = refused if _k().SIM else _Interface(dict(refused.__cuda_array_interface__))
        _STATE["refused"] = _view(seen, "refused", None, 1)
    return _STATE[name]


class _Interface:
    """An array known by its __cuda_array_interface__ only."""

    def __init__(self, interface):
        self.__cuda_array_interface__ = interface


class _FlagWord(_Interface):
    """One word of the 'flags' state: a stream's ids check verdict (a replayed call takes its stream's)."""


def _flag_view(stream):
    """The ids check word of a stream: word k of 'flags', k given out in turn to the streams as they
    come (no allocation, so a new stream, e.g. a graph capture's, costs nothing; the 257th stream shares
    the first one's word)."""
    words = _state("flag_words")
    v = words.get(stream)
    if v is None:
        flags = _state("flags")
        k = len(words) % FLAG_WORDS
        if _k().SIM:
            source = flags.source[k:k + 1]
        else:
            source = _FlagWord(dict(shape=(1,), typestr="<i4", data=(flags.ptr + 4 * k, False), strides=None,
                                    version=3))
        v = words[stream] = _View(flags.ptr + 4 * k, (1,), np.dtype(np.int32), source)
    return v


def raise_refused():
    """Raise the ValueError of a set_rows whose ids the GPU refused (it wrote nothing), once; a read of
    host memory, no sync: a call still queued on the GPU is not seen yet."""
    if _STATE and _STATE["refused_host"][0]:
        _STATE["refused_host"][0] = 0
        raise ValueError("set_rows: row_ids held an id outside [0, cache rows); that call wrote nothing "
                         "(checked on the GPU, reported at the first call after it ran)")


def _row_ids(row_ids, n_rows, n_cache_rows, stream):
    """(ids view, n_check, n_cache_rows, flag, refused): the ids' check arguments every writing kernel
    takes (rows_refused in kernels.py); more than kernels.IDS_CHECKED_IN_KERNEL ids are checked by a
    launch before, on the same stream, into the stream's own word."""
    if row_ids is None:
        return _Flat(_state("zero_ids")), 0, 1, _Flat(_state("flags")), _Flat(_state("refused"))  # unread
    ids = _view(row_ids, "row_ids", None, 1)
    if ids.dtype not in (np.int32, np.int64):
        raise TypeError(f"row_ids: expected int32 or int64, got {ids.dtype}")
    if ids.shape[0] != n_rows:
        raise ValueError(f"row_ids: {ids.shape[0]} ids for {n_rows} rows")
    n_check = n_rows
    k = _k()
    flag = _Flat(_flag_view(stream))
    if n_rows > k.IDS_CHECKED_IN_KERNEL:
        _launch(k.check_rows_kernel, 1, k.CHECK_TPB, [_Flat(ids), n_cache_rows, flag], stream)
        n_check = -1
    return _Flat(ids), n_check, n_cache_rows, flag, _Flat(_state("refused"))


# ---- the entry points --------------------------------------------------------------------------------
def _tiles(n_values):
    k = _k()
    return max(1, -(-n_values // (k.TPB * 32))), k.TPB


# The prefetch distance of the tile kernels, as a fraction of the CUDA blocks the GPU holds at once, by
# direction: dequantize ("read": bytes in, floats out) prefetches half a wave ahead; quantize ("write")
# does not, as measured on the H200 (bench/gpu_quant.py --ab-prefetch, bench/README.md): the L2
# prefetch of its 16 KB float tiles slowed it at every distance (q8_0 1.02 -> 0.89 / 0.96 / 0.96 at
# 1 / 0.5 / 0.25 of a wave), while dequantize's 2-4 KB byte tiles gained most at half a wave (q8_0
# 0.94 -> 0.96, dequantize+unrotate 0.90 -> 0.91). KVLAB_CUDA_PREFETCH=0: none; =all: both, a wave.
_PREFETCH = {"0": {"read": 0.0, "write": 0.0},
             "all": {"read": 1.0, "write": 1.0}}.get(os.environ.get("KVLAB_CUDA_PREFETCH"),
                                                     {"read": 0.5, "write": 0.0})


def _ahead(grid, direction):
    """The prefetch distance of a tile kernel's launch of `grid` CUDA blocks ("read" or "write"): the
    blocks the GPU holds at once times _PREFETCH[direction], when more tiles than that follow (a large
    call); else 0, none."""
    ahead = int(_k().resident_tiles() * _PREFETCH[direction])
    return ahead if 0 < ahead < grid[0] else 0


def _steps(n_steps):
    k = _k()
    return max(1, min(1 << 16, -(-n_steps // k.VALUE_TPB))), k.VALUE_TPB


def _value_bits(info):
    return np.uint32 if info.type_size == 4 else np.uint16      # (rows, cols) value bits


def quantize(x, out, info, flavor_code, stream=None):
    _write(x, out, info, flavor_code, None, None, 0, stream)


def set_rows(cache, row_ids, values, info, flavor_code, stream=None):
    _write(values, cache, info, flavor_code, row_ids, None, 0, stream)


def rotate_quantize(x, out, info, flavor_code, n, scale, row_ids=None, stream=None):
    _write(x, out, info, flavor_code, row_ids, n, scale, stream)


def _write(x, out, info, flavor_code, row_ids, n, scale, stream):
    """quantize / set_rows / rotate_quantize: x (rows, cols) float32 -> rows of out (or of row_ids);
    n None: no rotation."""
    raise_refused()
    # flavor_code with its type: True == 1, but no flavor
    _call("write", (id(info), type(flavor_code), flavor_code, n, scale), info, (x, out, row_ids), stream,
          _write_checked, x, out, info, flavor_code, row_ids, n, scale)
    if row_ids is not None:
        raise_refused()          # the simulator has run it already; a GPU seldom has


def _write_checked(x, out, info, flavor_code, row_ids, n, scale, stream):
    _check_info(info)
    if flavor_code not in (0, 1, 2) or isinstance(flavor_code, bool):
        raise ValueError(f"flavor_code: expected 0 (ref), 1 (cpu) or 2 (cuda), got {flavor_code!r}")
    k = _k()
    xv = _view(x, "x", np.float32, 2)
    ov = _view(out, "out", np.uint8, 2)
    rows, cols = xv.shape
    if cols % info.block_size:
        raise ValueError(f"x: the last dimension ({cols}) must hold whole {info.name} blocks")
    if n is not None:
        _check_rotation(cols, n, info)
    row_bytes = info.row_bytes(cols)
    if ov.shape[1] != row_bytes or (row_ids is None and ov.shape[0] != rows):
        raise ValueError(f"out: {tuple(ov.shape)} does not fit {info.name} rows of x {tuple(xv.shape)}"
                         f" ({row_bytes} bytes per row)")
    if not info.is_quantized:
        _check_value_alignment(ov, info, "out")
    if xv.size == 0:
        return
    check = _row_ids(row_ids, rows, ov.shape[0], stream)
    remap = 0 if row_ids is None else row_bytes
    if not info.is_quantized:
        kernels = k.value_kernels(info)
        if cols % 4 == 0 and _aligned(xv, 16) and _aligned(ov, 16):
            _launch(kernels.quantize, *_steps(xv.size // 4),
                    [_Flat(xv), _Flat(ov), int(flavor_code), xv.size // 4, cols, remap > 0, *check], stream)
        else:
            _launch(kernels.quantize_any, *_steps(xv.size),
                    [_Full(xv), _Full(ov, _value_bits(info)), int(flavor_code), remap > 0, *check], stream)
    else:
        width = 16 if remap == 0 and _aligned(ov, 16) else 4 if remap % 4 == 0 and _aligned(ov, 4) else 1
        tiles = _tiles(xv.size)
        per_block = k.tiles_per_block(info)
        _launch(k.quantize_kernel(info, int(flavor_code)), -(-tiles[0] // per_block), tiles[1],
                [_Flat(xv), _Flat(ov), xv.size // 32, per_block, _aligned(xv, 16), width, remap, int(n or 0),
                 np.float32(scale), _ahead(tiles, "write"), *check], stream)


def dequantize(raw, out, info, stream=None):
    _read(raw, out, info, None, 0, stream)


def dequantize_unrotate(raw, out, info, n, scale, stream=None):
    _read(raw, out, info, n, scale, stream)


def _read(raw, out, info, n, scale, stream):
    """dequantize / dequantize_unrotate (n None: no rotation)."""
    raise_refused()
    _call("read", (id(info), n, scale), info, (raw, out), stream, _read_checked, raw, out, info, n, scale)


def _read_checked(raw, out, info, n, scale, stream):
    _check_info(info)
    k = _k()
    rv = _view(raw, "raw", np.uint8, 2)
    ov = _view(out, "out", np.float32, 2)
    rows, cols = ov.shape
    if n is not None:
        _check_rotation(cols, n, info)
    if cols % info.block_size or rv.shape != (rows, info.row_bytes(cols)):
        raise ValueError(f"raw: {tuple(rv.shape)} does not hold {info.name} rows of out {tuple(ov.shape)}")
    if not info.is_quantized:
        _check_value_alignment(rv, info, "raw")
    if ov.size == 0:
        return
    if not info.is_quantized:
        kernels = k.value_kernels(info)
        if cols % 4 == 0 and _aligned(rv, 16) and _aligned(ov, 16):
            _launch(kernels.dequantize, *_steps(ov.size // 4), [_Flat(rv), _Flat(ov), ov.size // 4], stream)
        else:
            _launch(kernels.dequantize_any, *_steps(ov.size), [_Full(rv, _value_bits(info)), _Full(ov)], stream)
        return
    tiles = _tiles(ov.size)
    _launch(k.dequantize_kernel(info), *tiles,
            [_Flat(rv), _Flat(ov), ov.size // 32, _aligned(rv, 16), _aligned(ov, 16), int(n or 0), np.float32(scale),
             _ahead(tiles, "read")], stream)


def _check_rotation(cols, n, info):
    _check_info(info)
    if not info.is_quantized:
        raise ValueError(f"fused rotation kernels take a quantized type, got {info.name}")
    _check_size(cols, n, 32)


def _check_size(cols, n, smallest):
    largest = _k().TPB * 32
    if not isinstance(n, (int, np.integer)) or n < smallest or n > largest or n & (n - 1) or cols % n:
        raise ValueError(f"rotation size {n}: expected a power of two from {smallest} to {largest} "
                         f"dividing the row length {cols}")


def rotate(x, out, n, scale, stream=None):
    """out = x @ H_n on every n-chunk of each row (H_n[0, 0] == scale); x, out (rows, cols) float32."""
    raise_refused()
    _call("rotate", (n, scale), None, (x, out), stream, _rotate_checked, x, out, n, scale)


def _rotate_checked(x, out, n, scale, stream):
    xv = _view(x, "x", np.float32, 2)
    ov = _view(out, "out", np.float32, 2)
    if ov.shape != xv.shape:
        raise ValueError(f"out: shape {tuple(ov.shape)} differs from x's {tuple(xv.shape)}")
    _check_size(xv.shape[1], n, 1)
    if xv.size:
        _launch(_k().rotate_kernel, *_tiles(xv.size),
                [_Flat(xv), _Flat(ov), xv.size, _aligned(xv, 16) and _aligned(ov, 16), int(n), np.float32(scale)],
                stream)
