"""``bpfring maps``: the ring-type maps on the system, like a small ``bpftool map`` for rings."""

from __future__ import annotations

import argparse
import json
import mmap
import sys
from typing import Iterator

from .._sys.bpf import MapType, map_get_next_id
from ..errors import BPFNotFoundError
from ..maps import PAGE_SIZE, Map, map_shared
from .common import EXIT_OK, paragraphs, require_admin

RING_TYPES = {
    MapType.RINGBUF: "ringbuf",
    MapType.USER_RINGBUF: "user_ringbuf",
    MapType.PERF_EVENT_ARRAY: "perf_event_array",
}


def ring_maps() -> Iterator[Map]:
    """Every ring-type map, by ascending id; the caller closes each."""
    map_id = 0
    while (next_id := map_get_next_id(map_id)) is not None:
        map_id = next_id
        try:
            m = Map.from_id(map_id)
        except BPFNotFoundError:  # freed between the two calls
            continue
        if m.type in RING_TYPES:
            yield m
        else:
            m.close()


def ring_positions(m: Map) -> tuple[int, int] | None:
    """(consumer_pos, producer_pos) of a ringbuf or user ringbuf, None if it cannot be mapped.

    kernel/bpf/ringbuf.c lays out the consumer page (consumer_pos at offset 0) and then the
    producer page (producer_pos at offset 0); both may be mapped read-only, which is all we need
    to look without disturbing anyone. A snapshot: consumer_pos is read first, so a healthy ring
    never shows it past producer_pos.
    """
    try:
        mm = map_shared(m.fd, 2 * PAGE_SIZE, mmap.PROT_READ)
    except OSError:
        return None
    with mm:
        view = memoryview(mm).cast("Q")
        try:
            consumer_pos = view[0]
            producer_pos = view[PAGE_SIZE // 8]
        finally:
            view.release()
    return consumer_pos, producer_pos


def fill_level(m: Map) -> tuple[int | None, str | None]:
    """(pending bytes, None), or (None, what is impossible about the positions): a consumer_pos
    another process wrote can be unaligned, past producer_pos, or more than a ring behind it."""
    positions = ring_positions(m)
    if positions is None:
        return None, None
    cons, prod = positions
    if cons & 7:
        return None, f"consumer_pos {cons} is not 8-byte aligned"
    if cons > prod:
        return None, f"consumer_pos {cons} is past producer_pos {prod}"
    if prod - cons > m.max_entries:
        return None, f"producer_pos {prod} is {prod - cons} bytes ahead of consumer_pos {cons}, more than the ring"
    return prod - cons, None


def describe(m: Map) -> dict[str, object]:
    """What the listing shows of one map; sizes of rings in bytes, of perf arrays in CPU slots."""
    is_ring = m.type != MapType.PERF_EVENT_ARRAY
    pending, corrupt = fill_level(m) if is_ring else (None, None)
    return {
        "id": m.id,
        "name": m.name,
        "type": RING_TYPES[MapType(m.type)],
        "size": m.max_entries,
        "unit": "bytes" if is_ring else "cpus",
        "pending": pending,
        "corrupt": corrupt,
    }


def run(args: argparse.Namespace) -> int:
    """List the system's ring buffers, user ring buffers and perf event arrays."""
    require_admin("bpfring maps", "to list the system's BPF maps")
    out = sys.stdout
    if not args.json:
        out.write(f"{'ID':<7} {'TYPE':<17} {'NAME':<16} {'SIZE':>10} {'PENDING':>10}\n")
    for m in ring_maps():
        with m:
            row = describe(m)
        if args.json:
            out.write(json.dumps(row) + "\n")
        else:
            size = row["size"] if row["unit"] == "bytes" else f"{row['size']} cpus"
            pending = "corrupt" if row["corrupt"] else "-" if row["pending"] is None else row["pending"]
            out.write(f"{row['id']:<7} {row['type']:<17} {row['name'] or '-':<16} {size:>10} {pending:>10}\n")
    out.flush()
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "maps",
        parents=parents,
        help="list the ring buffers, user ring buffers and perf event arrays on the system",
        description=paragraphs(
            "List the ring-type BPF maps on the system: ID, TYPE, NAME, SIZE (bytes for rings, CPU "
            "slots for perf event arrays) and, for rings, PENDING: the bytes produced and not yet "
            "consumed (producer_pos - consumer_pos), read from a read-only mapping of the ring, so "
            "looking disturbs no one. A ring whose positions cannot be right (another process wrote "
            "its consumer_pos) shows PENDING as corrupt; --json says why in \"corrupt\".",
            "Needs root: map ids are system-wide.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  bpfring maps          # a table\n"
        "  bpfring maps --json   # one JSON object per map: id, name, type, size, unit, pending, corrupt\n",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per map")
    p.set_defaults(func=run)
