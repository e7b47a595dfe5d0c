"""Progress bars whose rate and ETA are not skewed by the first item's JIT compile.

The first item of a sweep or a layer-growth run pays Numba's compile (seconds to minutes), so a
bar that starts its clock at zero shows an ETA of hours on its first tick. These bars restart the
clock when the first item is done and count rate and ETA from there; units are whole words
("12.3cell/s", "2.71s/stack"), never scaled ("1.42K-type/s" read as thousands).
"""


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar (tqdm.auto: a widget in Jupyter) whose clock starts after the first update."""
    from tqdm.auto import tqdm

    class WarmBar(tqdm):
        def update(self, n=1):
            if self.n or self.disable:
                return super().update(n)
            self.reset(self.total)                 # the clock starts now, with the first item counted as done
            self.n = self.initial = self.last_print_n = n
            self.refresh()
            return True

    return WarmBar(total=total, desc=desc, unit=unit, disable=not enabled)
