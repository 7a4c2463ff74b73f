"""The commands of ``bpfring``, one module each; :mod:`bpfring.cli` puts them together."""
