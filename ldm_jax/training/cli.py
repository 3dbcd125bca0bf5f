"""Command-line errors shared by ``train.py`` and ``sample.py``: one line, exit status 2.

``train.py`` parses ``--config path.py[:arg]`` and ``--config.<key>=<value>`` overrides with
ml_collections' ``config_flags``, whose errors are tracebacks (an unknown key is an
``AttributeError: "'foo'"`` deep in ``config_dict``) or two ``FATAL`` lines.
:func:`absl_flags_parser` is the ``flags_parser`` of ``absl.app.run``: before absl parses
anything it loads the config file itself (:func:`load_config_file`) and checks every override
key against it (:func:`check_config_overrides`, with the nearest valid names from
``difflib``), then lets absl parse, turning any parse error into one line.

JAX-free on purpose: this runs before the CLIs import JAX, so a typo costs no JAX start-up.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Callable, Iterable, Sequence

EXIT_BAD_INPUT = 2


class CommandLineError(ValueError):
    """A bad command line (flag, config file, config key or value): one line."""


def one_line(error: BaseException | str, limit: int = 500) -> str:
    """The message of ``error`` on one line (KeyError's quotes removed), at most ``limit``
    characters; the type name when the message is empty."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error)
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- config files


def load_config_file(spec: str) -> Any:
    """``get_config(arg)`` of an experiment config file ``path/to/name.py[:arg]`` (the syntax of
    ``train.py --config``). FileNotFoundError names a missing file; CommandLineError (one line)
    any failure of the file itself (syntax error, no ``get_config``, an exception inside)."""
    path, _, arg = str(spec).partition(":")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    root = os.path.dirname(os.path.dirname(path))  # so that `from configs import base` works
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_ldm_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise CommandLineError(f"config file {path} defines no get_config()")
        return get_config(arg or None)
    except CommandLineError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the file raises, one line naming it
        raise CommandLineError(f"cannot load config file {spec}: {type(error).__name__}: {one_line(error)}") from None


def config_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) ConfigDict / mapping, sections and leaves."""
    keys = []
    items = config.items() if hasattr(config, "items") else ()
    for name, value in items:
        key = f"{prefix}{name}"
        keys.append(key)
        if hasattr(value, "items") and not isinstance(value, (str, bytes)):
            keys.extend(config_keys(value, key + "."))
    return keys


def _has_key(config: Any, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not hasattr(node, "items") or isinstance(node, (str, bytes)):
            return False
        try:
            if part not in node:
                return False
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


def nearest_keys(key: str, keys: Sequence[str], n: int = 3) -> list[str]:
    """The valid keys closest to ``key`` (difflib): within its section when the section
    exists (``train.batchsize`` -> ``train.global_batch_size``), else over every key
    (``trian.batch_size`` -> ``train.global_batch_size``)."""
    parent, _, leaf = key.rpartition(".")
    if parent and parent in keys:
        by_leaf = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        return [by_leaf[name] for name in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.5)]
    return difflib.get_close_matches(key, keys, n=n, cutoff=0.6)


def check_config_overrides(config: Any, keys: Iterable[str], flag: str = "config") -> None:
    """CommandLineError (one line) for the first override key that is not in ``config``,
    with the nearest valid names (or the section's keys when none is close)."""
    valid = None
    for key in keys:
        if _has_key(config, key):
            continue
        valid = valid if valid is not None else config_keys(config)
        close = nearest_keys(key, valid)
        section = key.rpartition(".")[0]
        if close:
            hint = "; did you mean " + " or ".join(f"--{flag}.{k}" for k in close) + "?"
        elif section in valid:
            names = sorted(k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section)
            hint = f"; {flag}.{section} has keys {', '.join(names)}"
        else:
            hint = f"; top-level keys: {', '.join(sorted(k for k in valid if '.' not in k))}"
        raise CommandLineError(f"unknown config key --{flag}.{key}{hint}")


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag=value`` / ``--flag value`` in ``argv`` (the last one given)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{flag}="):
            value = arg[len(flag) + 3:]
    return value


def override_keys(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The dotted keys of the ``--flag.<key>[=value]`` overrides in ``argv``."""
    keys = []
    for arg in argv:
        for prefix in (f"--{flag}.", f"--no{flag}."):  # absl's --noflag form for booleans
            if arg.startswith(prefix):
                keys.append(arg[len(prefix):].partition("=")[0])
    return keys


def check_command_line(argv: Sequence[str], flag: str = "config") -> Any:
    """The checks :func:`absl_flags_parser` makes before absl parses ``argv``: the config file
    loads and every override key exists. Returns the loaded config (None without ``--flag``);
    raises FileNotFoundError / CommandLineError (one line)."""
    spec = _flag_value(argv, flag)
    keys = override_keys(argv, flag)
    if spec is None:
        if keys:
            raise CommandLineError(f"--{flag}.{keys[0]} given without --{flag} <file>")
        return None
    config = load_config_file(spec)
    check_config_overrides(config, keys, flag)
    return config


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``<prog>: error: <message>`` on stderr and exit with ``code``."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def absl_flags_parser(prog: str, flag: str = "config") -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run``: :func:`check_command_line`, then absl's parse;
    any error becomes one line on stderr and exit status 2."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        try:
            check_command_line(argv[1:], flag)
            return flags.FLAGS(argv)
        except (CommandLineError, OSError, flags.Error) as error:
            fail(prog, one_line(error))
        except Exception as error:  # noqa: BLE001 - a config_flags failure must still be one line
            fail(prog, f"{type(error).__name__}: {one_line(error)}")

    return parse
