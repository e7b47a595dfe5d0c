"""numba's threading layer for kvlab's parallel kernels, chosen before the first one runs.

Every CPU kernel is ``@njit(parallel=True)``. numba's default order (tbb, omp, workqueue) lands on
GNU OpenMP where it finds no TBB, and a process that forks after a kernel ran (multiprocessing's
default on Linux, DataLoader workers) then aborts in the child ("fork() called from a process
already using GNU OpenMP"); the workqueue layer survives a fork but aborts when two threads launch
kernels at once. TBB is safe for both, so kvlab asks for it: the ``tbb`` wheel from PyPI (a
dependency on x86-64). pip puts libtbb.so.12 in <prefix>/lib, where numba's dlopen by soname does
not look, so it is loaded from there by path first; the dynamic loader then resolves the soname
to it. Without TBB kvlab takes the workqueue layer and runs one kernel at a time
(`kernel_lock`: every Python call of a parallel kernel sits inside it). A layer the user chose
(NUMBA_THREADING_LAYER) is kept.
"""
from contextlib import nullcontext
import ctypes
import importlib
import importlib.metadata
import os
import sys
import threading

import numba

_TBB_SONAME = {"win32": "tbb12.dll", "darwin": "libtbb.12.dylib"}.get(sys.platform, "libtbb.so.12")
_TBB_MIN_INTERFACE = 12060      # what numba.np.ufunc.parallel requires (TBB 2021.6)
THREAD_SAFE_LAYERS = ("tbb", "safe", "omp", "threadsafe")


def _tbb_paths() -> list:
    """Where the loader may find libtbb: the tbb wheel's own file first, then the plain soname."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    return [str(f.locate()) for f in files if f.name == _TBB_SONAME] + [_TBB_SONAME]


def load_tbb() -> bool:
    """Load a TBB numba accepts (RTLD_GLOBAL, so numba's tbbpool links to it); True when it is usable."""
    for path in _tbb_paths():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            if lib.TBB_runtime_interface_version() < _TBB_MIN_INTERFACE:
                continue
            importlib.import_module("numba.np.ufunc.tbbpool")
            return True
        except (OSError, AttributeError, ImportError):
            continue
    return False


def choose_layer() -> str:
    """Set numba.config.THREADING_LAYER to tbb (or workqueue without TBB) unless the user set one."""
    has_tbb = load_tbb()
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return numba.config.THREADING_LAYER
    numba.config.THREADING_LAYER = "tbb" if has_tbb else "workqueue"
    return numba.config.THREADING_LAYER


LAYER = choose_layer()
_lock = threading.RLock()   # re-entrant: a locked call may call another (flash_decode rotates Q)


def _fresh_lock_in_child() -> None:
    # a thread of the parent may have held the lock when it forked; the child has no such thread
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


def kernel_lock():
    """Hold around a parallel kernel call: a lock where the layer is not thread-safe, else nothing."""
    return nullcontext() if LAYER in THREAD_SAFE_LAYERS else _lock
