"""What the atomic-write tests share: a small sample and a writer that dies half way."""
import kvlab
from kvlab.accuracy.sample import as_sample


def small_sample():
    return as_sample(kvlab.synthetic_kv(64, kvlab.SyntheticConfig(n_q=2, n_head=4, n_head_kv=2, head_dim=64)))


def half_written_then_fail(self, path, *args, **kwargs):
    """A writer that dies mid-way (a full disk, a killed run): half a file, then an error."""
    with open(path, "wb") as f:
        f.write(b"PAR1 half a file")
    raise OSError(28, "No space left on device")


def no_temporaries(directory):
    return [p.name for p in directory.iterdir() if ".tmp" in p.name] == []
