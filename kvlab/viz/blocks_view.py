"""One block's bytes decoded into the members of its ggml struct, for display.

    view = decode_block(q.raw[0, :18], "q4_0")
    view.fields      # d (the scale), qs (the packed nibbles), ...: offset, size, bytes, decoded value
    view.q           # (32,) the integer index of each value, q5's high bit included
    view.values      # (32,) float32, rebuilt from the fields as ggml's to_float does

A pure function over raw bytes that shares no code with the kernels, so the tests can check the
kernels' layout independently: `values` must equal `kvlab.dequantize` bit for bit.
Float types (f32, f16, bf16) have one value per "block": sign, exponent and mantissa.
Below the decoder, what notebook 01's block explorer shows: an example block, the editable values parsed,
one block through a type, and its fields as an HTML table.
"""
from dataclasses import dataclass

import numpy as np

from kvlab.kernels.iq4_nl import KVALUES
from kvlab.quant import dequantize, quantize
from kvlab.types import type_info

# kvalues_iq4nl (ggml-common.h): the 16 non-uniform levels of iq4_nl (kept once, beside its kernels)
IQ4NL_LEVELS = KVALUES


@dataclass(frozen=True)
class Field:
    name: str        # the struct member, or sign/exponent/mantissa of a float
    offset: int      # first byte in the block
    size: int        # bytes (for bit fields of a float: the bytes of the whole value)
    value: object    # decoded: float for d/m, int for qh and float bit fields, array for qs
    meaning: str


@dataclass(frozen=True)
class BlockView:
    type: str
    raw: bytes
    fields: tuple     # of Field, in struct order
    q: np.ndarray     # (block_size,) int: quant index per value (high bit included); the bits for floats
    values: np.ndarray  # (block_size,) float32

    def describe(self) -> str:
        """Plain text, one line per field (deterministic: for printing in notebooks and docs)."""
        lines = [f"{self.type}: {len(self.raw)} bytes = {self.raw.hex(' ')}"]
        for f in self.fields:
            shown = f"0x{f.value:08x}" if f.name == "qh" else _show(f.value)
            lines.append(f"  {f.name:<8} bytes {f.offset}..{f.offset + f.size - 1}: {shown}  ({f.meaning})")
        if type_info(self.type).is_quantized:
            lines.append(f"  q        {' '.join(str(int(v)) for v in self.q)}")
        return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, np.ndarray):
        return " ".join(str(int(v)) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass(frozen=True)
class _QuantLayout:
    """Byte offsets of the members of a 32-value block struct, and how q maps to a level."""
    d: int
    m: int | None      # the block minimum (q4_1, q5_1): x = d*q + m
    qh: int | None     # q5's 4 bytes of high bits
    qs: int
    nibbles: bool      # two 4-bit quants per byte (all but q8_0)
    zero: int          # subtracted from q: x = d*(q - zero)


_QUANT = {
    "q8_0": _QuantLayout(d=0, m=None, qh=None, qs=2, nibbles=False, zero=0),
    "q4_0": _QuantLayout(d=0, m=None, qh=None, qs=2, nibbles=True, zero=8),
    "q4_1": _QuantLayout(d=0, m=2, qh=None, qs=4, nibbles=True, zero=0),
    "iq4_nl": _QuantLayout(d=0, m=None, qh=None, qs=2, nibbles=True, zero=0),
    "q5_0": _QuantLayout(d=0, m=None, qh=2, qs=6, nibbles=True, zero=16),
    "q5_1": _QuantLayout(d=0, m=2, qh=4, qs=8, nibbles=True, zero=0),
}

# (exponent bits, mantissa bits, the little-endian unsigned integer holding the value)
_FLOAT = {"f32": (8, 23, "<u4"), "f16": (5, 10, "<u2"), "bf16": (8, 7, "<u2")}


def decode_block(raw, type: str) -> BlockView:
    """Decode one block of ggml type `type` from its type_size bytes (bytes, bytearray or uint8 array)."""
    info = type_info(type)
    data = bytes(raw) if isinstance(raw, (bytes, bytearray)) else np.asarray(raw, dtype=np.uint8).tobytes()
    if len(data) != info.type_size:
        raise ValueError(f"decode_block: a {type} block is {info.type_size} bytes, got {len(data)}")
    if type in _FLOAT:
        return _decode_float(data, type)
    return _decode_quant(data, type, _QUANT[type])


def _half(data: bytes, off: int) -> float:
    return float(np.frombuffer(data, "<f2", 1, off)[0])


def _decode_quant(data: bytes, type: str, lay: _QuantLayout) -> BlockView:
    d = np.float32(_half(data, lay.d))
    fields = [Field("d", lay.d, 2, float(d), "scale, IEEE half")]
    if lay.m is not None:
        fields.append(Field("m", lay.m, 2, _half(data, lay.m), "block minimum, IEEE half"))
    if lay.nibbles:
        qs = np.frombuffer(data, np.uint8, 16, lay.qs)
        q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.int64)  # (32,): low nibbles are values 0..15
    else:
        qs = np.frombuffer(data, np.int8, 32, lay.qs)
        q = qs.astype(np.int64)
    if lay.qh is not None:
        qh = int(np.frombuffer(data, "<u4", 1, lay.qh)[0])
        fields.append(Field("qh", lay.qh, 4, qh, "bit j = bit 4 of q[j]"))
        q = q | (((qh >> np.arange(32)) & 1) << 4)
    fields.append(Field("qs", lay.qs, len(qs), qs.astype(np.int64),
                        "q[j] | q[j+16] << 4" if lay.nibbles else "q[j], int8"))
    level = IQ4NL_LEVELS[q].astype(np.float32) if type == "iq4_nl" else (q - lay.zero).astype(np.float32)
    values = level * d  # float32 products, as to_float
    if lay.m is not None:
        values = values + np.float32(fields[1].value)  # a separate add: ggml-base is built without FMA
    return BlockView(type, data, tuple(fields), q, values.astype(np.float32))


