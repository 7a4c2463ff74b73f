"""The only place bpfring talks to the kernel directly: bpf(2), libbpf, mounts.

Everything here is a thin wrapper that raises :class:`bpfring.errors.BPFError` with errno and
a description of what was attempted. Nothing outside ``_sys`` issues a system call of its own
(``mmap`` and ``select.epoll`` come from the standard library, which already is such a layer).
"""
