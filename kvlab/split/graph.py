"""A small ggml graph IR: tensors with ggml's shapes, strides and op names, built the way ggml builds them.

Shapes are ggml's: `ne = (ne0, ne1, ne2, ne3)` with ne0 the fastest-varying dimension (the reverse of
numpy/torch order); `nb` are byte strides. Views keep their `view_src` and byte offset, permute stores
its axes in `op_params` as ggml_permute does (source axis i goes to result axis op_params[i]).
Names follow ggml's automatic names ("x (reshaped)", "x (view)", "x (permuted)", "x (copy)").
"""
from dataclasses import dataclass, field
from math import prod

from kvlab.types import TYPES

# Block size and bytes per block of every type a graph may hold (ggml_blck_size / ggml_type_size).
_INDEX_TYPES = {"i32": (1, 4), "i64": (1, 8)}


def _block(type_name: str) -> tuple:
    """(values, bytes) of one block of a tensor type: a KV-cache type or an index type."""
    if type_name in TYPES:
        return TYPES[type_name].block_size, TYPES[type_name].type_size
    if type_name in _INDEX_TYPES:
        return _INDEX_TYPES[type_name]
    raise ValueError(f"unknown ggml type {type_name!r}: expected one of {', '.join([*TYPES, *_INDEX_TYPES])}")


def block_size(type_name: str) -> int:
    return _block(type_name)[0]


def type_size(type_name: str) -> int:
    return _block(type_name)[1]


def row_size(type_name: str, n: int) -> int:
    """ggml_row_size: bytes of n values."""
    return n // block_size(type_name) * type_size(type_name)


def contiguous_nb(type_name: str, ne) -> tuple:
    nb = [type_size(type_name), row_size(type_name, ne[0])]
    for d in (1, 2):
        nb.append(nb[-1] * ne[d])
    return tuple(nb)


@dataclass(eq=False)
class Tensor:
    """One ggml_tensor: a leaf (op NONE) or the result of an op on `src`."""
    name: str
    op: str                       # ggml_op_name, upper case: "MUL_MAT", "RESHAPE", ...
    type: str
    ne: tuple
    nb: tuple
    src: tuple = ()
    op_params: tuple = ()
    view_src: "Tensor | None" = None
    view_offs: int = 0
    static: bool = False          # weight / KV cache: its state comes from llama_meta_device_get_split_state
    hint: str = ""                # e.g. "SRC0_IS_HADAMARD" (ggml_mul_mat_set_hint)
    data_role: str = ""           # what the executor feeds a leaf: "x", "pos", "k_idxs", "mask", "hadamard"...

    @property
    def nelements(self) -> int:
        return prod(self.ne)

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: trailing dimensions of size 1 do not count (at least 1)."""
        for i in (3, 2, 1):
            if self.ne[i] > 1:
                return i + 1
        return 1

    @property
    def is_contiguous(self) -> bool:
        """ggml_is_contiguous (ggml_is_contiguous_m_n with m=0, n=4): dims of size 1 may have any stride."""
        next_nb = type_size(self.type)
        if self.ne[0] != block_size(self.type) and self.nb[0] != next_nb:
            return False
        next_nb *= self.ne[0] // block_size(self.type)
        for i in (1, 2, 3):
            if self.ne[i] != 1 and self.nb[i] != next_nb:
                return False
            next_nb *= self.ne[i]
        return True

    @property
    def is_permuted(self) -> bool:
        """ggml_is_permuted: some stride is larger than the next one's."""
        nb = self.nb
        return nb[0] > nb[1] or nb[1] > nb[2] or nb[2] > nb[3]

    def __repr__(self):
        return f"Tensor({self.name!r}, {self.op}, {self.type}, ne={list(self.ne)})"


def _ne4(ne) -> tuple:
    ne = tuple(int(n) for n in ne)
    if not 1 <= len(ne) <= 4 or any(n < 0 for n in ne):
        raise ValueError(f"a ggml shape has 1 to 4 non-negative sizes, got {ne}")
    return ne + (1,) * (4 - len(ne))


