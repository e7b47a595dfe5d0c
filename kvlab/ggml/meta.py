"""The real meta backend (ggml-backend-meta.cpp) inferring split states for llama.cpp's attention block.

kvlab.split models `ggml_backend_meta_get_split_state`; this module asks the real library the same
question, through ctypes, with no compiler: it builds the block with ggml's graph API the way
llama.cpp does (llm_graph_context::build_attn, llama_mul_mat_hadamard, llama_kv_cache::cpy_k/get_k,
build_attn_mha), puts weights and caches in a meta buffer over N copies of the CPU device whose
get_split_state callback answers what llama.cpp's `llama_meta_device_get_split_state` would, and lets
`ggml_gallocr_alloc_graph` initialise every node on the meta buffer type. That is where ggml infers
each state; with GGML_META_DEBUG=1 it logs one line per tensor through the ggml_log_set callback:

    SPLIT_STATE: {srcs} -> name[OP, axis, {ne_dev0xnr, ne_dev1xnr, ...}]     (0.3.36: "4x7")
    SPLIT_STATE: {srcs} -> name[OP, axis, {ne_dev0, ne_dev1, ...}]           (0.3.24, no nr: "4")

Inference only: nothing is computed (executing set_rows through a bare gallocr on the meta backend
crashes; llama.cpp drives it through ggml_backend_sched).

A failed GGML_ASSERT/GGML_ABORT kills the process, so every configuration runs in a child process
(`infer_split_states`): `python kvlab/ggml_meta.py LIB_DIR SPEC_JSON`, standard library only.
The child prints the graph it built, the struct layout it found and every SPLIT_STATE line as it comes
(unbuffered), so an abort loses nothing; the abort message comes from stderr (GGML_NO_BACKTRACE=1).

Two layouts of `struct ggml_backend_meta_split_state` exist: with `uint32_t nr[16]` (PR #23792,
llama-cpp-python 0.3.36, ggml-python 0.0.45) and without (0.3.24). The callback must write the
library's layout, so the child probes first: a one-node graph in a compute buffer (MIRRORED, no
callback involved) and the format of its debug line ("0x1" has nr, "0" has not) tells which.
The callback returns a 2 KB struct by value, which ctypes callbacks cannot do; on x86-64 (System V
and Windows) such a return is a hidden first pointer argument that the callee fills and returns,
so the callback is declared that way. Other architectures get a clear error.

Known version drift (ggml-python 0.0.45 against October-2026 ggml): its handle_reshape lacks two cases
of the 0.3.36 code (multi-segment sources, and moving a complete dim-0 split of [ne0, 1] to axis 1),
and it asserts `n_segments == 1` before looking at the source. kvlab.ggml.check lists what that changes.
"""
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# ggml enum values used by the block (ggml.h; stable across the versions kvlab reads)
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32, GGML_TYPE_I64 = 0, 1, 26, 27
AXIS_MIRRORED = 10
MAX_DEVICES = 16

_LINE = re.compile(r"SPLIT_STATE: \{.*\} -> (?P<name>.*)\[(?P<op>[A-Z0-9_]+), (?P<axis>\w+), \{(?P<ne>[^}]*)\}\]\s*$")
_ABORT = re.compile(r"^\S+\.(?:c|cpp|h):\d+: .*$", re.M)


@dataclass
class BlockSpec:
    """What the child builds: one attention layer (layer 0), ggml `ne` order throughout."""
    head_dim: int
    n_head: int
    n_head_kv: int
    n_tokens: int
    cells: int                    # KV cells FA reads (n_kv)
    width: int                    # n_embd
    type_k: int                   # ggml_type of cache_k_l0
    type_v: int
    rot_k: int = 0                # size of attn_inp_k_rot (0: K not rotated)
    rot_v: int = 0
    rotation_4d: bool = False     # PR #23225's reshape_4d(n, ne0/n, ne1, ne2*ne3) instead of the 2D flatten
    n_devices: int = 2
    static_states: dict = field(default_factory=dict)   # name -> [axis, [[ne per device] per segment], [nr]]


