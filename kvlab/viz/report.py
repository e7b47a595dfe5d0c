"""`kvlab report`: run the error sweep and write one self-contained HTML report (plotly inlined, offline).

Sections: K-type x V-type heatmaps with and without rotation and their difference; error vs
context length; error vs depth (how an error compounds through a stack of layers, kvlab.accuracy.depth);
error vs bits per value with the Pareto frontier; where the ref / cpu / cuda flavors disagree and
what it costs; a short text summary with the published numbers as context. The default data is the
synthetic generator (kvlab.accuracy.synthetic), so the report needs no download.
"""
import html
from pathlib import Path

import numpy as np

from kvlab.accuracy.depth import DEFAULT_PAIRS as GROWTH_PAIRS

REPORT_LENGTHS = (128, 512, 2048, 8192)
REPORT_LAYERS = 8

# Published numbers, for context only: end-to-end model metrics, not per-layer attention error.
FIELD_CONTEXT = """
<p><b>llama.cpp PR #7412</b> ("CUDA: quantized KV cache demo", J. Gäßler, May 2024) measured the KL divergence
of the next-token distribution against an f16 run (model/K/V types; its f16/f16/f16 row, 0.000189, is the noise
floor of that setup): V in q8_0 with f16 K gave KLD 0.000743, K in q8_0 with f16 V gave 0.000944, both in q8_0
0.000980, and V in q5_1 with f16 K 0.001759. K quantization costs more than V quantization at the same bits,
and 8-bit K and V are close to lossless. (Only the first rows of that table could be retrieved here; the
lower-bit rows continue the same ordering.)</p>
<p><b>ik_llama.cpp PR #1034</b> ("K-cache Hadamard transforms (CUDA)", Dec 2025; V cache left in f16) on
Qwen3-30B-A3B: perplexity increase over an f16 K cache of +11.30% for Q4_0 without Hadamard and +0.92% with it;
Q5_0 +0.79% → +0.26%; Q8_0 +0.04% → +0.07% (no gain, within noise). Rotation rescues 4-bit K and does nothing
for 8-bit K. llama.cpp adopted the same idea in PR #21038 (rotating Q, K and V), which kvlab models.</p>
<p><b>Through the layers:</b> KVTuner (Li et al. 2025, arXiv:2502.04420) finds that layers differ in their
sensitivity to KV quantization and searches per-layer K/V precision pairs; KV-AdaQuant (Hariri et al. 2025,
arXiv:2502.15075) traces the K/V asymmetry to the larger norms of the key projections, which amplify
quantization error as it propagates through the layers (4-bit K with 2-bit V kept 75.2% accuracy where 2-bit K
with 4-bit V kept 54.7%). kvlab's depth section is the controlled version: a random stack with known statistics,
the error each layer adds on its own separated from the error it inherits.</p>
"""


def _cell(table, metric, type_k, type_v, rotation=True, flavor="ref", n_ctx=None):
    n_ctx = n_ctx or int(table.n_ctx.max())
    sel = table[(table.type_k == type_k) & (table.type_v == type_v) & (table.rotation == rotation)
                & (table.flavor == flavor) & (table.n_ctx == n_ctx)]
    return float(sel[metric].mean()) if len(sel) else float("nan")


def _ratio(a, b) -> str:
    return f"{a / b:.3g}×" if b > 0 else "∞"


