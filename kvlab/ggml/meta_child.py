"""The child process of kvlab.ggml.meta: build one attention block with ggml's graph API and let the real
meta backend infer its split states (`python meta_child.py LIB_DIR SPEC_JSON`).

Standard library only, and not the kvlab package (the parent, kvlab.ggml.meta, explains why a process per
configuration and what is printed): a GGML_ASSERT/GGML_ABORT kills this process, so everything goes out
unbuffered as it happens.
"""
import ctypes
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

# ggml enum values used by the block (ggml.h; stable across the versions kvlab reads)
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32, GGML_TYPE_I64 = 0, 1, 26, 27
AXIS_MIRRORED = 10
MAX_DEVICES = 16


class _InitParams(ctypes.Structure):      # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _TensorHead(ctypes.Structure):      # the first fields of struct ggml_tensor
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


class _RawTensor(ctypes.Structure):       # struct ggml_tensor up to src (GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10)
    _fields_ = [*_TensorHead._fields_, ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10)]


def _state_struct(with_nr: bool):
    """struct ggml_backend_meta_split_state, 0.3.36 (with nr) or 0.3.24 (without)."""
    fields = [("axis", ctypes.c_int), ("ne", ctypes.c_int64 * (16 * MAX_DEVICES))]
    if with_nr:
        fields.append(("nr", ctypes.c_uint32 * 16))
    fields.append(("n_segments", ctypes.c_uint32))
    return type("SplitState" + ("Nr" if with_nr else ""), (ctypes.Structure,), {"_fields_": fields})


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {   # name: (restype, argtypes); every tensor is a void pointer
    "ggml_init": (_P, [_InitParams]),
    "ggml_tensor_overhead": (ctypes.c_size_t, []),
    "ggml_graph_overhead_custom": (ctypes.c_size_t, [ctypes.c_size_t, ctypes.c_bool]),
    "ggml_new_tensor_1d": (_P, [_P, ctypes.c_int, _I64]),
    "ggml_new_tensor_2d": (_P, [_P, ctypes.c_int, _I64, _I64]),
    "ggml_new_tensor_3d": (_P, [_P, ctypes.c_int, _I64, _I64, _I64]),
    "ggml_set_name": (_P, [_P, ctypes.c_char_p]),
    "ggml_get_name": (ctypes.c_char_p, [_P]),
    "ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
    "ggml_nelements": (_I64, [_P]),
    "ggml_is_contiguous": (ctypes.c_bool, [_P]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, _I64]),
    "ggml_mul_mat": (_P, [_P, _P, _P]),
    "ggml_scale": (_P, [_P, _P, ctypes.c_float]),
    "ggml_reshape_2d": (_P, [_P, _P, _I64, _I64]),
    "ggml_reshape_3d": (_P, [_P, _P, _I64, _I64, _I64]),
    "ggml_reshape_4d": (_P, [_P, _P, _I64, _I64, _I64, _I64]),
    "ggml_cont_2d": (_P, [_P, _P, _I64, _I64]),
    "ggml_view_2d": (_P, [_P, _P, _I64, _I64, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_view_4d": (_P, [_P, _P, _I64, _I64, _I64, _I64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                          ctypes.c_size_t]),
    "ggml_permute": (_P, [_P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "ggml_cast": (_P, [_P, _P, ctypes.c_int]),
    "ggml_rope_ext": (_P, [_P, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_float] * 6),
    "ggml_set_rows": (_P, [_P, _P, _P, _P]),
    "ggml_flash_attn_ext": (_P, [_P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_float]),
    "ggml_new_graph_custom": (_P, [_P, ctypes.c_size_t, ctypes.c_bool]),
    "ggml_build_forward_expand": (None, [_P, _P]),
    "ggml_log_set": (None, [_P, _P]),
    "ggml_backend_meta_device": (_P, [ctypes.POINTER(_P), ctypes.c_size_t, _P, _P]),
    "ggml_backend_dev_buffer_type": (_P, [_P]),
    "ggml_backend_reg_dev_get": (_P, [_P, ctypes.c_size_t]),
    "ggml_backend_alloc_ctx_tensors_from_buft": (_P, [_P, _P]),
    "ggml_gallocr_new": (_P, [_P]),
    "ggml_gallocr_alloc_graph": (ctypes.c_bool, [_P, _P]),
}
_LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
# struct returned by value = hidden pointer to the caller's result as first argument, returned again
_SPLIT_STATE_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


def _open_libraries(lib_dir: Path) -> tuple:
    """kvlab.ggml.lib.open_libraries, with lib.py read from its file: this process stays clear of the kvlab
    package (numba), which would cost a second more per configuration."""
    spec = importlib.util.spec_from_file_location("kvlab_ggml_lib", Path(__file__).with_name("lib.py"))
    lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
    return lib.open_libraries(lib_dir)


class _Ggml:
    """libggml-base + libggml-cpu with the signatures above; tensors are plain addresses."""

    def __init__(self, lib_dir: Path):
        base, self.cpu = _open_libraries(lib_dir)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(base, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name[len("ggml_"):], fn)
        self.cpu.ggml_backend_cpu_reg.restype = _P

    def head(self, t) -> _TensorHead:
        return _TensorHead.from_address(t)

    def named(self, t, name: str):
        self.set_name(t, name.encode())
        return t


def _emit(text: str) -> None:
    os.write(1, text.encode() + b"\n")       # unbuffered: an abort right after must not lose it


class _Child:
    """Everything one configuration needs, kept alive until the process ends."""

    def __init__(self, lib_dir: Path, spec: SimpleNamespace):   # kvlab.ggml.meta.BlockSpec's fields
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise RuntimeError(f"the get_split_state callback returns a struct by value, which kvlab can only "
                               f"express on x86-64 (hidden result pointer); this machine is {platform.machine()}")
        self.g, self.spec = _Ggml(lib_dir), spec
        self.log_lines = []
        self._log_cb = _LOG_FN(self._on_log)
        self.g.log_set(ctypes.cast(self._log_cb, _P), None)
        self._state_cb = _SPLIT_STATE_FN(self._on_split_state)
        self.state_type = None
        cpu_dev = self.g.backend_reg_dev_get(self.g.cpu.ggml_backend_cpu_reg(), 0)
        devs = (_P * spec.n_devices)(*[cpu_dev] * spec.n_devices)
        meta = self.g.backend_meta_device(devs, spec.n_devices, ctypes.cast(self._state_cb, _P), None)
        self.buft = self.g.backend_dev_buffer_type(meta)

    def _on_log(self, level, text, user_data):
        line = text.decode(errors="replace").rstrip("\n")
        if line.startswith("SPLIT_STATE:"):
            self.log_lines.append(line)
            _emit(line)

    def _on_split_state(self, result, tensor, user_data):
        name = self.g.get_name(tensor).decode()
        axis, segments, nr = self.spec.static_states.get(name, [AXIS_MIRRORED, [[0] * self.spec.n_devices], [1]])
        s = self.state_type()
        s.axis = axis
        for i, seg in enumerate(segments):
            for j, n in enumerate(seg):
                s.ne[i * self.spec.n_devices + j] = n
        if hasattr(s, "nr"):
            for i in range(16):
                s.nr[i] = nr[i] if i < len(nr) else 1
        elif any(r != 1 for r in nr):
            raise ValueError(f"{name}: segment repeats {nr} need the nr field this library lacks")
        s.n_segments = len(segments)
        ctypes.memmove(result, ctypes.addressof(s), ctypes.sizeof(s))
        return result

    def context(self, n_tensors: int):
        size = n_tensors * self.g.tensor_overhead() + self.g.graph_overhead_custom(n_tensors, False)
        return self.g.init(_InitParams(size, None, True))

    def probe_layout(self) -> str:
        """Which split-state struct this library has, from the debug line of a one-node graph."""
        ctx = self.context(8)
        x = self.g.named(self.g.new_tensor_1d(ctx, GGML_TYPE_F32, 32), "kvlab_probe_in")
        y = self.g.named(self.g.scale(ctx, x, 1.0), "kvlab_probe_out")
        self._alloc_graph(ctx, [y], 8)
        if not self.log_lines:
            raise RuntimeError("the library logged no SPLIT_STATE lines: it has no GGML_META_DEBUG support")
        layout = "nr" if "x" in self.log_lines[-1].rsplit("{", 1)[1] else "no-nr"
        self.state_type = _state_struct(layout == "nr")
        return layout

    def _alloc_graph(self, ctx, outputs, size):
        gf = self.g.new_graph_custom(ctx, size, False)
        for t in outputs:
            self.g.build_forward_expand(gf, t)
        if not self.g.gallocr_alloc_graph(self.g.gallocr_new(self.buft), gf):
            raise RuntimeError("ggml_gallocr_alloc_graph failed")


class _BlockBuilder:
    """llama.cpp's attention block in ggml (layer 0), each tensor named as kvlab.split names it."""

    def __init__(self, child: _Child):
        self.c, self.g, self.s = child, child.g, child.spec
        self.static_ctx, self.ctx = child.context(16), child.context(256)
        self.order = []            # [name, op, ne] as built

    def new(self, ctx, type_, name, *ne):
        fn = {1: self.g.new_tensor_1d, 2: self.g.new_tensor_2d, 3: self.g.new_tensor_3d}[len(ne)]
        return self.g.named(fn(ctx, type_, *ne), name)

    def ne(self, t):
        return tuple(self.g.head(t).ne)

    def nb(self, t):
        return tuple(self.g.head(t).nb)

    def hadamard(self, cur, rot, label):
        """llama_mul_mat_hadamard (2D flatten), or PR #23225's 4D form."""
        n, ne = self.ne(rot)[0], self.ne(cur)
        if self.s.rotation_4d:
            flat = self.g.reshape_4d(self.ctx, cur, n, ne[0] // n, ne[1], ne[2] * ne[3])
        elif self.g.is_contiguous(cur):
            flat = self.g.reshape_2d(self.ctx, cur, n, self.g.nelements(cur) // n)
        else:
            flat = self.g.cont_2d(self.ctx, cur, n, self.g.nelements(cur) // n)
        self.g.named(flat, f"{label} (rot in)")
        res = self.g.named(self.g.mul_mat(self.ctx, rot, flat), f"{label} (rot)")
        return self.g.named(self.g.reshape_4d(self.ctx, res, *ne), f"{label} (rot out)")

    def build(self):
        g, s, ctx = self.g, self.s, self.ctx
        hd, T = s.head_dim, s.n_tokens
        weights = {w: self.new(self.static_ctx, GGML_TYPE_F32, f"blk.0.{w}.weight", s.width, heads * hd)
                   for w, heads in (("attn_q", s.n_head), ("attn_k", s.n_head_kv), ("attn_v", s.n_head_kv))}
        wo = self.new(self.static_ctx, GGML_TYPE_F32, "blk.0.attn_output.weight", s.n_head * hd, s.width)
        caches = {side: self.new(self.static_ctx, t, f"cache_{side}_l0", s.n_head_kv * hd, s.cells, 1)
                  for side, t in (("k", s.type_k), ("v", s.type_v))}
        # weights and caches: a meta buffer whose callback gives llama.cpp's split states
        if not g.backend_alloc_ctx_tensors_from_buft(self.static_ctx, self.c.buft):
            raise RuntimeError("allocating the weights and caches on the meta buffer type failed")

        x = self.new(ctx, GGML_TYPE_F32, "attn_norm-0", s.width, T)
        pos = self.new(ctx, GGML_TYPE_I32, "inp_pos", T)
        k_rot = self.new(ctx, GGML_TYPE_F32, "attn_inp_k_rot", s.rot_k, s.rot_k) if s.rot_k else None
        v_rot = self.new(ctx, GGML_TYPE_F32, "attn_inp_v_rot", s.rot_v, s.rot_v) if s.rot_v else None

        def project(w, heads, label, roped):
            cur = g.named(g.mul_mat(ctx, weights[w], x), f"{label}-0")
            cur = g.named(g.reshape_3d(ctx, cur, hd, heads, T), f"{label}-0 (reshaped)")
            if roped:   # ggml_rope_ext, normal mode, rotating the whole head
                cur = g.rope_ext(ctx, cur, pos, None, hd, 0, 0, 10000.0, 1.0, 0.0, 1.0, 0.0, 0.0)
                cur = g.named(cur, f"{label}-0 (rope)")
            return cur

        q_cur = project("attn_q", s.n_head, "Qcur", True)
        k_cur = project("attn_k", s.n_head_kv, "Kcur", True)
        v_cur = project("attn_v", s.n_head_kv, "Vcur", False)
        if k_rot:
            q_cur = self.hadamard(q_cur, k_rot, "Qcur-0")
            k_cur = self.hadamard(k_cur, k_rot, "Kcur-0")
        if v_rot:
            v_cur = self.hadamard(v_cur, v_rot, "Vcur-0")
        outputs = [q_cur, v_cur, k_cur]           # build_attn expands q, v, k, then the two set_rows

        for side, cur in (("k", k_cur), ("v", v_cur)):     # llama_kv_cache::cpy_k / cpy_v (FA: V not transposed)
            idxs = self.new(ctx, GGML_TYPE_I64, f"attn_inp_{side}_idxs", T)
            rows = g.view_2d(ctx, cur, s.n_head_kv * hd, T, self.nb(cur)[2], 0)
            g.named(rows, f"{g.get_name(cur).decode()} (view)")
            outputs.append(g.named(g.set_rows(ctx, caches[side], rows, idxs), f"cache_{side}_l0 (set_rows)"))

        def cache_view(side):                      # llama_kv_cache::get_k / get_v
            cache, t = caches[side], (s.type_k if side == "k" else s.type_v)
            rs = g.row_size(t, hd)
            view = g.view_4d(ctx, cache, hd, s.n_head_kv, s.cells, 1, rs, rs * s.n_head_kv,
                             rs * s.n_head_kv * s.cells, 0)
            return g.named(view, f"cache_{side}_l0 (view)"), t

        nb = self.nb(q_cur)                        # build_attn_mha: one stream
        q = g.named(g.view_4d(ctx, q_cur, hd, s.n_head, T, 1, nb[1], nb[2], nb[2] * T, 0), "q-0")
        q = g.named(g.permute(ctx, q, 0, 2, 1, 3), "q-0 (permuted)")
        kv = []
        for side in ("k", "v"):
            view, t = cache_view(side)
            cur = g.named(g.permute(ctx, view, 0, 2, 1, 3), f"cache_{side}_l0 (view) (permuted)")
            if t == GGML_TYPE_F32:                 # FA wants f16 rather than f32 K/V
                cur = g.named(g.cast(ctx, cur, GGML_TYPE_F16), f"cache_{side}_l0 (view) (permuted) (copy)")
            kv.append(cur)
        mask = self.new(ctx, GGML_TYPE_F16, "attn_inp_kq_mask", s.cells, T)
        fa = g.named(g.flash_attn_ext(ctx, q, kv[0], kv[1], mask, hd ** -0.5, 0.0, 0.0), "__fattn__-0")
        cur = g.named(g.reshape_2d(ctx, fa, hd * s.n_head, T), "kqv_out-0")
        if v_rot:
            cur = self.hadamard(cur, v_rot, "kqv_out-0")
        outputs.append(g.named(g.mul_mat(ctx, wo, cur), "attn_out-0"))
        return outputs

    def listing(self, outputs) -> list:
        """[name, op, ne] of every tensor the outputs depend on, sources first (ggml's graph order)."""
        seen, order = set(), []

        def visit(t):
            if not t or t in seen:
                return
            seen.add(t)
            raw = _RawTensor.from_address(t)
            for src in raw.src:
                if src and src != t:
                    visit(src)
            order.append([self.g.get_name(t).decode(), self.g.op_name(raw.op).decode(), list(raw.ne)])

        for t in outputs:
            visit(t)
        return order


def main(lib_dir: str, spec_json: str) -> None:
    spec = SimpleNamespace(**json.loads(spec_json))   # kvlab.ggml.meta.BlockSpec's fields
    child = _Child(Path(lib_dir), spec)
    _emit(f"KVLAB_LAYOUT {child.probe_layout()}")
    builder = _BlockBuilder(child)
    outputs = builder.build()
    _emit("KVLAB_GRAPH " + json.dumps(builder.listing(outputs)))
    child._alloc_graph(builder.ctx, outputs, 256)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
