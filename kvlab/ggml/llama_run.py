"""Run a real llama.cpp (llama-cpp-python's low-level ctypes API) on token ids: logits and its KV cache.

One context per run, as `llama-perplexity --kl-divergence` uses one per chunk: flash attention on,
`type_k`/`type_v` set, every position's logits asked for, one batch (n_batch = n_ubatch = the tokens),
then the cache's bytes through `llama_state_seq_get_data` (read them with kvlab.ggml.state.read_state).
The rotation gate reads LLAMA_ATTN_ROT_DISABLE when the context's KV cache is built
(src/llama-kv-cache.cpp, llama_kv_cache's constructor), so the variable is set just for that call.
Needs `pip install llama-cpp-python==0.3.36` (built from its sdist, CPU); its libggml lies in
`llama_cpp/lib/` (`library_dir()`). No tokenizer is used: a GGUF with `tokenizer.ggml.model = no_vocab`.
"""
from contextlib import contextmanager
import ctypes
import os
from pathlib import Path

import numpy as np

from kvlab.types import type_info

ROT_ENV = "LLAMA_ATTN_ROT_DISABLE"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("kvlab's llama.cpp comparisons need llama-cpp-python: "
                          "pip install llama-cpp-python==0.3.36 (kvlab's test extra)") from e
    return llama_cpp


def library_dir() -> Path:
    """Where llama-cpp-python keeps libllama.so and the libggml*.so it was built with."""
    return Path(_llama_cpp().__file__).parent / "lib"


_QUIET = None  # the no-op log callback, kept alive as long as llama.cpp may call it


@contextmanager
def _rotation_env(rotation: bool):
    before = os.environ.get(ROT_ENV)
    if rotation:
        os.environ.pop(ROT_ENV, None)
    else:
        os.environ[ROT_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ROT_ENV, None)
        else:
            os.environ[ROT_ENV] = before


class LlamaCpp:
    """A GGUF model loaded in llama.cpp (CPU). `run(tokens, type_k, type_v)` -> (logits, state bytes)."""

    def __init__(self, gguf_path, n_threads: int | None = None, quiet: bool = True):
        global _QUIET
        ll = _llama_cpp()
        self.ll = ll
        if quiet and _QUIET is None:
            _QUIET = ll.llama_log_callback(lambda level, text, user_data: None)
        if quiet:
            ll.llama_log_set(_QUIET, ctypes.c_void_p())
        ll.llama_backend_init()
        params = ll.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = ll.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.n_threads = n_threads or max(1, min(4, os.cpu_count() or 1))

    def close(self) -> None:
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, tokens, type_k: str = "f16", type_v: str = "f16", rotation: bool = True,
            flash_attn: bool = True, save_to=None):
        """Decode `tokens` (1-D ids) from an empty cache in one batch.

        rotation=False sets LLAMA_ATTN_ROT_DISABLE=1 for this context; True leaves llama.cpp's default gate.
        flash_attn=False stores V transposed (llama.cpp then refuses a quantized V). save_to: a path
        prefix; the cache is also saved as `<prefix>.ggsq` (llama_state_seq_save_file) and
        `<prefix>.session` (llama_state_save_file), as llama.cpp's tools write them.
        Returns (logits (n, n_vocab) float32 for every position, llama_state_seq_get_data's bytes of seq 0).
        """
        ll = self.ll
        tokens = np.asarray(tokens, dtype=np.int32).ravel()
        n = tokens.size
        if n == 0 or tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"tokens must be 1..n ids in [0, {self.n_vocab}), got {n} ids "
                             f"in [{tokens.min() if n else '-'}, {tokens.max() if n else '-'}]")
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.type_k = type_info(type_k).ggml_type
        cp.type_v = type_info(type_v).ggml_type
        with _rotation_env(rotation):
            ctx = ll.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context with K {type_k}, V {type_v}")
        batch = ll.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, 1
                batch.seq_id[i][0] = 0
            rc = ll.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            logits = np.ctypeslib.as_array(ll.llama_get_logits(ctx), shape=(n, self.n_vocab)).copy()
            size = ll.llama_state_seq_get_size(ctx, 0)
            buf = (ctypes.c_uint8 * size)()
            written = ll.llama_state_seq_get_data(ctx, buf, size, 0)
            if written != size:
                raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
            if save_to is not None:
                ids = (ll.llama_token * n)(*(int(t) for t in tokens))
                if not ll.llama_state_seq_save_file(ctx, f"{save_to}.ggsq".encode(), 0, ids, n):
                    raise RuntimeError(f"llama_state_seq_save_file could not write {save_to}.ggsq")
                if not ll.llama_state_save_file(ctx, f"{save_to}.session".encode(), ids, n):
                    raise RuntimeError(f"llama_state_save_file could not write {save_to}.session")
            return logits, bytes(buf)
        finally:
            ll.llama_batch_free(batch)
            ll.llama_free(ctx)
