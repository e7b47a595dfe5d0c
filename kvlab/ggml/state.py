"""Read (and write back) llama.cpp's KV-cache state: the K and V bytes of every layer as kvlab QTensors.

Three containers hold the same cache record (llama.cpp 0.3.36 sources, src/llama-context.cpp and
src/llama-kv-cache.cpp `state_write`/`state_write_meta`/`state_write_data`):
- `llama_state_seq_get_data(ctx, buf, size, seq_id)`: u32 0xaf143cd8, i32 seq_id, then the record;
- a sequence file (`llama_state_seq_save_file`): u32 'ggsq', u32 version 3, u32 n_token, i32 tokens, record;
- a session file (`llama_state_save_file`): u32 'ggsn', u32 version 10, u32 n_token, i32 tokens,
  the architecture (u32 length + bytes), then the record of every sequence (seq_id -1).
The record, little-endian:
    u32 n_stream; per stream: u32 cell_count, and when it is not 0:
      per cell: i32 pos, u32 n_seq_id, [i32 x, i32 y, i32 tok when the model has cell extensions], i32 seq_ids
      u32 v_trans, u32 n_layer
      per layer: i32 K type, u64 K row bytes, cell_count rows            (a row: all KV heads of one cell)
      V not transposed (flash attention on): per layer i32 type, u64 row bytes, cell_count rows
      V transposed (flash attention off): per layer i32 type, u32 element bytes, u32 n_embd_v_gqa, then
        per channel j the cell_count elements of channel j
A row is ne = [head_dim * n_head_kv] of one cell, so `split_heads` cuts it into (n_head_kv, n_cells, head_dim).

    from kvlab.ggml.state import read_state
    state = read_state(buf)               # bytes of llama_state_seq_get_data, or a .ggsq/.session file's
    k0 = state.layers[0].k                # QTensor (n_cells, head_dim * n_head_kv), llama.cpp's bytes
    kvlab.dequantize(k0)                  # the K it holds (rotated when llama.cpp rotates: attn_rot_k)
"""
from dataclasses import dataclass, field
import os
import struct

import numpy as np

from kvlab.quant import QTensor
from kvlab.types import TYPES

SEQ_DATA_MAGIC = 0xAF143CD8     # io_magic of llama_state_seq_get_data
SEQ_FILE_MAGIC = 0x67677371     # 'ggsq', LLAMA_STATE_SEQ_MAGIC
SEQ_FILE_VERSION = 3
SESSION_MAGIC = 0x6767736E      # 'ggsn', LLAMA_SESSION_MAGIC
SESSION_VERSION = 10
CELL_EXT_BYTES = 12             # struct llama_kv_cell_ext { llama_pos x, y; llama_token tok; }

TYPE_BY_ID = {t.ggml_type: t for t in TYPES.values()}


@dataclass
class LayerCache:
    """One layer of one stream: K and V rows, one per cell, exactly the bytes llama.cpp holds."""
    k: QTensor   # (n_cells, n_embd_k_gqa)
    v: QTensor   # (n_cells, n_embd_v_gqa); rows even when llama.cpp stored V transposed


@dataclass
class StreamState:
    positions: np.ndarray           # (n_cells,) int32
    seq_ids: list                   # per cell, the tuple of sequence ids it belongs to
    v_trans: bool                   # V was stored transposed (flash attention off)
    layers: list = field(default_factory=list)   # LayerCache per layer
    cell_ext: np.ndarray | None = None           # (n_cells, 3) int32 x, y, tok, when the model has them


@dataclass
class KVState:
    """A llama.cpp KV-cache state: `streams` as written (empty streams hold no cells)."""
    streams: list                   # StreamState or None (an empty stream) per stream
    container: str                  # "seq_data", "seq_file" or "session"
    seq_id: int = -1                # the sequence written (-1: all)
    tokens: np.ndarray | None = None  # the prompt saved with a file
    arch: str | None = None         # a session file's model architecture

    @property
    def stream(self) -> StreamState:
        """The one stream that holds cells (a sequence lives in one stream)."""
        full = [s for s in self.streams if s is not None]
        if len(full) != 1:
            raise ValueError(f"the state holds cells in {len(full)} streams; pick one from .streams")
        return full[0]

    @property
    def layers(self) -> list:
        return self.stream.layers

    @property
    def positions(self) -> np.ndarray:
        return self.stream.positions