def _decode_float(data: bytes, type: str) -> BlockView:
    exp_bits, man_bits, utype = _FLOAT[type]
    bits = int(np.frombuffer(data, utype, 1)[0])
    sign = bits >> (exp_bits + man_bits)
    exponent = (bits >> man_bits) & ((1 << exp_bits) - 1)
    mantissa = bits & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    if type == "bf16":
        value = np.array([bits << 16], np.uint32).view(np.float32)
    else:
        value = np.frombuffer(data, "<f4" if type == "f32" else "<f2", 1).astype(np.float32)
    fields = (
        Field("sign", 0, len(data), sign, "1 bit"),
        Field("exponent", 0, len(data), exponent, f"{exp_bits} bits, bias {bias}"),
        Field("mantissa", 0, len(data), mantissa, f"{man_bits} bits"),
    )
    return BlockView(type, data, fields, np.array([bits], np.int64), value)


# ---------------------------------------------------------------- notebook 01's block explorer

def example_block(seed: int = 0, outlier: float = 4.0) -> np.ndarray:
    """32 float32 values like one block of a K row: normals (3 decimals) and one outlier at index 5."""
    x = np.random.default_rng(seed).standard_normal(32).astype(np.float32)
    x[5] = np.float32(outlier)
    return np.round(x, 3)


def parse_values(text: str, n: int = 32) -> np.ndarray:
    """n float32 values from comma- or space-separated text (for the editable block)."""
    try:
        values = np.array([float(t) for t in text.replace(",", " ").split()], dtype=np.float32)
    except ValueError:
        raise ValueError(f"expected {n} numbers separated by commas or spaces, got {text!r}") from None
    if values.size != n:
        raise ValueError(f"expected {n} numbers, got {values.size}")
    return values


def quantize_block(values: np.ndarray, type_name: str, flavor: str = "ref"):
    """(decoded views, dequantized values) of one 32-value block: one view per ggml block (32 for floats)."""
    q = quantize(values.reshape(1, -1), type_name, flavor)  # (1, 32) -> (1, row_bytes)
    info = type_info(type_name)
    raw = np.asarray(q.raw).reshape(-1, info.type_size)    # (n_blocks, type_size)
    return [decode_block(r, type_name) for r in raw], dequantize(q).reshape(-1)


def block_fields_html(views) -> str:
    """An HTML table of a block's struct members (quantized types) or of each value's bits (floats)."""
    if type_info(views[0].type).is_quantized:
        view = views[0]
        rows = [(f.name, f"{f.offset}..{f.offset + f.size - 1}", view.raw[f.offset:f.offset + f.size].hex(" "),
                 _field_text(f), f.meaning) for f in view.fields]
        rows.append(("q", "", "", " ".join(str(int(v)) for v in view.q), "index per value (j = 0..31)"))
        head = ("member", "bytes", "hex", "decoded", "meaning")
    else:
        rows = [(j, v.raw.hex(" "), *(f.value for f in v.fields), f"{float(v.values[0]):.6g}")
                for j, v in enumerate(views[:8])]
        head = ("j", "hex", "sign", "exponent", "mantissa", "value")
    cells = "".join("<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in row) + "</tr>"
                    for row in rows)
    header = "".join(f"<th style='text-align:left'>{h}</th>" for h in head)
    return f"<table class='kvlab-fields'><tr>{header}</tr>{cells}</table>"


def _field_text(field) -> str:
    if field.name == "qh":
        return f"0x{field.value:08x}; bits j = 0..31: {format(field.value, '032b')[::-1]}"
    if isinstance(field.value, np.ndarray):
        return " ".join(f"{int(v):02x}" for v in field.value)
    return f"{field.value:.6g}" if isinstance(field.value, float) else str(field.value)
