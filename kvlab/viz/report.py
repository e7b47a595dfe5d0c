"""`kvlab report`: run the error sweep and write one self-contained HTML report (plotly inlined, offline).

It answers three questions. Why `--split-mode tensor` broke with a quantized cache and what runs now
(kvlab.viz.report_tp: the eras, the failing rule, the compatibility matrix). What each K/V pair costs
in accuracy: heatmaps with and without rotation, KL per K type, error vs context length and vs depth
(kvlab.accuracy.depth), error vs bits per value with the Pareto frontier. Where the ref / cpu / cuda
flavors disagree. A summary computed from the tables, published numbers as context, and the settings.
The default data is the synthetic generator (kvlab.accuracy.synthetic), so the report needs no download.
"""
import html
from pathlib import Path

import numpy as np

from kvlab._io import write_text
from kvlab.accuracy.depth import DEFAULT_PAIRS as GROWTH_PAIRS
from kvlab.accuracy.table import context_growth, growth_word, select

REPORT_LENGTHS = (128, 512, 2048, 8192)
REPORT_LAYERS = 8

# Published numbers, for context only: end-to-end model metrics, not per-layer attention error.
FIELD_CONTEXT = """
<p><b>llama.cpp PR #7412</b> ("CUDA: quantized KV cache demo", J. Gäßler, May 2024) measured the KL divergence
of the next-token distribution against an f16 run (model/K/V types; its f16/f16/f16 row, 0.000189, is the noise
floor of that setup): V in q8_0 with f16 K gave KLD 0.000743, K in q8_0 with f16 V gave 0.000944, both in q8_0
0.000980, and V in q5_1 with f16 K 0.001759. K quantization costs more than V quantization at the same bits,
and 8-bit K and V are close to lossless.</p>
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
    sel = select(table, type_k=type_k, type_v=type_v, rotation=rotation, flavor=flavor,
                 n_ctx=n_ctx or int(table.n_ctx.max()))
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
        lines.append(growth_line(table, "q4_0", "f16"))
    if pareto:
        lines.append("<b>Pareto frontier</b> (bits per value vs output error, rotation on): " + ", ".join(pareto) + ".")
    for flavor in ("cpu", "cuda"):
        if flavor in set(table.flavor):
            lines.append(_flavor_line(table, flavor))
    return lines


def growth_line(table, type_k: str, type_v: str, metric: str = "kl") -> str:
    """One sentence on how the pair's error changes from the shortest to the longest context (computed)."""
    changes = []
    for rotation in sorted(set(table.rotation)):
        n_min, n_max, first, last = context_growth(table, type_k, type_v, metric, rotation)
        changes.append((rotation, first, last, last / first if first > 0 else float("nan")))
    words = {growth_word(r) for *_, r in changes}
    word = words.pop() if len(words) == 1 else "changes"
    items = "; ".join(f"rotation {'on' if rot else 'off'} {a:.3g} → {b:.3g} ({r:.2f}×)" for rot, a, b, r in changes)
    return (f"<b>Error {word} with context</b> for {type_k}/{type_v}: softmax KL from {n_min} to {n_max} tokens: "
            f"{items}. More keys mean more chances for a quantization error to lift a wrong key into the attended set, "
            f"and more keys share the softmax, which dilutes each one's error.")


def depth_summary(depth_table) -> list:
    """Findings of the layer-growth stack (kvlab.accuracy.depth), computed from its table (HTML paragraphs)."""
    ref = depth_table[depth_table.flavor == "ref"]
    n = int(ref.depth.max())
    rotation = True in set(ref.rotation)
    pairs = list(dict.fromkeys(zip(ref.type_k, ref.type_v)))

    def series(type_k, type_v, metric, rot=rotation):
        sel = select(ref, type_k=type_k, type_v=type_v, rotation=rot).sort_values("depth")
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