@dataclass
class Graph:
    """Tensors in ggml's graph order (ggml_build_forward_expand: sources depth-first, then the node)."""
    order: list = field(default_factory=list)

    def expand(self, t: Tensor) -> Tensor:
        """ggml_build_forward_expand: add t and everything it depends on that is not yet in the graph."""
        seen = {id(x) for x in self.order}
        self._visit(t, seen)
        return t

    def _visit(self, t: Tensor, seen: set) -> None:
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        for s in t.src:
            if s is not t:
                self._visit(s, seen)
        self.order.append(t)

    @property
    def nodes(self) -> list:
        return [t for t in self.order if t.op != "NONE"]

    @property
    def leafs(self) -> list:
        return [t for t in self.order if t.op == "NONE"]

    def find(self, name: str) -> Tensor:
        for t in self.order:
            if t.name == name:
                return t
        raise KeyError(f"no tensor named {name!r} in the graph")


# --- constructors, each the ggml function of the same name (shape checks kept to what the model needs) ---

def new_tensor(name, type, ne, *, static=False, data_role="") -> Tensor:
    ne = _ne4(ne)
    return Tensor(name, "NONE", type, ne, contiguous_nb(type, ne), static=static, data_role=data_role)


def mul_mat(a: Tensor, b: Tensor, name: str = "", hint: str = "") -> Tensor:
    """ggml_mul_mat: result[n][m] = sum_k a[m][k] * b[n][k]; a broadcasts over b's dims 2 and 3."""
    if a.ne[0] != b.ne[0] or b.ne[2] % a.ne[2] or b.ne[3] % a.ne[3]:
        raise ValueError(f"mul_mat: cannot multiply {list(a.ne)} by {list(b.ne)} (ggml_can_mul_mat)")
    ne = (a.ne[1], b.ne[1], b.ne[2], b.ne[3])
    return Tensor(name, "MUL_MAT", "f32", ne, contiguous_nb("f32", ne), (a, b), hint=hint)


def reshape(a: Tensor, *ne, name: str = "") -> Tensor:
    """ggml_reshape_Nd: a view with the same elements in a new contiguous shape (a must be contiguous)."""
    ne = _ne4(ne)
    if not a.is_contiguous or prod(ne) != a.nelements:
        raise ValueError(f"reshape: {a.name!r} {list(a.ne)} -> {list(ne)} needs a contiguous tensor of equal size")
    return Tensor(name or f"{a.name} (reshaped)", "RESHAPE", a.type, ne, contiguous_nb(a.type, ne), (a,),
                  view_src=a.view_src or a, view_offs=a.view_offs)


def view(a: Tensor, ne, nb_upper, offset: int = 0, name: str = "") -> Tensor:
    """ggml_view_Nd: ne plus byte strides nb[1..] (nb[0] is the type size) at a byte offset into a."""
    ne = _ne4(ne)
    nb = [type_size(a.type), *nb_upper]
    while len(nb) < 4:
        nb.append(nb[-1] * ne[len(nb) - 1])
    return Tensor(name or f"{a.name} (view)", "VIEW", a.type, ne, tuple(nb), (a,), op_params=(offset,),
                  view_src=a.view_src or a, view_offs=a.view_offs + offset)


def permute(a: Tensor, axis0: int, axis1: int, axis2: int, axis3: int, name: str = "") -> Tensor:
    """ggml_permute: source axis i becomes result axis op_params[i]."""
    axes = (axis0, axis1, axis2, axis3)
    if sorted(axes) != [0, 1, 2, 3]:
        raise ValueError(f"permute: axes must be a permutation of 0..3, got {axes}")
    ne, nb = [0] * 4, [0] * 4
    for i, to in enumerate(axes):
        ne[to], nb[to] = a.ne[i], a.nb[i]
    return Tensor(name or f"{a.name} (permuted)", "PERMUTE", a.type, tuple(ne), tuple(nb), (a,),
                  op_params=axes, view_src=a.view_src or a, view_offs=a.view_offs)


def transpose(a: Tensor, name: str = "") -> Tensor:
    """ggml_transpose: swap dims 0 and 1 (a strided view)."""
    ne = (a.ne[1], a.ne[0], a.ne[2], a.ne[3])
    nb = (a.nb[1], a.nb[0], a.nb[2], a.nb[3])
    return Tensor(name or f"{a.name} (transposed)", "TRANSPOSE", a.type, ne, nb, (a,),
                  view_src=a.view_src or a, view_offs=a.view_offs)


