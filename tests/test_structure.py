"""Structure guards: no import cycle among ldm_jax modules, and configs load without JAX.

The cycle check reads the source with ``ast`` (``scripts/import_cycles.py``); the config check
imports every experiment config in a fresh interpreter and asserts ``jax`` was not imported
(configs must stay cheap to load and free of JAX-heavy modules).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_cycle_check_finds_a_planted_cycle_and_none_in_the_tree(tmp_path):
    script = _load_script("import_cycles")
    package = tmp_path / "ldm_jax"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from ldm_jax import b\n")
    (package / "b.py").write_text("def f():\n    from ldm_jax.a import x  # hidden in a function: still a cycle\n")
    (package / "c.py").write_text("import ldm_jax.a\n")
    graph = {m: script.imports(p, m, script.modules(str(tmp_path))) for m, p in script.modules(str(tmp_path)).items()}
    assert script.cycles(graph) == [["ldm_jax.a", "ldm_jax.b"]]
    known = script.modules(ROOT)
    tree = {m: script.imports(p, m, known) for m, p in known.items()}
    assert script.cycles(tree) == []


def test_configs_import_without_jax():
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f != "__init__.py")
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    module = importlib.import_module('configs.' + name)\n"
        "    if hasattr(module, 'get_config'):\n"
        "        module.get_config(None); module.get_config('runlocal')\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'orbax', 'torch') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
