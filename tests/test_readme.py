"""The README's library example runs as written (two steps instead of a hundred)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs():
    text = README.read_text()
    code = re.search(r"## The library\n.*?```python\n(.*?)```", text, re.S).group(1)
    assert "StepSampler(len(train), 8, 100, seed=0)" in code
    namespace = {}
    exec(code.replace("StepSampler(len(train), 8, 100, seed=0)",
                      "StepSampler(len(train), 8, 2, seed=0)"), namespace)
    out = namespace["out"]
    assert set(out) == {"loss", "task", "kd", "nfd"}
    assert out["loss"].item() > out["task"].item() > 0