def cont(a: Tensor, *ne, name: str = "") -> Tensor:
    """ggml_cont / ggml_cont_Nd: a contiguous copy, optionally in a new shape of equal size."""
    ne = _ne4(ne) if ne else a.ne
    if prod(ne) != a.nelements:
        raise ValueError(f"cont: {list(a.ne)} -> {list(ne)} changes the number of elements")
    return Tensor(name or f"{a.name} (cont)", "CONT", a.type, ne, contiguous_nb(a.type, ne), (a,))


def cast(a: Tensor, type: str, name: str = "") -> Tensor:
    """ggml_cast: op CPY into a new tensor of `type`; src[1] is the result itself, as in ggml."""
    t = Tensor(name or f"{a.name} (copy)", "CPY", type, a.ne, contiguous_nb(type, a.ne), ())
    t.src = (a, t)
    return t


def rope(a: Tensor, pos: Tensor, name: str = "", n_rot: int = 0, freq_base: float = 10000.0) -> Tensor:
    """ggml_rope_ext (normal mode): rotate pairs (x[2i], x[2i+1]) of each head by pos * base^(-2i/n_rot)."""
    params = (n_rot or a.ne[0], float(freq_base))
    return Tensor(name or f"{a.name} (rope)", "ROPE", a.type, a.ne, contiguous_nb(a.type, a.ne), (a, pos),
                  op_params=params)


def set_rows(dst: Tensor, values: Tensor, idx: Tensor, name: str = "") -> Tensor:
    """ggml_set_rows(a=dst, b=values, c=idx): src order is (values, idx, dst) "due to legacy reasons"."""
    if dst.ne[0] != values.ne[0] or values.ne[1] != idx.ne[0]:
        raise ValueError(f"set_rows: values {list(values.ne)} do not fit rows of {list(dst.ne)} at {list(idx.ne)}")
    return Tensor(name or f"{dst.name} (view)", "SET_ROWS", dst.type, dst.ne, dst.nb, (values, idx, dst),
                  view_src=dst.view_src or dst, view_offs=dst.view_offs)


def flash_attn_ext(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, name: str = "") -> Tensor:
    """ggml_flash_attn_ext: q [D, T, H, 1], k/v [D, n_kv, H_kv, 1] -> [Dv, H, T, 1] (heads on dim 1)."""
    if q.ne[0] != k.ne[0] or k.ne[1] != v.ne[1] or q.ne[2] % max(k.ne[2], 1):
        raise ValueError(f"flash_attn_ext: q {list(q.ne)}, k {list(k.ne)}, v {list(v.ne)} do not fit")
    ne = (v.ne[0], q.ne[2], q.ne[1], q.ne[3])
    return Tensor(name, "FLASH_ATTN_EXT", "f32", ne, contiguous_nb("f32", ne), (q, k, v, mask),
                  op_params=(float(scale),))


def binary(op: str, a: Tensor, b: Tensor, name: str = "") -> Tensor:
    """ggml_add / ggml_sub / ggml_mul / ggml_div: b broadcasts over a."""
    if op not in ("ADD", "SUB", "MUL", "DIV") or any(a.ne[d] % b.ne[d] for d in range(4)):
        raise ValueError(f"{op}: cannot broadcast {list(b.ne)} over {list(a.ne)}")
    return Tensor(name, op, a.type, a.ne, contiguous_nb(a.type, a.ne), (a, b))


def unary(op: str, a: Tensor, name: str = "", *extra: Tensor) -> Tensor:
    """Row-wise or element-wise ops whose result has a's shape: SCALE, SOFT_MAX, RMS_NORM, UNARY..."""
    return Tensor(name, op, "f32", a.ne, contiguous_nb("f32", a.ne), (a, *extra))


def get_rows(a: Tensor, idx: Tensor, name: str = "") -> Tensor:
    """ggml_get_rows: rows idx of a -> [a.ne0, n_idx, ...]."""
    ne = (a.ne[0], idx.ne[0], idx.ne[1], idx.ne[2])
    return Tensor(name, "GET_ROWS", "f32", ne, contiguous_nb("f32", ne), (a, idx))
