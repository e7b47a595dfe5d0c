"""The attention heads of one layer: the shape every model kvlab builds shares (llama.cpp's hparams).

Configurations inherit it (kvlab.split BlockConfig, kvlab.tp TPConfig and ModelShape,
kvlab.accuracy SyntheticConfig) so the three fields are declared and checked once; a subclass may
give them other defaults. llama.cpp's n_embd_head_k and n_embd_head_v are both head_dim here.
"""
from dataclasses import dataclass
from numbers import Integral

HEAD_FIELDS = ("head_dim", "n_head", "n_head_kv")


@dataclass(frozen=True)
class HeadShape:
    head_dim: int = 128
    n_head: int = 32       # query heads
    n_head_kv: int = 8     # K/V heads; n_head / n_head_kv query heads share one (GQA)

    def __post_init__(self):
        for name in HEAD_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv}) (GQA)")

    @property
    def n_gqa(self) -> int:
        """Query heads per K/V head."""
        return self.n_head // self.n_head_kv

    def head_fields(self) -> dict:
        """head_dim, n_head and n_head_kv as keywords, to build another configuration of the same heads."""
        return {name: getattr(self, name) for name in HEAD_FIELDS}
