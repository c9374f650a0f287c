"""The GPU path of the Triton kernels compiles (for sm_90), checked here where no GPU exists.

The other kernel tests run Triton's interpreter, which never invokes the GPU compiler; this runs
`kernels.gspn.compile_check` in a child process with the interpreter off.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_hopper():
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton wheel ships no NVIDIA tools (cuobjdump)")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run(
        [sys.executable, "-m", "kernels.gspn.compile_check"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from kernels.gspn.compile_check import VARIANTS

    lines = [line for line in out.stdout.splitlines() if line.split() and line.split()[0] in {v[0] for v in VARIANTS}]
    assert len(lines) == len(VARIANTS), out.stdout
    for line in lines:
        assert int(line.split()[1]) > 0, f"no register count for {line}"
