"""The split state of one tensor, as ggml's meta backend stores it (ggml/include/ggml-backend.h).

    struct ggml_backend_meta_split_state {
        enum ggml_backend_meta_split_axis axis;   // 0..3, MIRRORED, PARTIAL
        int64_t  ne[16*GGML_BACKEND_META_MAX_DEVICES];  // per segment x device: elements along `axis`
        uint32_t nr[16];                          // per segment: how often it repeats (0.3.36 only)
        uint32_t n_segments;
    };

Along the split axis the data is laid out as [seg0_dev0_r0, seg0_dev1_r0, seg0_dev0_r1, seg0_dev1_r1,
seg1_dev0_r0, ...]: each segment repeats `nr` times and every repetition is cut across the devices.
Before PR #23792 (llama-cpp-python 0.3.24) there is no `nr`; kvlab then keeps nr = 1 everywhere, which
is the same thing.
"""
from dataclasses import dataclass
from enum import IntEnum


class Axis(IntEnum):
    """enum ggml_backend_meta_split_axis (the values are ggml's)."""
    AXIS_0 = 0
    AXIS_1 = 1
    AXIS_2 = 2
    AXIS_3 = 3
    MIRRORED = 10   # all values on all devices
    PARTIAL = 11    # each device holds a partial sum

    @property
    def is_dim(self) -> bool:
        return self <= Axis.AXIS_3

    @property
    def label(self) -> str:
        """ggml_backend_meta_split_axis_name: "0".."3", "MIRRORED", "PARTIAL"."""
        return str(int(self)) if self.is_dim else self.name


DIM_AXES = (Axis.AXIS_0, Axis.AXIS_1, Axis.AXIS_2, Axis.AXIS_3)


class SplitError(RuntimeError):
    """Where ggml would GGML_ASSERT/GGML_ABORT: which node, op, input states and rule, and what to do."""

    def __init__(self, message: str, *, node: str = "", op: str = "", rule: str = "", c_function: str = "",
                 inputs: tuple = (), hint: str = ""):
        self.node, self.op, self.rule, self.c_function = node, op, rule, c_function
        self.inputs = tuple(inputs)   # (name, state description) per source
        self.hint = hint
        super().__init__(message)


@dataclass(frozen=True)
class SplitState:
    """axis, ne[segment][device], nr[segment]: ggml_backend_meta_split_state with n_segments = len(ne)."""
    axis: Axis
    ne: tuple    # tuple of per-segment tuples, one count per device (all zero when not split on a dim)
    nr: tuple    # per-segment repeat count

    def __post_init__(self):
        if len(self.ne) != len(self.nr) or not self.ne:
            raise ValueError(f"SplitState: need one nr per segment, got {len(self.ne)} segments, nr={self.nr}")
        if len({len(seg) for seg in self.ne}) != 1:
            raise ValueError(f"SplitState: every segment needs one count per device, got {self.ne}")

    @classmethod
    def split(cls, axis, per_device, nr: int = 1) -> "SplitState":
        return cls(Axis(axis), (tuple(int(n) for n in per_device),), (int(nr),))

    @classmethod
    def mirrored(cls, n_devices: int) -> "SplitState":
        return cls(Axis.MIRRORED, ((0,) * n_devices,), (1,))

    @classmethod
    def partial(cls, n_devices: int) -> "SplitState":
        return cls(Axis.PARTIAL, ((0,) * n_devices,), (1,))

    @property
    def n_devices(self) -> int:
        return len(self.ne[0])

    @property
    def n_segments(self) -> int:
        return len(self.ne)

    def device_ne(self, j: int) -> int:
        """Elements device j holds along the axis, repetitions included."""
        return sum(seg[j] * r for seg, r in zip(self.ne, self.nr))

    @property
    def per_device(self) -> tuple:
        return tuple(self.device_ne(j) for j in range(self.n_devices))

    def describe(self) -> str:
        """One line: 'AXIS_1 {4, 4}', 'AXIS_1 {4, 4} x nr 7 (28, 28 per device)', 'MIRRORED'."""
        if not self.axis.is_dim:
            return self.axis.name
        segs = ", ".join("{" + ", ".join(map(str, seg)) + "}" + (f" x nr {r}" if r != 1 else "")
                         for seg, r in zip(self.ne, self.nr))
        text = f"AXIS_{int(self.axis)} {segs}"
        if self.n_segments > 1 or self.nr[0] != 1:
            text += " (" + ", ".join(map(str, self.per_device)) + " per device)"
        return text

    def ggml_debug(self) -> str:
        """The state as GGML_META_DEBUG prints it: '1, {4x7, 4x7}' (segment 0 only, as ggml does)."""
        counts = ", ".join(f"{n}x{self.nr[0]}" for n in self.ne[0])
        return f"{self.axis.label}, {{{counts}}}"


def split_states_equal(a: SplitState, b: SplitState) -> bool:
    """split_states_equal (ggml-backend-meta.cpp): same axis and, per device, the same element count."""
    return a.axis == b.axis and a.per_device == b.per_device