@dataclass
class MetaResult:
    """What the real meta backend said about one configuration."""
    layout: str                   # "nr" or "no-nr" (the struct the library has), "" if never probed
    graph: list                   # [name, op, ne] in graph order (leafs, then nodes)
    states: dict                  # name -> (axis label, per-device ne of segment 0, nr of segment 0)
    abort: str = ""               # the GGML_ASSERT/GGML_ABORT message, if the library stopped
    error: str = ""               # the child failed some other way (traceback, timeout)

    @property
    def ok(self) -> bool:
        return not self.abort and not self.error


# --------------------------------------------------------------------------------------------- parent

def lib_dir_of(path) -> Path:
    """A directory holding libggml-base.so and libggml-cpu.so, from a directory or a path to either .so."""
    p = Path(path)
    d = p.parent if p.is_file() or p.suffix == ".so" else p
    for lib in ("libggml-base.so", "libggml-cpu.so"):
        if not (d / lib).exists():
            raise FileNotFoundError(f"{d} has no {lib}: expected the directory of a ggml build "
                                    f"(tools/build_ggml.sh) or of ggml-python's ggml/lib")
    return d


def parse_state_line(line: str):
    """(name, op, (axis, per-device ne, nr)) of one SPLIT_STATE line, or None for any other line."""
    m = _LINE.search(line)
    if not m:
        return None
    counts = [c.strip() for c in m["ne"].split(",") if c.strip()]
    ne = tuple(int(c.split("x")[0]) for c in counts)
    nr = int(counts[0].split("x")[1]) if counts and "x" in counts[0] else 1
    return m["name"], m["op"], (m["axis"], ne, nr)


def parse_child_output(stdout: str, stderr: str, returncode: int) -> MetaResult:
    res = MetaResult(layout="", graph=[], states={})
    for line in stdout.splitlines():
        if line.startswith("KVLAB_LAYOUT "):
            res.layout = line.split()[1]
        elif line.startswith("KVLAB_GRAPH "):
            res.graph = json.loads(line[len("KVLAB_GRAPH "):])
        else:
            parsed = parse_state_line(line)
            if parsed:
                res.states.setdefault(parsed[0], parsed[2])   # first inference wins (a cache reset re-logs it)
    if returncode != 0:
        aborts = _ABORT.findall(stderr)
        if aborts:
            res.abort = aborts[-1].split(": ", 1)[1]
        else:
            res.error = (stderr.strip().splitlines() or [f"exit status {returncode}"])[-1]
    return res


def infer_split_states(spec: BlockSpec, lib_dir, timeout: float = 60.0) -> MetaResult:
    """Run one configuration through the real meta backend in a child process."""
    env = {**os.environ, "GGML_META_DEBUG": "1", "GGML_NO_BACKTRACE": "1"}
    args = [sys.executable, str(Path(__file__).resolve()), str(lib_dir_of(lib_dir)), json.dumps(asdict(spec))]
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return MetaResult("", [], {}, error=f"timed out after {timeout:.0f} s")
    return parse_child_output(p.stdout, p.stderr, p.returncode)


# ---------------------------------------------------------------------------------------------- child

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


class _Ggml:
    """libggml-base + libggml-cpu with the signatures above; tensors are plain addresses."""

    def __init__(self, lib_dir: Path):
        base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
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

    def __init__(self, lib_dir: Path, spec: BlockSpec):
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


def _child_main(lib_dir: str, spec_json: str) -> None:
    spec = BlockSpec(**json.loads(spec_json))
    child = _Child(Path(lib_dir), spec)
    _emit(f"KVLAB_LAYOUT {child.probe_layout()}")
    builder = _BlockBuilder(child)
    outputs = builder.build()
    _emit("KVLAB_GRAPH " + json.dumps(builder.listing(outputs)))
    child._alloc_graph(builder.ctx, outputs, 256)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
