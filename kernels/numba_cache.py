"""numba's on-disk cache of kvlab's kernels, keyed by every kernel source file.

Why: numba keys a cached function by its own file only, but a kernel inlines helpers from other files
(fp.py into bf16.py, ops.py into cuda/flash_decode.py, ...): after an edit of fp.py's bf16 rounding alone,
numba loaded the old bf16 kernel, with the old bytes (tests/kernels/test_numba_cache.py). Here a kernel's
stamp is the SHA-256 of every .py file under kernels/, so any edit there re-makes every kvlab kernel. Only
functions defined under kernels/ take these locators (subclasses of numba's own, placed ahead of them in
its list, with the stamp changed); every other package's cache is numba's as before.
"""
import functools
import hashlib
import os

ROOT = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def kernels_stamp() -> bytes:
    """SHA-256 over (relative path, contents) of every .py file under kernels/, in path order."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(ROOT)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.digest()


class _KernelsStamp:
    """A locator mixin: only for functions under kernels/, stamped by every kernel source."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if not os.path.abspath(py_file).startswith(ROOT + os.sep):
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return kernels_stamp()


def register(caching_module) -> None:
    """Put kernel-stamped twins of a numba caching module's file-system locators (a user's NUMBA_CACHE_DIR,
    beside the source, the user-wide one) first in its list: numba's CPU caching and numba-cuda's have one
    each. Once per module."""
    impl = caching_module.CacheImpl
    if any(issubclass(c, _KernelsStamp) for c in impl._locator_classes):
        return
    twins = [type("Kernels" + c.__name__.lstrip("_"), (_KernelsStamp, c), {}) for c in impl._locator_classes
             if any(kind in c.__name__ for kind in ("UserProvided", "InTree", "UserWide"))]
    impl._locator_classes[:0] = twins
