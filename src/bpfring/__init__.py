"""bpfring: BPF ring buffers for Python, read natively over mmap.

The kernel side is a BPF program calling ``bpf_ringbuf_output()`` or
``bpf_ringbuf_reserve()/submit()/discard()``; the user side is :class:`RingBuffer`, which
maps each ring and walks its records itself, with libbpf's semantics, one callback per record
or in numpy batches. :class:`PerfBuffer` reads ``bpf_perf_event_output()``'s per-CPU perf
rings the same way. :class:`UserRingBuffer` is the reverse channel: Python produces records
that a BPF program drains with ``bpf_user_ringbuf_drain()``. :class:`Object` loads
and attaches BPF programs through libbpf (globals by name, attach by target); :func:`compile`
builds your own ``.bpf.c`` for this kernel; :class:`Map` is any BPF map by fd, pin or id.
"""

from ._sys.bpf import MapType
from ._sys.libbpf import LibbpfUnavailableError
from .build import BuildError, compile
from .errors import BPFError, BPFNotFoundError, BPFPermissionError, RecordSizeError, RingCorruptError, RingFullError
from .features import FeatureError
from .maps import Map
from .objects import Link, Object, Program, bundled_object
from .perfbuf import PerfBuffer, PerfRing
from .ringbuf import BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, Ring, RingBuffer, release_batch_memory
from .userbuf import Sample, UserRingBuffer

__version__ = "0.1.0"

__all__ = [
    "BPFError",
    "BPFNotFoundError",
    "BPFPermissionError",
    "BuildError",
    "BPF_RB_FORCE_WAKEUP",
    "BPF_RB_NO_WAKEUP",
    "FeatureError",
    "LibbpfUnavailableError",
    "Link",
    "Map",
    "MapType",
    "Object",
    "PerfBuffer",
    "PerfRing",
    "Program",
    "RecordSizeError",
    "RingCorruptError",
    "Ring",
    "RingBuffer",
    "RingFullError",
    "Sample",
    "UserRingBuffer",
    "bundled_object",
    "compile",
    "release_batch_memory",
]
