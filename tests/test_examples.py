"""Each experiment script (examples/) in its --smoke mode: it runs, writes its PNG and JSON, numbers finite."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the experiments need scikit-learn (pip install 'fusedrect[experiments]')")
pytest.importorskip("matplotlib", reason="the experiments need matplotlib (pip install 'fusedrect[experiments]')")

EXAMPLES = Path(__file__).parent.parent / "examples"
SCRIPTS = ["prelu_cost", "he_init_depth", "learned_slopes", "preact_gradient_flow"]


def numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_writes_figure_and_json(script, tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / f"{script}.py"), "--smoke", "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True, timeout=300)
    figure = tmp_path / f"{script}.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / f"{script}.json").read_text())
    assert results["smoke"] is True
    values = list(numbers(results))
    assert values and all(math.isfinite(v) for v in values)