def summary(table, pareto: list) -> list:
    """Short findings, each one computed from the table (HTML paragraphs)."""
    types = set(table.type_k) & set(table.type_v)
    n_max, n_min = int(table.n_ctx.max()), int(table.n_ctx.min())
    lines = []
    if {"q4_0", "f16"} <= types:
        k4, v4 = _cell(table, "kl", "q4_0", "f16"), _cell(table, "kl", "f16", "q4_0")
        ko, vo = _cell(table, "out_rel_l2", "q4_0", "f16"), _cell(table, "out_rel_l2", "f16", "q4_0")
        lines.append(f"<b>K is more sensitive than V.</b> At 4.5 bits (q4_0, the other side f16, rotation on, "
                     f"context {n_max}) the softmax KL is {k4:.3g} with a quantized K and {v4:.3g} with a "
                     f"quantized V; output relative error {ko:.3g} vs {vo:.3g}. A quantized V perturbs the "
                     f"output linearly but leaves the attention weights exact.")
    gains = []
    for t in ("q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "q8_0"):
        if {t, "f16"} <= types and table.rotation.nunique() == 2:
            off, on = _cell(table, "kl", t, "f16", rotation=False), _cell(table, "kl", t, "f16", rotation=True)
            gains.append(f"{t} {_ratio(off, on)} ({off:.2g} → {on:.2g})")
    if gains:
        lines.append("<b>Rotation (Hadamard, as llama.cpp applies it by default)</b> divides the KL of a "
                     "quantized K (V in f16) by: " + "; ".join(gains) + ". The absolute gain for 8-bit K is "
                     "negligible next to the 4-bit gain.")
    if "q8_0" in types:
        kl8, cos8 = _cell(table, "kl", "q8_0", "q8_0"), _cell(table, "out_cos", "q8_0", "q8_0")
        lines.append(f"<b>q8_0/q8_0 is near-lossless:</b> KL {kl8:.2g}, output cosine {cos8:.6f}.")
    if {"q4_0", "f16"} <= types and n_max > n_min:
        growth = [f"rotation {'on' if r else 'off'} {_cell(table, 'kl', 'q4_0', 'f16', r, n_ctx=n_min):.3g} → "
                  f"{_cell(table, 'kl', 'q4_0', 'f16', r, n_ctx=n_max):.3g}" for r in sorted(set(table.rotation))]
        lines.append(f"<b>Error grows with context</b> for low-bit K: KL of q4_0/f16 from {n_min} to {n_max} "
                     "tokens: " + "; ".join(growth) + ". More keys means more chances for a quantization "
                     "error to lift a wrong key into the attended set.")
    if pareto:
        lines.append("<b>Pareto frontier</b> (bits per value vs output error, rotation on): " + ", ".join(pareto) + ".")
    for flavor in ("cpu", "cuda"):
        if flavor in set(table.flavor):
            lines.append(_flavor_line(table, flavor))
    return lines


def depth_summary(depth_table) -> list:
    """Findings of the layer-growth stack (kvlab.accuracy.depth), computed from its table (HTML paragraphs)."""
    ref = depth_table[depth_table.flavor == "ref"]
    n = int(ref.depth.max())
    rotation = True in set(ref.rotation)
    pairs = list(dict.fromkeys(zip(ref.type_k, ref.type_v)))

    def series(type_k, type_v, metric, rot=rotation):
        sel = ref[(ref.type_k == type_k) & (ref.type_v == type_v) & (ref.rotation == rot)].sort_values("depth")
        return sel.depth.to_numpy(), sel[metric].to_numpy()

    settings = depth_table.attrs.get("settings", {})
    model = (f"a stack of {n} pre-norm layers (random weights with the synthetic K/V statistics, d_model "
             f"{int(ref.d_model.iloc[0])}, {int(ref.n_tokens.iloc[0])} tokens, each branch adding "
             f"{settings.get('branch_scale', float('nan')):.0%} of the residual RMS; rotation "
             f"{'on' if rotation else 'off'})")
    growth = []
    for type_k, type_v in pairs:
        _, err = series(type_k, type_v, "hidden_rel_l2")
        _, own = series(type_k, type_v, "hidden_own_rel_l2")
        if n > 1 and own[-1] > 0:
            growth.append(f"{type_k}/{type_v} {err[0]:.2g} → {err[-1]:.2g} ({err[-1] / own[-1]:.2f}×)")
    lines = []
    if growth:
        lines.append(f"<b>Error compounds through the layers.</b> In {model}, the residual stream's relative error "
                     f"after layer 1 → after layer {n}: " + "; ".join(growth) + ". In brackets: that error over "
                     "the root sum of squares of the errors the layers add on their own; above 1×, inherited error "
                     "grows as it passes through the later layers, below 1× they damp it; how much depends on how strongly each "
                     "layer writes into the residual stream (kvlab.accuracy.depth's docstring has the numbers).")
    worst = []
    for type_k, type_v in pairs:
        _, total = series(type_k, type_v, "attn_rel_l2")
        _, local = series(type_k, type_v, "attn_local_rel_l2")
        if len(total) and local[-1] > 0:
            worst.append(f"{type_k}/{type_v} {total[-1] / local[-1]:.2f}×")
    if worst and n > 1:
        lines.append(f"<b>Inherited error adds to the layer's own:</b> layer {n}'s attention output is, relative to "
                     "the same layer on exact input with the same quantized cache, " + ", ".join(worst) + " as wrong.")
    if ("f16", "q4_0") in pairs and n > 1:
        _, kl = series("f16", "q4_0", "kl")
        lines.append(f"<b>A V error becomes a K error one layer later:</b> with only V quantized (f16/q4_0), layer 1's "
                     f"attention weights stay exact (KL {kl[0]:.2g}: the f16 rounding of K), but layer 2 reads keys "
                     f"computed from a perturbed residual stream: KL {kl[1]:.2g} at depth 2, {kl[-1]:.2g} at depth {n}.")
    if {("q8_0", "q8_0"), ("q4_0", "q4_0")} <= set(pairs):
        _, e8 = series("q8_0", "q8_0", "hidden_rel_l2")
        _, e4 = series("q4_0", "q4_0", "hidden_rel_l2")
        _, kl8 = series("q8_0", "q8_0", "kl")
        _, kl4 = series("q4_0", "q4_0", "kl")
        lines.append(f"<b>q8_0/q8_0 stays near-lossless through depth:</b> residual error {e8[-1]:.2g} after {n} layers "
                     f"against {e4[-1]:.2g} for q4_0/q4_0. At every depth the ratio stays between {(e4 / e8).min():.1f}× "
                     f"and {(e4 / e8).max():.1f}×, and the KL ratio between {(kl4 / kl8).min():.0f}× and "
                     f"{(kl4 / kl8).max():.0f}×: 8-bit steps are 16× finer, small errors propagate linearly, and KL is "
                     "quadratic in small logit errors (16² = 256).")
    return lines


def _flavor_line(table, flavor: str) -> str:
    keys = ["type_k", "type_v", "rotation", "n_ctx"]
    ref = table[table.flavor == "ref"][keys + ["out_rel_l2"]].rename(columns={"out_rel_l2": "out_rel_l2_ref"})
    joined = table[table.flavor == flavor].merge(ref, on=keys).set_index(keys)
    n_max = int(table.n_ctx.max())
    at = joined.xs(n_max, level="n_ctx").xs(True, level="rotation") if True in set(table.rotation) else None
    if at is None or not len(at):
        return ""
    from kvlab.viz.plots import ERROR_FLOOR
    excess = np.log10(np.maximum(at.out_rel_l2, ERROR_FLOOR)) - np.log10(np.maximum(at.out_rel_l2_ref, ERROR_FLOOR))
    worst = excess.sort_values(ascending=False).head(3)
    items = [f"{k}/{v} ({at.loc[(k, v), 'kernel']} path: output error {at.loc[(k, v), 'out_rel_l2']:.2g} vs "
             f"{at.loc[(k, v), 'out_rel_l2_ref']:.2g})"
             for (k, v), x in worst.items()]
    share = float((np.abs(excess) > np.log10(1.1)).mean())
    return (f"<b>{flavor} vs ref:</b> {share:.0%} of the pairs differ by more than 10% in output error; the "
            f"largest excess is at " + ", ".join(items) + ".")


def render_html(table, figures: list, findings: list, settings: dict, elapsed: float) -> str:
    parts = []
    for i, (title, fig) in enumerate(figures):
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        parts.append(f"<h2>{html.escape(title)}</h2>\n{div}")
    meta = html.escape(str(settings))
    findings_html = "\n".join(f"<p>{line}</p>" for line in findings if line)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvlab report: KV-cache error per K/V type pair</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em;color:#222}}
h2{{border-bottom:1px solid #ccc;margin-top:2em}} .meta{{font-size:80%;color:#555}}</style></head>
<body><h1>KV-cache quantization error per K/V type pair, as llama.cpp runs it</h1>
<p>{len(table)} cells: {table.type_k.nunique()} K types × {table.type_v.nunique()} V types × rotation
{sorted(set(table.rotation))} × flavors {sorted(set(table.flavor))} × context lengths {sorted(set(table.n_ctx))}
on {html.escape(str(table.source.iloc[0]))}. Each cell: attention of the last queries over a cache written with
set_rows (rotation per llama.cpp's rotation_plan), compared with exact float64 attention.</p>
<h2>Summary</h2>{findings_html}
<h2>Context: published measurements</h2>{FIELD_CONTEXT}
{''.join(parts)}
<h2>Settings and versions</h2><p class="meta">{meta}</p>
<p class="meta">sweep time {elapsed:.1f} s</p></body></html>
"""


def build_report(table, out_path, depth_table=None) -> Path:
    from kvlab.viz import plots
    n_max = int(table.n_ctx.max())
    types = set(table.type_k) & set(table.type_v)
    pairs = [p for p in GROWTH_PAIRS if set(p) <= types] or [(sorted(types)[0], sorted(types)[0])]
    bits_fig, pareto = plots.bits_vs_error(table, "out_rel_l2", n_ctx=n_max,
                                           rotation=True if True in set(table.rotation) else False)
    figures = []
    if table.rotation.nunique() == 2:
        figures += [("Heatmaps: output relative error, rotation off / on / difference",
                     plots.rotation_heatmaps(table, "out_rel_l2")),
                    ("Heatmaps: softmax KL (depends on the K type only: V does not enter the logits)",
                     plots.rotation_heatmaps(table, "kl"))]
    figures += [("Error vs context length: softmax KL", plots.context_growth(table, pairs, "kl")),
                ("Error vs context length: output relative error", plots.context_growth(table, pairs, "out_rel_l2"))]
    findings = summary(table, pareto)
    if depth_table is not None and len(depth_table):
        depth_pairs = list(dict.fromkeys(zip(depth_table.type_k, depth_table.type_v)))
        figures.append(("Error vs depth: how the error compounds through layers",
                        plots.depth_growth(depth_table, depth_pairs)))
        findings += depth_summary(depth_table)
    figures.append(("Error vs bits per value (Pareto frontier)", bits_fig))
    if {"cpu", "cuda"} & set(table.flavor):
        figures.append(("Where the flavors (ref / cpu / cuda) disagree",
                        plots.flavor_disagreement(table, "out_rel_l2", rotation=True in set(table.rotation))))
    page = render_html(table, figures, findings, table.attrs, table.attrs.get("elapsed_s", 0.0))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


