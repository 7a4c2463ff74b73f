"""The README's quick start runs as written (with its endless loop cut short)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_quick_start_traces_an_exec(bpf, tmp_path):
    code = re.search(r"## Quick start.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "while True:" in code
    script = tmp_path / "quickstart.py"
    script.write_text(code.replace("while True:", "for _ in range(30):"))
    # -u: a pipe is block-buffered, so the header would come only at exit, after the polls
    # (PYTHONUNBUFFERED in some environments hid that; the kernel matrix's guests have none)
    proc = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, text=True)
    header = proc.stdout.readline()
    assert header.split() == ["TIME", "EVENT", "PID", "COMM", "FILENAME"]
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert any(line.split()[1:3] == ["EXEC", str(child.pid)] and line.endswith("/bin/true") for line in out.splitlines())
