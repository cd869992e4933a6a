"""Runs tests/interpret in its own process with TRITON_INTERPRET=1 (Triton reads it at import)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch)")


def test_triton_kernels_in_the_interpreter():
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(tests / "interpret"), "-q", "-p", "no:cacheprovider"],
        cwd=tests.parent, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    print(result.stdout.strip().splitlines()[-1])
