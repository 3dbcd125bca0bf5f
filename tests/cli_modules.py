"""train.py / sample.py / evaluate.py loaded as modules once per process: train.py defines absl
flags, so a second load in the same pytest worker would raise DuplicateFlagError."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cli(script: str):
    name = f"ldm_jax_{script}_cli"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{script}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
