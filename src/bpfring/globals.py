"""Global variables of a BPF object by name and type: the role of libbpf's generated skeleton.

A BPF program's globals live in one array map per section (``.rodata``, ``.data``, ``.bss``,
and named ones such as ``.rodata.config`` or ``.data.custom``); the object's BTF describes each
section as a DATASEC: every variable's name, type, offset and size. :class:`GlobalData` reads
and writes them by name, typed from that BTF:

* before ``load()``, in libbpf's initial value of the map (what ``skel->rodata->x = 1`` writes);
* after ``load()``, live in the kernel's map, through a shared mapping of it: libbpf creates these
  maps with ``BPF_F_MMAPABLE``, whose one value starts at offset 0 of the mapping
  (kernel/bpf/arraymap.c, ``array_map_mmap``). A counter the program increments in ``.bss`` is
  read as it is now, not as a copy taken at load. ``.rodata`` is frozen at load: read-only.

Values: integers, enums and pointers as ``int``, ``_Bool`` as ``bool``, floating point as
``float``, ``char[N]`` as ``bytes``, arrays as read-only numpy arrays and structs as numpy
scalars (``numpy.void``). Arrays and structs are snapshots: assign a whole new value (a struct
also takes a dict of the fields to change) to write one.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

from ._sys.libbpf import lib
from .maps import PAGE_SIZE, Map

if TYPE_CHECKING:
    from .objects import Object

BPF_F_MMAPABLE = 1 << 10  # include/uapi/linux/bpf.h: the array map may be mmap()ed

# The instance attributes of GlobalData, never variables when read as attributes.
_INTERNAL = ("_obj", "_section", "_map_ptr", "_vars", "_size")

# Sections libbpf fills in itself (extern CONFIG_* values): not the user's to set.
_LIBBPF_OWNED = (".kconfig",)


class Variable(NamedTuple):
    """One global of a section: its place in the section's value and its numpy dtype."""

    name: str
    offset: int
    size: int
    dtype: Any  # a numpy dtype; the TypeError saying why not, for types numpy can't hold


class Section(NamedTuple):
    """A global-data section as the object's BTF describes it: its map and its variables."""

    name: str
    map_ptr: int
    variables: dict[str, Variable]
    size: int


