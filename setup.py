"""Build hook: compile the package's BPF programs (src/bpfring/bpf/*.bpf.c) into the wheel."""

import importlib.util
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_bpfring_build", os.path.join(_HERE, "src", "bpfring", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py_with_bpf(build_py):
    def run(self):
        super().run()
        build = _load_build_module()
        # CO-RE objects from bpf/kernel_types.h: the same whatever kernel this machine runs
        built = build.build_dir(os.path.join(_HERE, "src", "bpfring", "bpf"), os.path.join(self.build_lib, "bpfring", "bpf"))
        for path in built:
            self.announce(f"compiled BPF object {path}", level=2)


class build_ext_required(build_ext):
    """The record walks are C (bpfring._fastring): say what is missing when they cannot be built."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            raise SystemExit(
                f"bpfring: cannot compile its C extension (src/bpfring/_fastring.c): {exc}\n"
                "bpfring needs a C compiler and Python's headers to build: on Debian/Ubuntu, "
                "apt-get install gcc python3-dev (scripts/setup installs them)"
            ) from exc


# Every read and write of shared ring memory is in C: the extension is required.
fastring = Extension("bpfring._fastring", ["src/bpfring/_fastring.c"], extra_compile_args=["-O2"])

setup(cmdclass={"build_py": build_py_with_bpf, "build_ext": build_ext_required}, ext_modules=[fastring])
