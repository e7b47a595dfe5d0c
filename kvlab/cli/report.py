"""`kvlab report`: the main job. Sweep, layer growth, one offline HTML file."""
from dataclasses import replace
import time

from kvlab.accuracy.depth import DEFAULT_PAIRS as GROWTH_PAIRS
from kvlab.accuracy.depth import layer_growth
from kvlab.accuracy.sweep import run_sweep
from kvlab.accuracy.table import layers_path, save_table
from kvlab.cli.options import (add_command, add_depth_options, add_sweep_options, check_device, stack_from_args,
                               sweep_inputs, writable_file)
from kvlab.cli.sweep import TABLE_SUFFIXES
from kvlab.viz.report import REPORT_LAYERS, REPORT_LENGTHS, build_report
from kvlab.viz.report import __doc__ as report_doc

QUICK_LENGTHS, QUICK_N_Q = (64, 256), 2


def _run(args) -> int:
    writable_file(args.out, "--out")
    if args.table:
        writable_file(args.table, "--table", TABLE_SUFFIXES)
    stack = stack_from_args(args)
    check_device(args.device)
    cfg, sample = sweep_inputs(args, **(dict(lengths=QUICK_LENGTHS, n_q=QUICK_N_Q) if args.quick else {}))
    start = time.perf_counter()
    print(f"kvlab report: sweeping {len(cfg.types_k)}x{len(cfg.types_v)} K/V pairs x rotation off/on x "
          f"flavors {','.join(cfg.flavors)} x lengths {','.join(map(str, cfg.lengths))}")
    table = run_sweep(sample, cfg, cache_dir=args.cache_dir, progress=not args.no_progress, device=args.device)
    table.attrs["elapsed_s"] = round(time.perf_counter() - start, 2)
    print(f"swept {len(table)} cells on {table.attrs['device']} in {table.attrs['elapsed_s']:.1f} s")
    depth_table = _layer_growth(args, cfg, stack)
    if args.table:
        written = save_table(table, args.table)
        written += save_table(depth_table, layers_path(args.table)) if depth_table is not None else []
        for w in written:
            print(f"wrote {w}")
    path = build_report(table, args.out, depth_table)
    print(f"wrote {path.resolve()} ({path.stat().st_size / 1e6:.1f} MB, self-contained, opens offline)")
    return 0


def _layer_growth(args, cfg, stack):
    """The depth section's table: the growth pairs through the stack, rotation off/on, ref bytes."""
    types = set(cfg.types_k) & set(cfg.types_v)
    pairs = [p for p in GROWTH_PAIRS if set(p) <= types]
    if stack is None or not pairs:
        return None
    if args.quick:
        stack = replace(stack, n_layers=min(stack.n_layers, 4), n_tokens=min(stack.n_tokens, 64))
    start = time.perf_counter()
    depth_table = layer_growth(pairs, stack, cfg.rotations, device=args.device, progress=not args.no_progress,
                               cache_dir=args.cache_dir)
    print(f"layer growth: {len(pairs)} pairs through {stack.n_layers} layers in {time.perf_counter() - start:.1f} s")
    return depth_table


def register(subparsers) -> None:
    p = add_command(subparsers, "report", help="sweep every K/V pair and write an offline HTML report",
                    description=report_doc.split("\n\n")[0])
    add_sweep_options(p, REPORT_LENGTHS)
    add_depth_options(p, REPORT_LAYERS, f"the report's stack runs {len(GROWTH_PAIRS)} chosen pairs on ref bytes "
                                        "(kvlab sweep --layers runs every pair x flavor)")
    p.add_argument("--out", default="kvlab-report.html", metavar="FILE", help="the HTML file to write")
    p.add_argument("--table", metavar="FILE", help="also save the sweep table (.parquet or .csv) and the layer-growth "
                                                   "table (<name>.layers<suffix>)")
    p.add_argument("--quick", action="store_true",
                   help=f"a tiny run: lengths {','.join(map(str, QUICK_LENGTHS))}, {QUICK_N_Q} queries, at most 4 "
                        "layers of 64 tokens (a smoke test)")
    p.set_defaults(run=_run)
