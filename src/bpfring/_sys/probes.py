"""Tiny BPF programs assembled by hand, for what must work without libbpf.

``bpfring doctor`` loads them to ask the kernel what it offers, and the tests use them to put
records in a ring where no libbpf is there to load an object. Opcodes are those of
include/uapi/linux/bpf.h and bpf_common.h.
"""

from __future__ import annotations

import struct

from . import bpf as sys_bpf

BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_TRACING = 26  # fentry/fexit
BPF_TRACE_FENTRY = 24  # enum bpf_attach_type
BPF_PSEUDO_MAP_FD = 1  # src_reg of a ld_imm64 whose imm is a map fd
BPF_FUNC_RINGBUF_OUTPUT = 130  # long bpf_ringbuf_output(void *ringbuf, void *data, u64 size, u64 flags)
BPF_FUNC_PERF_EVENT_OUTPUT = 25  # long bpf_perf_event_output(void *ctx, map, u64 flags, void *data, u64 size)
BPF_F_CURRENT_CPU = 0xFFFFFFFF  # the array slot of the CPU the program runs on

# struct bpf_insn: code, dst_reg:4 | src_reg:4, off, imm
_INSN = struct.Struct("<BBhi")
_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM, two instructions
_STX_DW = 0x7B  # BPF_STX | BPF_MEM | BPF_DW
_MOV64_X = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X
_MOV64_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
_ADD64_K = 0x07  # BPF_ALU64 | BPF_ADD | BPF_K
_CALL = 0x85  # BPF_JMP | BPF_CALL
_EXIT = 0x95  # BPF_JMP | BPF_EXIT
R0, R1, R2, R3, R4, R5, R6, R10 = 0, 1, 2, 3, 4, 5, 6, 10

# A socket filter runs under BPF_PROG_TEST_RUN on a packet of at least an Ethernet header.
TEST_PACKET = bytes(14)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, src << 4 | dst, off, imm)


def _ld_imm64(dst: int, value: int, src: int = 0) -> bytes:
    low, high = value & 0xFFFFFFFF, value >> 32
    return _insn(_LD_IMM64, dst, src, imm=low - (1 << 32) * (low >> 31)) + _insn(0, imm=high - (1 << 32) * (high >> 31))


RETURN_0 = _insn(_MOV64_K, R0, imm=0) + _insn(_EXIT)


def ringbuf_output_program(map_fd: int, value: int) -> int:
    """Load a socket filter that writes ``value`` (8 bytes, host order) to ring ``map_fd`` per run.

    Run it with ``prog_test_run(fd, TEST_PACKET)``; the caller closes the returned fd.
    """
    sys_bpf.check_int("value", value, 0, sys_bpf.U64_MAX, "a u64")
    insns = b"".join(
        [
            _ld_imm64(R1, value),
            _insn(_STX_DW, R10, R1, off=-8),  # *(u64 *)(r10 - 8) = value
            _ld_imm64(R1, sys_bpf.check_fd("map fd", map_fd), src=BPF_PSEUDO_MAP_FD),
            _insn(_MOV64_X, R2, R10),
            _insn(_ADD64_K, R2, imm=-8),  # r2 = &value
            _insn(_MOV64_K, R3, imm=8),
            _insn(_MOV64_K, R4, imm=0),
            _insn(_CALL, imm=BPF_FUNC_RINGBUF_OUTPUT),
            RETURN_0,
        ]
    )
    return sys_bpf.prog_load(BPF_PROG_TYPE_SOCKET_FILTER, insns, name="bpfring_probe")


def perf_output_program(map_fd: int, value: int) -> int:
    """Load a socket filter that writes ``value`` (8 bytes) to perf event array ``map_fd``, in the
    slot of the CPU it runs on, per run (``prog_test_run(fd, TEST_PACKET)``)."""
    sys_bpf.check_int("value", value, 0, sys_bpf.U64_MAX, "a u64")
    insns = b"".join(
        [
            _insn(_MOV64_X, R6, R1),  # the packet: the helper's ctx
            _ld_imm64(R1, value),
            _insn(_STX_DW, R10, R1, off=-8),
            _insn(_MOV64_X, R1, R6),
            _ld_imm64(R2, sys_bpf.check_fd("map fd", map_fd), src=BPF_PSEUDO_MAP_FD),
            _ld_imm64(R3, BPF_F_CURRENT_CPU),
            _insn(_MOV64_X, R4, R10),
            _insn(_ADD64_K, R4, imm=-8),
            _insn(_MOV64_K, R5, imm=8),
            _insn(_CALL, imm=BPF_FUNC_PERF_EVENT_OUTPUT),
            RETURN_0,
        ]
    )
    return sys_bpf.prog_load(BPF_PROG_TYPE_SOCKET_FILTER, insns, name="bpfring_probe")


def fentry_program(btf_id: int) -> int:
    """Load an fentry program that does nothing, for the kernel function of vmlinux BTF id ``btf_id``."""
    return sys_bpf.prog_load(
        BPF_PROG_TYPE_TRACING, RETURN_0, name="bpfring_probe", expected_attach_type=BPF_TRACE_FENTRY, attach_btf_id=btf_id
    )