def settings_table(attrs: dict) -> str:
    """The table's settings and versions as a two-column HTML table (nested keys joined by dots)."""
    def flat(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from flat(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            yield prefix, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in flat("", attrs))
    return f"<table class='kvlab-table kvlab-settings'>{rows}</table>"


def _render(item, first_figure: bool) -> str:
    if isinstance(item, str):
        return item
    title, fig = item
    div = fig.to_html(full_html=False, include_plotlyjs=first_figure, config={"displaylogo": False})
    return f"<h3>{html.escape(title)}</h3>\n{div}"


def render_html(table, sections: list, elapsed: float) -> str:
    """sections: (heading, [HTML string or (title, figure)]) in reading order; plotly.js is inlined once."""
    body, drawn = [], 0
    for heading, items in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            body.append(_render(item, first_figure=drawn == 0 and not isinstance(item, str)))
            drawn += not isinstance(item, str)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvlab report: quantized KV caches in llama.cpp</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em;color:#222;line-height:1.45}}
h2{{border-bottom:1px solid #ccc;margin-top:2em}} h3{{margin-top:1.5em}} .meta{{font-size:80%;color:#555}}
pre.kvlab-error{{white-space:pre-wrap;background:#fbeeee;border-left:4px solid #d62728;padding:.6em;font-size:85%}}
table.kvlab-table{{border-collapse:collapse;font-size:85%}} .kvlab-table th,.kvlab-table td{{border:1px solid #ddd;
padding:3px 8px;text-align:left;vertical-align:top}} .kvlab-table thead th{{background:#f4f4f4}}</style></head>
<body><h1>Quantized KV caches in llama.cpp: what breaks under tensor parallelism, and what each K/V pair costs</h1>
<p>Three questions: why did <code>--split-mode tensor</code> break with a quantized cache, and what runs now?
What does each of the 81 K/V type pairs cost in accuracy, with and without llama.cpp's Hadamard rotation, and
how does the error grow with context and depth? Where do the ref / cpu / cuda code paths disagree?</p>
<p>Accuracy data: {len(table)} cells, {table.type_k.nunique()} K types × {table.type_v.nunique()} V types ×
rotation {sorted(set(table.rotation))} × flavors {sorted(set(table.flavor))} × context lengths
{sorted(set(table.n_ctx))} on {html.escape(str(table.source.iloc[0]))}. Each cell: attention of the last queries
over a cache written with set_rows (rotation per llama.cpp's rotation_plan), compared with exact float64
attention.</p>
{chr(10).join(body)}
<p class="meta">sweep time {elapsed:.1f} s</p></body></html>
"""


def accuracy_items(table, depth_table, pareto_fig) -> list:
    """The accuracy section: heatmaps, KL per K type, growth with context and depth, Pareto, flavors."""
    from kvlab.viz import plots
    types = set(table.type_k) & set(table.type_v)
    pairs = [p for p in GROWTH_PAIRS if set(p) <= types] or [(sorted(types)[0], sorted(types)[0])]
    rotation = True in set(table.rotation)
    items = []
    if table.rotation.nunique() == 2:
        items += [f"<p>Heatmaps: {plots.ORIENTATION}. Colours are log10 of the error, fitted to the pairs with a "
                  "quantized side; the f32/f16/bf16-only pairs, orders of magnitude lower, are grey cells with their "
                  "values written in. Hover a cell for the value and its log10.</p>",
                  ("Output relative error per K/V pair: rotation off / on / on ÷ off",
                   plots.rotation_heatmaps(table, "out_rel_l2"))]
        ks, vs, kl = plots.sweep._grid(select(table, flavor="ref", rotation=True), "kl", n_ctx=int(table.n_ctx.max()))
        if plots.varies_with_v(kl):
            items.append(("Softmax KL per K/V pair: rotation off / on / on ÷ off", plots.rotation_heatmaps(table, "kl")))
        else:
            items += ["<p>The softmax KL is the same for every V type (V does not enter the logits; checked on this "
                      "table), so it is drawn per K type:</p>",
                      ("Softmax KL per K type, rotation off / on", plots.k_type_figure(table, "kl"))]
    items += [("Error vs context length: softmax KL", plots.context_growth(table, pairs, "kl")),
              ("Error vs context length: output relative error", plots.context_growth(table, pairs, "out_rel_l2"))]
    if depth_table is not None and len(depth_table):
        depth_pairs = list(dict.fromkeys(zip(depth_table.type_k, depth_table.type_v)))
        items.append(("Error vs depth: how the error compounds through layers",
                      plots.depth_growth(depth_table, depth_pairs)))
    items.append(("Error vs bits per value (Pareto frontier labelled; hover for the other pairs)", pareto_fig))
    if {"cpu", "cuda"} & set(table.flavor):
        items.append(("Where the flavors (ref / cpu / cuda) disagree",
                      plots.flavor_disagreement(table, "out_rel_l2", rotation=rotation)))
    return items


def build_report(table, out_path, depth_table=None) -> Path:
    from kvlab.viz import plots
    from kvlab.viz.report_tp import tp_section
    pareto_fig, pareto = plots.bits_vs_error(table, "out_rel_l2", n_ctx=int(table.n_ctx.max()),
                                             rotation=True in set(table.rotation))
    findings = summary(table, pareto)
    if depth_table is not None and len(depth_table):
        findings += depth_summary(depth_table)
    sections = [
        ("Summary: accuracy", ["\n".join(f"<p>{line}</p>" for line in findings if line)]),
        ("Tensor parallelism: why --split-mode tensor broke with a quantized cache, and what runs now",
         tp_section(plots)),
        ("Accuracy per K/V pair", accuracy_items(table, depth_table, pareto_fig)),
        ("Context: published measurements", [FIELD_CONTEXT]),
        ("Settings and versions", [settings_table(table.attrs)]),
    ]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(out_path, render_html(table, sections, table.attrs.get("elapsed_s", 0.0)))
    return out_path
