"""ggml's block formats written as plain torch tensor math: the peers of kvlab's GPU kernels in
bench/gpu_quant.py (run eager, or through torch.compile). Same formulas and byte layout as ggml's C
reference, not byte-exact (no flavor rounding rules, argmax ties broken torch's way).

QUANTIZE[type](x (rows, cols) float32) -> (rows, row_bytes) uint8
DEQUANTIZE[type](raw (rows, row_bytes) uint8) -> (rows, cols) float32
"""
import torch

IQ4NL = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def _blocks(x):
    return x.reshape(-1, 32)                                          # (n_blocks, 32)


def _half_bytes(v):
    """(n_blocks,) float32 -> (n_blocks, 2) uint8 of the fp16 bits."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _halves(raw, off):
    """(n_blocks, type_size) uint8 -> (n_blocks, 1) float32 of the fp16 at byte off."""
    return raw[:, off:off + 2].contiguous().view(torch.float16).float()


def _nibbles(q):
    """(n_blocks, 32) small ints -> (n_blocks, 16) uint8: q[j] low, q[j + 16] high."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 15) | (q[:, 16:] << 4)


def _unnibble(b):
    b = b.to(torch.int32)
    return torch.cat([b & 15, b >> 4], 1)                             # (n_blocks, 32)


def _high_bits(q):
    """(n_blocks, 32) ints -> (n_blocks, 4) uint8: bit j = bit 4 of q[j] (q5's qh, little-endian)."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(32, device=q.device)
    return bits.sum(1, dtype=torch.int64).to(torch.int32).contiguous().view(torch.uint8).reshape(-1, 4)


def _unhigh(raw, off):
    qh = raw[:, off:off + 4].contiguous().view(torch.int32).to(torch.int64)      # (n_blocks, 1)
    return ((qh >> torch.arange(32, device=raw.device)) & 1).to(torch.int32) << 4   # (n_blocks, 32)


def _inv(d):
    return torch.where(d != 0, 1 / d, torch.zeros_like(d))


def _signed_max(xb):
    """The value of largest magnitude in each block, sign kept: (n_blocks, 1)."""
    return xb.gather(1, xb.abs().argmax(1, keepdim=True))


def _rows(out, x_or_raw, width):
    return out.reshape(x_or_raw.shape[0], width)


def q8_0(x):
    xb = _blocks(x)
    d = xb.abs().amax(1, keepdim=True) / 127
    q = torch.round(xb * _inv(d)).to(torch.int8).view(torch.uint8)
    return _rows(torch.cat([_half_bytes(d.reshape(-1)), q], 1), x, -1)


def deq_q8_0(raw):
    yb = raw.reshape(-1, 34)
    return _rows(yb[:, 2:].view(torch.int8).float() * _halves(yb, 0), raw, -1)


def _sym(x, levels):
    """q4_0 (levels 16) / q5_0 (32): d = max / -(levels/2), q = min(levels-1, int(x/d + levels/2 + .5))."""
    xb = _blocks(x)
    d = _signed_max(xb) / -(levels // 2)
    q = torch.clamp((xb * _inv(d) + (levels // 2 + 0.5)).to(torch.int32), 0, levels - 1)
    return xb, d, q


def q4_0(x):
    _, d, q = _sym(x, 16)
    return _rows(torch.cat([_half_bytes(d.reshape(-1)), _nibbles(q)], 1), x, -1)


def deq_q4_0(raw):
    yb = raw.reshape(-1, 18)
    return _rows((_unnibble(yb[:, 2:]) - 8).float() * _halves(yb, 0), raw, -1)


def q5_0(x):
    _, d, q = _sym(x, 32)
    return _rows(torch.cat([_half_bytes(d.reshape(-1)), _high_bits(q), _nibbles(q)], 1), x, -1)


def deq_q5_0(raw):
    yb = raw.reshape(-1, 22)
    q = _unnibble(yb[:, 6:]) | _unhigh(yb, 2)
    return _rows((q - 16).float() * _halves(yb, 0), raw, -1)


def _affine(x, levels):
    xb = _blocks(x)
    lo, hi = xb.amin(1, keepdim=True), xb.amax(1, keepdim=True)
    d = (hi - lo) / (levels - 1)
    q = torch.clamp(((xb - lo) * _inv(d) + 0.5).to(torch.int32), 0, levels - 1)
    return d, lo, q


def q4_1(x):
    d, lo, q = _affine(x, 16)
    return _rows(torch.cat([_half_bytes(d.reshape(-1)), _half_bytes(lo.reshape(-1)), _nibbles(q)], 1), x, -1)


def deq_q4_1(raw):
    yb = raw.reshape(-1, 20)
    return _rows(_unnibble(yb[:, 4:]).float() * _halves(yb, 0) + _halves(yb, 2), raw, -1)


def q5_1(x):
    d, lo, q = _affine(x, 32)
    return _rows(torch.cat([_half_bytes(d.reshape(-1)), _half_bytes(lo.reshape(-1)), _high_bits(q),
                            _nibbles(q)], 1), x, -1)


def deq_q5_1(raw):
    yb = raw.reshape(-1, 24)
    q = _unnibble(yb[:, 8:]) | _unhigh(yb, 4)
    return _rows(q.float() * _halves(yb, 0) + _halves(yb, 2), raw, -1)


def iq4_nl(x):
    """Nearest of the 16 levels to x/d, then the weighted least-squares scale (weights x^2)."""
    xb = _blocks(x)
    kv = torch.tensor(IQ4NL, dtype=torch.float32, device=x.device)
    d = _signed_max(xb) / -127
    idx = torch.bucketize(xb * _inv(d), (kv[1:] + kv[:-1]) / 2).clamp(0, 15)   # (n_blocks, 32)
    lv = kv[idx]
    w = xb * xb
    sumqx, sumq2 = (w * lv * xb).sum(1, keepdim=True), (w * lv * lv).sum(1, keepdim=True)
    d = torch.where(sumq2 > 0, sumqx / sumq2, d)
    return _rows(torch.cat([_half_bytes(d.reshape(-1)), _nibbles(idx)], 1), x, -1)


def deq_iq4_nl(raw):
    yb = raw.reshape(-1, 18)
    kv = torch.tensor(IQ4NL, dtype=torch.float32, device=raw.device)
    return _rows(kv[_unnibble(yb[:, 2:])] * _halves(yb, 0), raw, -1)


QUANTIZE = {
    "f32": lambda x: x.clone().view(torch.uint8),
    "f16": lambda x: x.to(torch.float16).view(torch.uint8),
    "bf16": lambda x: x.to(torch.bfloat16).view(torch.uint8),
    "q8_0": q8_0, "q4_0": q4_0, "q4_1": q4_1, "iq4_nl": iq4_nl, "q5_0": q5_0, "q5_1": q5_1,
}
DEQUANTIZE = {
    "f32": lambda raw: raw.view(torch.float32).clone(),
    "f16": lambda raw: raw.view(torch.float16).float(),
    "bf16": lambda raw: raw.view(torch.bfloat16).float(),
    "q8_0": deq_q8_0, "q4_0": deq_q4_0, "q4_1": deq_q4_1, "iq4_nl": deq_iq4_nl, "q5_0": deq_q5_0,
    "q5_1": deq_q5_1,
}
