"""Error metrics of approximate attention against exact attention (all in float64).

- ``kl``: mean over query rows of KL(softmax(exact logits) || softmax(approx logits)), natural log.
- ``*_rel_l2``: ||approx - exact|| / ||exact|| over the whole tensor.
- ``out_cos``: mean over query rows of the cosine between approx and exact output rows.
- ``topk_overlap``: mean over query rows of |top-k(exact) & top-k(approx)| / k of the attended keys.
Arrays have the query rows on all axes but the last (keys for logits, channels for outputs).
norm, tensor_rel_l2 and softmax_kl take numpy arrays or torch tensors (kvlab._xp: the layer-growth
stack measures on its device); the rest runs on the host.
"""
import numpy as np

from kvlab import _xp


def norm(x) -> float:
    """The 2-norm of the whole tensor."""
    return float(_xp.namespace(x).linalg.norm(x))


def tensor_rel_l2(approx, exact) -> float:
    scale = norm(exact)
    return norm(_xp.cast(approx, "float64") - exact) / scale if scale else 0.0


def log_softmax(logits):
    xp = _xp.namespace(logits)
    shifted = logits - xp.amax(logits, axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_kl(exact_logits, approx_logits, mask=None):
    """KL(p || q) per row, p = softmax(exact), q = softmax(approx); keys outside `mask` (a causal mask: -inf
    logits on both sides) are left out."""
    xp = _xp.namespace(exact_logits)
    log_p, log_q = log_softmax(exact_logits), log_softmax(approx_logits)
    with np.errstate(invalid="ignore"):   # masked keys: 0 * (-inf - -inf), dropped by the where
        terms = xp.exp(log_p) * (log_p - log_q)
    if mask is not None:
        terms = xp.where(mask, terms, 0.0)
    return terms.sum(axis=-1).clip(0.0)   # rounding can leave a lossless row a hair below 0


def row_cosine(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    num = (approx * exact).sum(axis=-1)
    den = np.linalg.norm(approx, axis=-1) * np.linalg.norm(exact, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def topk_overlap(exact_logits: np.ndarray, approx_logits: np.ndarray, k: int) -> np.ndarray:
    """Fraction of the k most attended keys (exact) that are also among the approx top k, per row."""
    k = min(k, exact_logits.shape[-1])
    top_exact = np.argpartition(-exact_logits, k - 1, axis=-1)[..., :k]
    top_approx = np.argpartition(-approx_logits, k - 1, axis=-1)[..., :k]
    hits = (top_exact[..., :, None] == top_approx[..., None, :]).any(axis=-1).sum(axis=-1)
    return hits / k


def attention_metrics(exact_logits, approx_logits, exact_out, approx_out, topk: int = 8) -> dict:
    """The logit-side and output-side metrics of one cell (k_rel_l2/v_rel_l2 are added by the caller)."""
    return {
        "kl": float(softmax_kl(exact_logits, approx_logits).mean()),
        "out_rel_l2": tensor_rel_l2(approx_out, exact_out),
        "out_cos": float(row_cosine(np.asarray(approx_out, np.float64), exact_out).mean()),
        "logit_rel_l2": tensor_rel_l2(approx_logits, exact_logits),
        "topk_overlap": float(topk_overlap(exact_logits, approx_logits, topk).mean()),
    }


METRICS = ("kl", "out_rel_l2", "out_cos", "logit_rel_l2", "k_rel_l2", "v_rel_l2", "topk_overlap")