class _Reader:
    def __init__(self, data):
        self.buf = memoryview(bytes(data))
        self.at = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.at + n > len(self.buf):
            raise ValueError(f"llama.cpp state: truncated at byte {self.at} reading {what} "
                             f"({n} bytes wanted, {len(self.buf) - self.at} left)")
        out = self.buf[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def i32(self, what: str) -> int:
        return self.unpack("i", what)[0]


def _type(type_id: int, what: str):
    if type_id not in TYPE_BY_ID:
        raise ValueError(f"llama.cpp state: {what} has ggml type {type_id}, not one of kvlab's nine KV types "
                         f"({', '.join(f'{t.name}={t.ggml_type}' for t in TYPES.values())})")
    return TYPE_BY_ID[type_id]


def _rows(r: _Reader, info, row_bytes: int, n_cells: int, what: str) -> QTensor:
    if row_bytes % info.type_size:
        raise ValueError(f"llama.cpp state: {what} row of {row_bytes} bytes is not a whole number of "
                         f"{info.name} blocks ({info.type_size} bytes)")
    raw = np.frombuffer(r.take(n_cells * row_bytes, what), np.uint8).reshape(n_cells, row_bytes)
    return QTensor.from_raw(raw.copy(), info.name, (n_cells, row_bytes // info.type_size * info.block_size))


def _read_stream(r: _Reader, n_cells: int, cell_ext: bool) -> StreamState:
    positions, seq_ids, ext = np.empty(n_cells, np.int32), [], np.empty((n_cells, 3), np.int32)
    for i in range(n_cells):
        positions[i], n_seq = r.unpack("iI", f"cell {i}")
        if cell_ext:
            ext[i] = r.unpack("3i", f"cell {i} extension")
        seq_ids.append(r.unpack(f"{n_seq}i", f"cell {i} sequence ids"))
    v_trans, n_layer = r.unpack("II", "v_trans and n_layer")
    stream = StreamState(positions, seq_ids, bool(v_trans), cell_ext=ext if cell_ext else None)
    keys = []
    for il in range(n_layer):
        type_id, row_bytes = r.unpack("iQ", f"layer {il} K header")
        keys.append(_rows(r, _type(type_id, f"layer {il} K"), row_bytes, n_cells, f"layer {il} K"))
    for il in range(n_layer):
        if not v_trans:
            type_id, row_bytes = r.unpack("iQ", f"layer {il} V header")
            v = _rows(r, _type(type_id, f"layer {il} V"), row_bytes, n_cells, f"layer {il} V")
        else:
            type_id, el_bytes, n_embd = r.unpack("iII", f"layer {il} V header")
            info = _type(type_id, f"layer {il} V")
            if info.block_size != 1 or el_bytes != info.type_size:
                raise ValueError(f"llama.cpp state: layer {il} V is transposed but {info.name} is not a "
                                 f"one-value-per-element type ({el_bytes} bytes per element)")
            cols = np.frombuffer(r.take(n_embd * n_cells * el_bytes, f"layer {il} V"), np.uint8)
            rows = cols.reshape(n_embd, n_cells, el_bytes).transpose(1, 0, 2)  # (channel, cell) -> (cell, channel)
            v = QTensor.from_raw(np.ascontiguousarray(rows).reshape(n_cells, n_embd * el_bytes), info.name,
                                 (n_cells, n_embd))
        stream.layers.append(LayerCache(keys[il], v))
    return stream


def _read_record(r: _Reader, cell_ext: bool) -> list:
    streams = []
    for _ in range(r.u32("n_stream")):
        n_cells = r.u32("cell_count")
        streams.append(_read_stream(r, n_cells, cell_ext) if n_cells else None)
    return streams


def read_state(data, cell_ext: bool = False) -> KVState:
    """Parse llama.cpp KV-cache state bytes: `llama_state_seq_get_data`'s buffer, or the contents of a
    sequence file (`llama_state_seq_save_file`) or a session file (`llama_state_save_file`).

    cell_ext: the model keeps per-cell extensions (M-RoPE's 2D positions, n-gram embeddings); the
    bytes do not say so, llama.cpp knows it from the model. Raises ValueError on anything else.
    """
    if isinstance(data, (str, os.PathLike)):
        raise TypeError(f"read_state takes the state's bytes, got {type(data).__name__}; "
                        "use read_state_file(path) for a file")
    r = _Reader(data)
    magic = r.u32("magic")
    if magic == SEQ_DATA_MAGIC:
        state = KVState([], "seq_data", seq_id=r.i32("seq_id"))
    elif magic in (SEQ_FILE_MAGIC, SESSION_MAGIC):
        container, version = ("seq_file", SEQ_FILE_VERSION) if magic == SEQ_FILE_MAGIC else ("session", SESSION_VERSION)
        got = r.u32("version")
        if got != version:
            raise ValueError(f"llama.cpp state: {container} version {got}, this reader knows version {version} "
                             "(llama.cpp of llama-cpp-python 0.3.36)")
        n_token = r.u32("n_token")
        tokens = np.frombuffer(r.take(4 * n_token, "tokens"), np.int32).copy()
        arch = bytes(r.take(r.u32("arch length"), "arch")).decode() if container == "session" else None
        state = KVState([], container, tokens=tokens, arch=arch)
    else:
        raise ValueError(f"llama.cpp state: magic {magic:#010x} is none of llama_state_seq_get_data's "
                         f"{SEQ_DATA_MAGIC:#x}, a sequence file's 'ggsq' or a session file's 'ggsn'")
    state.streams = _read_record(r, cell_ext)
    if r.at != len(r.buf):
        raise ValueError(f"llama.cpp state: {len(r.buf) - r.at} bytes left after the cache record "
                         "(a model with cell extensions? pass cell_ext=True)")
    return state


def read_state_file(path, cell_ext: bool = False) -> KVState:
    """A sequence file (`llama_state_seq_save_file`) or session file (`llama_state_save_file`)."""
    with open(path, "rb") as f:
        return read_state(f.read(), cell_ext)


def write_state(state: KVState) -> bytes:
    """The bytes llama.cpp would write for `state` (read_state's inverse; V goes back transposed if it was)."""
    out = []
    put = lambda fmt, *v: out.append(struct.pack("<" + fmt, *v))  # noqa: E731
    if state.container == "seq_data":
        put("Ii", SEQ_DATA_MAGIC, state.seq_id)
    else:
        session = state.container == "session"
        put("III", SESSION_MAGIC if session else SEQ_FILE_MAGIC, SESSION_VERSION if session else SEQ_FILE_VERSION,
            len(state.tokens))
        out.append(np.asarray(state.tokens, "<i4").tobytes())
        if session:
            put("I", len(state.arch.encode()))
            out.append(state.arch.encode())
    put("I", len(state.streams))
    for s in state.streams:
        put("I", 0 if s is None else len(s.positions))
        if s is None:
            continue
        for i, (pos, ids) in enumerate(zip(s.positions, s.seq_ids)):
            put("iI", int(pos), len(ids))
            if s.cell_ext is not None:
                put("3i", *(int(x) for x in s.cell_ext[i]))
            put(f"{len(ids)}i", *ids)
        put("II", int(s.v_trans), len(s.layers))
        for layer in s.layers:
            put("iQ", layer.k.info.ggml_type, layer.k.raw.shape[-1])
            out.append(np.asarray(layer.k.raw).tobytes())
        for layer in s.layers:
            raw = np.asarray(layer.v.raw)
            if not s.v_trans:
                put("iQ", layer.v.info.ggml_type, raw.shape[-1])
                out.append(raw.tobytes())
            else:
                el = layer.v.info.type_size
                put("iII", layer.v.info.ggml_type, el, layer.v.shape[-1])
                out.append(raw.reshape(raw.shape[0], -1, el).transpose(1, 0, 2).tobytes())  # (cell, ch) -> (ch, cell)
    return b"".join(out)


def split_heads(rows: QTensor, n_head_kv: int) -> QTensor:
    """(n_cells, head_dim * n_head_kv) cache rows -> (n_head_kv, n_cells, head_dim), bytes unchanged.

    ggml ne = [head_dim, n_head_kv, n_cells]: a head's values are contiguous inside the row, and a
    head_dim that is a multiple of the block size keeps every block inside one head.
    """
    n_cells, width = rows.shape
    if width % n_head_kv:
        raise ValueError(f"a row of {width} values does not split into {n_head_kv} heads")
    head_dim = width // n_head_kv
    if head_dim % rows.info.block_size:
        raise ValueError(f"head_dim {head_dim} is not a multiple of {rows.type}'s block size {rows.info.block_size}")
    raw = np.asarray(rows.raw).reshape(n_cells, n_head_kv, -1).transpose(1, 0, 2)  # (n_head_kv, n_cells, head bytes)
    return QTensor.from_raw(np.ascontiguousarray(raw), rows.type, (n_head_kv, n_cells, head_dim), rows.flavor)
