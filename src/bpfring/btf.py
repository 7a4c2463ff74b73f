"""C types from a BPF object's BTF, as numpy dtypes: a consumer never restates a C struct.

``Object.struct("event")`` reads ``struct event`` from the object's BTF (which clang writes
with ``-g``) and builds a structured dtype with the same offsets, padding and size. Layout
facts come from include/uapi/linux/btf.h.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ._sys.libbpf import lib

# include/uapi/linux/btf.h: BTF_KIND_*
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_VAR, KIND_DATASEC, KIND_FLOAT, KIND_TYPE_TAG, KIND_ENUM64 = 14, 15, 16, 18, 19
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)
_KIND_NAMES = {KIND_STRUCT: "struct", KIND_UNION: "union", KIND_ENUM: "enum", KIND_TYPEDEF: "typedef"}

# BTF_INT_ENCODING bits of an INT's extra word
BTF_INT_SIGNED, BTF_INT_CHAR, BTF_INT_BOOL = 1, 2, 4


class _Type(ctypes.Structure):
    """struct btf_type: name_off; info (vlen: bits 0-15, kind: 24-28, kind_flag: 31); size or type."""

    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _Member(ctypes.Structure):
    """struct btf_member: name_off; type; offset (in bits; with kind_flag, bitfield size in the top 8)."""

    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _Array(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("index_type", ctypes.c_uint32), ("nelems", ctypes.c_uint32)]


class _VarSecinfo(ctypes.Structure):
    """struct btf_var_secinfo: one variable of a DATASEC (its VAR type id, offset and size)."""

    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class BTFTypes:
    """Read access to one ``struct btf`` owned by libbpf (valid while its object is open)."""

    def __init__(self, btf: int, owner: str) -> None:
        self._btf = btf
        self._owner = owner

    def find(self, name: str, kind: int) -> int:
        type_id = lib.btf__find_by_name_kind(self._btf, name.encode(), kind)
        if type_id < 0:
            raise KeyError(f"{self._owner} declares no {_KIND_NAMES.get(kind, 'type')} {name!r} in its BTF")
        return type_id

    def _type(self, type_id: int) -> tuple[_Type, int]:
        ptr = lib.btf__type_by_id(self._btf, type_id)
        if not ptr:
            raise ValueError(f"{self._owner}: BTF type id {type_id} does not exist")
        return _Type.from_address(ptr), ptr

    def _name(self, offset: int) -> str:
        return (lib.btf__name_by_offset(self._btf, offset) or b"").decode()

    def kind_and_name(self, type_id: int) -> tuple[int, str]:
        t, _ = self._type(type_id)
        return (t.info >> 24) & 0x1F, self._name(t.name_off)

    def variables(self, datasec_id: int) -> list[tuple[str, int, int, int]]:
        """The variables of a DATASEC (a global-data section): (name, type id, offset, size) each.

        libbpf fills in the offsets and sizes (clang leaves them zero) when it opens the object.
        """
        t, ptr = self._type(datasec_id)
        if (t.info >> 24) & 0x1F != KIND_DATASEC:
            raise ValueError(f"{self._owner}: BTF type id {datasec_id} is not a DATASEC")
        out = []
        for i in range(t.info & 0xFFFF):
            info = _VarSecinfo.from_address(ptr + ctypes.sizeof(_Type) + i * ctypes.sizeof(_VarSecinfo))
            var, _ = self._type(info.type)
            if (var.info >> 24) & 0x1F != KIND_VAR:  # a DATASEC may also hold FUNCs (extern ksyms)
                continue
            out.append((self._name(var.name_off), var.size_or_type, info.offset, info.size))
        return out

    def dtype(self, type_id: int, where: str) -> Any:
        """The numpy dtype of BTF type ``type_id``; ``where`` names it in errors."""
        import numpy as np

        t, ptr = self._type(type_id)
        kind = (t.info >> 24) & 0x1F
        if kind in _MODIFIERS:
            return self.dtype(t.size_or_type, where)
        if kind == KIND_INT:
            encoding = (ctypes.c_uint32.from_address(ptr + ctypes.sizeof(_Type)).value >> 24) & 0xF
            if encoding & BTF_INT_BOOL:
                return np.dtype(np.bool_)
            signed = encoding & BTF_INT_SIGNED
            return np.dtype(f"{'i' if signed else 'u'}{t.size_or_type}")
        if kind in (KIND_ENUM, KIND_ENUM64):
            return np.dtype(f"{'i' if self._enum_signed(t, ptr, kind) else 'u'}{t.size_or_type}")
        if kind == KIND_FLOAT:
            return np.dtype(f"f{t.size_or_type}")
        if kind == KIND_PTR:
            return np.dtype(np.uintp)
        if kind == KIND_ARRAY:
            arr = _Array.from_address(ptr + ctypes.sizeof(_Type))
            if self._is_char(arr.type):
                return np.dtype(f"S{arr.nelems}")  # char name[N]: bytes, as C code reads it
            item = self.dtype(arr.type, where)
            return np.dtype((item.base, (arr.nelems,) + item.shape))  # int m[2][3]: shape (2, 3)
        if kind in (KIND_STRUCT, KIND_UNION):
            return self._record(t, ptr, where)
        raise TypeError(f"{where}: BTF kind {kind} has no numpy equivalent")

    @staticmethod
    def _enum_signed(t: _Type, ptr: int, kind: int) -> bool:
        # kind_flag marks a signed enum in newer BTF; compilers that predate it (clang 14) leave it
        # clear, so a negative enumerator decides. struct btf_enum {name_off; s32 val}, btf_enum64
        # {name_off; u32 lo32; u32 hi32}.
        if t.info >> 31:
            return True
        step = 8 if kind == KIND_ENUM else 12
        first = ptr + ctypes.sizeof(_Type)
        for i in range(t.info & 0xFFFF):
            word = ctypes.c_uint32.from_address(first + i * step + step - 4).value
            if word >> 31:
                return True
        return False

    def _is_char(self, type_id: int) -> bool:
        t, ptr = self._type(type_id)
        kind = (t.info >> 24) & 0x1F
        if kind in _MODIFIERS:
            return self._is_char(t.size_or_type)
        if kind != KIND_INT or t.size_or_type != 1:
            return False
        encoding = (ctypes.c_uint32.from_address(ptr + ctypes.sizeof(_Type)).value >> 24) & 0xF
        return bool(encoding & BTF_INT_CHAR) or self._name(t.name_off) == "char"

    def _record(self, t: _Type, ptr: int, where: str) -> Any:
        import numpy as np

        names: list[str] = []
        formats: list[Any] = []
        offsets: list[int] = []
        kind_flag = t.info >> 31
        for i in range((t.info & 0xFFFF)):
            m = _Member.from_address(ptr + ctypes.sizeof(_Type) + i * ctypes.sizeof(_Member))
            name = self._name(m.name_off)
            bit_offset = m.offset & 0xFFFFFF if kind_flag else m.offset
            bitfield = (m.offset >> 24) if kind_flag else 0
            here = f"{where}.{name or '<anonymous>'}"
            if bitfield or bit_offset % 8:
                raise TypeError(f"{here} is a bitfield: numpy dtypes have no bitfields")
            sub = self.dtype(m.type, here)
            if not name and sub.names:  # an anonymous struct/union: its fields belong to the parent
                for field in sub.names:
                    fdt, foff = sub.fields[field][:2]
                    names.append(field)
                    formats.append(fdt)
                    offsets.append(bit_offset // 8 + foff)
                continue
            names.append(name)
            formats.append(sub)
            offsets.append(bit_offset // 8)
        return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": t.size_or_type})
