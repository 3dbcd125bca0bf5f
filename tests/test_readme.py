"""The README's runnable snippets run and say what the README claims."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippet(name: str) -> str:
    text = README.read_text()
    match = re.search(
        rf"<!-- readme-snippet:{name} -->\s*```python\n(.*?)```\s*<!-- /readme-snippet -->", text, re.S
    )
    assert match, f"snippet {name!r} not found in README.md"
    return match.group(1)


def test_readme_gaussian_snippet_reproduces_data_moments():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_snippet("gaussian"), "README.md:gaussian", "exec"), {})
    mean, std = (float(v) for v in out.getvalue().split())
    # 4096 x 4 samples: the standard error of the mean is 0.2 / sqrt(16384) = 0.0016 and of the
    # std about 0.2 / sqrt(2 * 16384) = 0.0011; DPM-Solver++ 2M on Karras sigmas with 25 steps
    # adds a discretisation error of a few percent of the std (see test_samplers_gaussian).
    assert abs(mean - 0.5) < 0.01
    assert abs(std - 0.2) < 0.02


def test_readme_flow_snippet_reproduces_mixture_weight_and_std():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_snippet("flow"), "README.md:flow", "exec"), {})
    weight, std = (float(v) for v in out.getvalue().split())
    # The exact velocity of the mixture 0.3 N(-1, 0.2^2) + 0.7 N(1.5, 0.3^2): the share above 0.25
    # is the heavier component's weight (standard error sqrt(0.21 / 4096) = 0.007) and its std 0.3;
    # 20 Heun steps add a discretisation error of a few percent (test_flow_samplers).
    assert abs(weight - 0.7) < 0.03
    assert abs(std - 0.3) < 0.03
