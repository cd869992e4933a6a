"""The installed extension: what it was built with, and the pure-Python fallback when it is missing."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedrect


def test_extension_is_built():
    info = fusedrect.build_info()
    assert info["compiled"]
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")


def cuda_toolkit():
    home = os.environ.get("CUDA_HOME")
    return home if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) else None


@pytest.mark.skipif(
    torch.version.cuda is None or cuda_toolkit() is None or os.environ.get("FUSEDRECT_FORCE_CPU") == "1",
    reason="a CPU-only torch or no CUDA toolkit: the extension is built without its CUDA part",
)
def test_cuda_part_is_compiled_with_a_cuda_torch():
    version = fusedrect.build_info()["cuda_runtime_version"]
    assert version // 1000 == int(torch.version.cuda.split(".")[0])


def test_missing_extension_falls_back_to_reference_with_one_warning():
    script = textwrap.dedent(
        """
        import sys, warnings
        import torch
        sys.modules["fusedrect._C"] = None  # as if only the Python files were installed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fusedrect
            layer = fusedrect.FusedBNPReLU(3)
            x = torch.randn(4, 3, 5, 5)
            y = layer(x)
            layer(x)
        expected = torch.nn.functional.prelu(torch.nn.functional.batch_norm(x, None, None, training=True),
                                             torch.full((3,), 0.25))
        torch.testing.assert_close(y, expected)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "reference backend" in messages[0], messages
        assert fusedrect.build_info()["compiled"] is False
        try:
            fusedrect.bn_relu(x, None, None, training=True, backend="cpp")
        except RuntimeError as error:
            assert "fusedrect._C is not built" in str(error)
        else:
            raise AssertionError("backend='cpp' ran without the extension")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
