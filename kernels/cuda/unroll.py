"""``unrolled(step, count, n_args)``: a loop written out, so its index is a constant in every step.

Why: a block's 32 values and its packed words live in local arrays that only constant indices touch;
then they are registers (a loop index would put them in local memory), and no loop counter, compare
or branch runs per value. numba has no unroll pragma and NVVM unrolls these loops only partly.
"""
from .ops import device


def unrolled(step, count, n_args, start=0):
    """A device function run(a0 .. a{n_args-1}) that calls step(a0 .., k) for k = start .. count - 1,
    k a literal (none: a function that does nothing, e.g. a kernel's later V batches when one batch
    holds all its steps)."""
    params = ", ".join(f"a{i}" for i in range(n_args))
    body = "".join(f"    step({params}, {k})\n" for k in range(start, count)) or "    pass\n"
    scope = {"step": step}
    exec(f"def run({params}):\n{body}", scope)
    return device(scope["run"])
