"""`kvlab sweep`: the error of every K/V type pair x rotation x flavor x context length, as a table."""
import time

from kvlab.accuracy.depth import layer_growth
from kvlab.accuracy.sweep import SweepConfig, run_sweep
from kvlab.accuracy.sweep import __doc__ as sweep_doc
from kvlab.accuracy.table import layers_path, save_table
from kvlab.cli.options import (add_command, add_depth_options, add_sweep_options, check_device, stack_from_args,
                               sweep_inputs, writable_file)

TABLE_SUFFIXES = (".parquet", ".csv")


def _run(args) -> int:
    writable_file(args.out, "--out", TABLE_SUFFIXES)
    stack = stack_from_args(args)
    check_device(args.device)
    cfg, sample = sweep_inputs(args)
    start = time.perf_counter()
    table = run_sweep(sample, cfg, cache_dir=args.cache_dir, progress=not args.no_progress, device=args.device)
    print(f"swept {len(table)} cells on {table.attrs['device']} in {time.perf_counter() - start:.1f} s")
    for written in save_table(table, args.out):
        print(f"wrote {written}")
    print(f"{len(table)} rows: {table.type_k.nunique()} K types x {table.type_v.nunique()} V types x "
          f"{table.rotation.nunique()} rotations x {table.flavor.nunique()} flavors x {table.n_ctx.nunique()} lengths")
    if stack:
        start = time.perf_counter()
        depth = layer_growth([(k, v) for k in cfg.types_k for v in cfg.types_v], stack, cfg.rotations, cfg.flavors,
                             device=args.device, progress=not args.no_progress, cache_dir=args.cache_dir)
        print(f"layer growth: {len(depth)} rows ({stack.n_layers} layers) in {time.perf_counter() - start:.1f} s")
        for written in save_table(depth, layers_path(args.out)):
            print(f"wrote {written}")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "sweep", help="error of every K/V type pair x rotation x flavor x context length",
                    description=sweep_doc.split("\n\n")[0])
    add_sweep_options(p, SweepConfig.lengths)
    add_depth_options(p, 0, "off by default here because the sweep's stack runs every K x V pair x flavor "
                            "(486 stacks for all types; kvlab report runs 7 chosen pairs on ref bytes)")
    p.add_argument("--out", default="kvlab-sweep.parquet", metavar="FILE",
                   help="output table, .parquet or .csv (the layer-growth table goes to <name>.layers<suffix>)")
    p.set_defaults(run=_run)