class _Live:
    """The loaded map's value: through a shared mapping, or by lookup/update where it can't be mapped."""

    def __init__(self, m: Map, size: int, writable: bool) -> None:
        self._map = m
        self._size = size
        self._mm: mmap.mmap | None = None
        if m.map_flags & BPF_F_MMAPABLE:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            length = -(-size // PAGE_SIZE) * PAGE_SIZE
            self._mm = m.mmap(length, prot, 0, "global data")

    def read(self, offset: int, size: int) -> bytes:
        if self._mm is not None:
            return self._mm[offset : offset + size]
        return self._map.lookup(b"\0" * 4)[offset : offset + size]

    def write(self, offset: int, data: bytes) -> None:
        if self._mm is not None:
            self._mm[offset : offset + len(data)] = data
            return
        # Not mappable (a kernel before 5.5): read, modify and write back the one value. A
        # program writing the section meanwhile may lose its update; the mapping has no such race.
        value = bytearray(self._map.lookup(b"\0" * 4))
        value[offset : offset + len(data)] = data
        self._map.update(b"\0" * 4, bytes(value))

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class GlobalData:
    """The variables of one global-data section of an :class:`~bpfring.Object`, as attributes.

    ``obj.rodata.targ_pid = 1234`` (before load), ``obj.bss.events_seen`` (live after load),
    ``obj.global_data(".data.custom")["name"]``; ``dir()`` lists the variables.
    """

    def __init__(self, obj: Object, section: Section) -> None:
        # The object keeps the sections and their live mappings; this view keeps only the object,
        # so nothing here makes a reference cycle that would delay the object's finalizer.
        s = self.__dict__
        s["_obj"] = obj
        s["_section"] = section.name
        s["_map_ptr"] = section.map_ptr
        s["_vars"] = section.variables
        s["_size"] = section.size

    @property
    def section(self) -> str:
        return self._section

    @property
    def variables(self) -> dict[str, Variable]:
        return dict(self._vars)

    @property
    def read_only(self) -> bool:
        """``.rodata`` sections: settable before load only (the kernel freezes them at load)."""
        return self._frozen_at_load()

    def _frozen_at_load(self) -> bool:
        return self._section.startswith(".rodata")

    # -- storage ------------------------------------------------------------------------------

    def _storage(self) -> tuple[int | None, _Live | None]:
        """libbpf's initial value (its address) before load; the live map after."""
        obj = self._obj
        obj._check_open()
        if not obj.loaded:
            size = ctypes.c_size_t()
            addr = lib.bpf_map__initial_value(self._map_ptr, ctypes.byref(size))
            if not addr or size.value < self._size:
                raise ValueError(f"{self._section} of object {obj.name!r} has no initial value to set")
            return addr, None
        live = obj._global_maps.get(self._section)
        if live is None:
            m = obj.map(lib.bpf_map__name(self._map_ptr).decode(errors="surrogateescape"))
            live = obj._global_maps[self._section] = _Live(m, self._size, writable=not self._frozen_at_load())
        return None, live

    def _read(self, var: Variable) -> bytes:
        # holding the object's lock: close() in another thread frees the initial value, closes the mapping
        return self._obj._exclusively(self._read_now, var)

    def _read_now(self, var: Variable) -> bytes:
        addr, live = self._storage()
        if live is not None:
            return live.read(var.offset, var.size)
        return ctypes.string_at(addr + var.offset, var.size)

    def _write(self, var: Variable, data: bytes) -> None:
        self._obj._exclusively(self._write_now, var, data)

    def _write_now(self, var: Variable, data: bytes) -> None:
        if self._obj.loaded and self._frozen_at_load():
            self._obj._check_open()
            raise ValueError(
                f"cannot set {self._section} variable {var.name!r}: object {self._obj.name!r} is loaded and the "
                f"kernel froze {self._section} at load (set it before load())"
            )
        addr, live = self._storage()
        if live is not None:
            live.write(var.offset, data)
        else:
            ctypes.memmove(addr + var.offset, data, len(data))

    # -- by name --------------------------------------------------------------------------------

    def _var(self, name: str) -> Variable:
        try:
            var = self._vars[name]
        except KeyError:
            known = ", ".join(sorted(self._vars)) or "none"
            raise AttributeError(
                f"{self._section} of object {self._obj.name!r} has no variable {name!r} (it has: {known})"
            ) from None
        if isinstance(var.dtype, TypeError):
            raise TypeError(f"{var.dtype} (read it as bytes from obj.map({self._section!r}))")
        return var

    def __getattribute__(self, name: str) -> Any:
        # A variable wins over the few public names of this class (a C global called `section`
        # reads as itself); names starting with "_" are this class's own (obj.bss["_x"] reaches
        # a variable `_x`).
        if name[:1] != "_" and name in object.__getattribute__(self, "__dict__").get("_vars", ()):
            return self._get(name)
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in _INTERNAL:
            raise AttributeError(name)
        return self._get(name)

    def _get(self, name: str) -> Any:
        var = self._var(name)
        return to_python(self._read(var), var.dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        var = self._var(name)
        current = self._read(var) if var.dtype.names and isinstance(value, dict) else None
        self._write(var, to_bytes(value, var.dtype, f"{self._section} variable {name!r}", current))

    def __getitem__(self, name: str) -> Any:
        try:
            return self._get(name)
        except AttributeError as exc:
            raise KeyError(str(exc)) from None

    def __setitem__(self, name: str, value: Any) -> None:
        self.__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(self._vars)

    def __iter__(self) -> Iterator[str]:
        return iter(self._vars)

    def __contains__(self, name: object) -> bool:
        return name in self._vars

    def __repr__(self) -> str:
        where = "live" if self._obj.loaded else "initial values"
        return f"<GlobalData {self._section} of {self._obj.name!r} ({where}): {', '.join(self._vars)}>"


# -- conversions ---------------------------------------------------------------------------------


def to_python(raw: bytes, dtype: Any) -> Any:
    """The Python value of ``raw`` read as ``dtype`` (see the module's docstring)."""
    import numpy as np

    if dtype.shape:  # an array: read-only, a snapshot
        return np.frombuffer(raw, dtype=dtype.base).reshape(dtype.shape)
    value = np.frombuffer(raw, dtype=dtype)[0]
    if dtype.names:
        return value
    if dtype.kind == "S":
        return bytes(value)
    return value.item()  # int, bool or float


def _type_name(dtype: Any) -> str:
    if dtype.kind == "S":
        return f"char[{dtype.itemsize}]"
    return str(dtype) if not dtype.names else "a struct"


def to_bytes(value: Any, dtype: Any, where: str, current: bytes | None = None) -> bytes:
    """``value`` as the bytes of one ``dtype``, checked: ValueError/TypeError name ``where``."""
    import numpy as np

    if dtype.names:
        return _struct_bytes(value, dtype, where, current)
    if dtype.shape:
        try:
            arr = np.asarray(value, dtype=dtype.base)
        except (OverflowError, ValueError, TypeError) as exc:
            raise ValueError(f"{where} is an array of {_type_name(dtype.base)}: {exc}") from None
        if arr.shape != dtype.shape:
            raise ValueError(f"{where} is an array of shape {dtype.shape}, got shape {arr.shape}")
        return arr.tobytes()
    kind = dtype.kind
    if kind == "S":
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{where} is {_type_name(dtype)}: expected bytes or str, got {type(value).__name__}")
        data = bytes(value)
        if len(data) > dtype.itemsize:
            raise ValueError(f"{where} is {_type_name(dtype)}: at most {dtype.itemsize} bytes, got {len(data)}")
        return data.ljust(dtype.itemsize, b"\0")
    if kind == "b":
        if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
            raise ValueError(f"{where} is a bool: expected True, False, 0 or 1, got {value!r}")
        return np.bool_(bool(value)).tobytes()
    if kind == "f":
        try:
            return dtype.type(float(value)).tobytes()
        except (TypeError, ValueError):
            raise TypeError(f"{where} is {dtype}: expected a number, got {type(value).__name__}") from None
    if kind in "iu":
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{where} is {dtype}: expected an int, got a bool")
        try:
            number = operator.index(value)
        except TypeError:
            raise TypeError(f"{where} is {dtype}: expected an int, got {type(value).__name__}") from None
        info = np.iinfo(dtype)
        if not info.min <= number <= info.max:
            raise ValueError(f"{where} is {dtype} ({info.min} to {info.max}), got {number}")
        return dtype.type(number).tobytes()
    raise TypeError(f"{where}: no conversion for numpy dtype {dtype}")


def _struct_bytes(value: Any, dtype: Any, where: str, current: bytes | None) -> bytes:
    import numpy as np

    if isinstance(value, dict):
        rec = np.frombuffer(current, dtype=dtype).copy() if current is not None else np.zeros(1, dtype=dtype)
        for field, field_value in value.items():
            if field not in dtype.names:
                raise ValueError(f"{where} has no field {field!r} (it has: {', '.join(dtype.names)})")
            sub = dtype.fields[field][0]
            raw = to_bytes(field_value, sub, f"{where} field {field!r}")  # checked like a variable of its own
            rec[field] = np.frombuffer(raw, dtype=sub.base).reshape(sub.shape) if sub.shape else np.frombuffer(raw, sub)[0]
        return rec.tobytes()
    if isinstance(value, (np.void, np.ndarray)) and value.dtype == dtype and value.size == 1:
        return value.tobytes()
    if not isinstance(value, tuple):
        raise TypeError(
            f"{where} is a struct: expected a dict of fields, a tuple or a numpy value of its dtype, "
            f"got {type(value).__name__}"
        )
    rec = np.zeros((), dtype=dtype)  # padding zeroed, as a C initialiser leaves it
    try:
        rec[()] = value
        return rec.tobytes()
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"{where} is a struct ({', '.join(dtype.names)}): {exc}") from None


def sections(obj_ptr: int, owner: str) -> dict[str, Section]:
    """Every global-data section of a libbpf object by section name (``".bss"``...), from its BTF."""
    from .btf import KIND_DATASEC, BTFTypes

    btf = lib.bpf_object__btf(obj_ptr)
    found: dict[str, Section] = {}
    if not btf:
        return found
    types = BTFTypes(btf, owner)
    ptr = None
    while ptr := lib.bpf_object__next_map(obj_ptr, ptr):
        type_id = lib.bpf_map__btf_value_type_id(ptr)
        if not type_id:
            continue
        kind, name = types.kind_and_name(type_id)
        if kind != KIND_DATASEC or name in _LIBBPF_OWNED:
            continue
        variables = {}
        for var_name, var_type, offset, size in types.variables(type_id):
            try:
                dtype = types.dtype(var_type, f"{name} variable {var_name!r}")
            except TypeError as exc:  # a bitfield struct, say: the variable is there, not typed
                dtype = exc
            variables[var_name] = Variable(var_name, offset, size, dtype)
        found[name] = Section(name, ptr, variables, lib.bpf_map__value_size(ptr))
    return found
