"""Guarded resume: the config a workdir was started with is immutable, and a resume that
would change what the run *is* refuses before anything is written.

``<workdir>/checkpoints/config.json`` is written once, by the first start (it is what
``ldm_jax.pipeline.from_workdir`` and a diffusion stage's ``first_stage.source="workdir"``
read back). Every later start appends one JSON line to ``config_history.jsonl`` beside it
(UTC time, pid, host, and each changed key as ``[stored, new]``).

On resume (the workdir holds a checkpoint) :func:`check_resume` compares the new resolved
config with the stored one, key by key (None and absent are the same: an unset key is its
default):

* allowed, and logged: ``train.num_steps`` / ``log_every`` / ``num_microbatches``, the
  schedule length ``optimizer.decay_steps``, and the sections ``checkpoint``, ``logging``,
  ``preview``, ``eval``, ``export``, ``mesh``, ``sharding``, ``distributed``; paths that do
  not make the run's identity (``workdir``, ``first_stage.workdir`` / ``path`` /
  ``cache_dir``, ``data.data_dir``, ``data.num_threads``): a moved first stage is checked by
  its params' fingerprint instead (:func:`check_first_stage`); ``diffusion.init_from`` (the
  pretrained weights a fresh run starts from: a resume never reads it, see ``ALLOWED``);
* refused, with ONE line listing every changed key and its class: architecture (the
  autoencoder / denoiser sections), data (``data.*``, ``train.global_batch_size``),
  first-stage, stage, conditioning, objective (``diffusion``, ``loss``), optimizer
  (``optimizer.*``, ``ema.*``) and ``seed``; any other key also refuses.

:func:`check_first_stage` compares the first stage's params fingerprint
(``ldm_jax.ldm.model.params_fingerprint``, stored in every diffusion checkpoint's metadata)
with the one about to be used, whatever ``first_stage.cache_latents`` says.

Both checks only read; :func:`record_start` is the one writer and runs after them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import tempfile
from typing import Any, Mapping

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# Changes a user may make mid-run: exact keys and section prefixes (a key matches "a.b" or "a.b.*").
ALLOWED = (
    "train.num_steps", "train.log_every", "train.num_microbatches", "optimizer.decay_steps",
    "checkpoint", "logging", "preview", "eval", "export", "mesh", "sharding", "distributed",
    "workdir", "first_stage.workdir", "first_stage.path", "first_stage.cache_dir",
    "data.data_dir", "data.num_threads",
    # Allowed on purpose: the pretrained folder only seeds a fresh run's params; on resume the
    # params come from the checkpoint and the folder is never opened, so its value cannot
    # change what the run is. Refusing would only stop a resume whose folder moved or is gone
    # (a long SDXL run restarted on other hosts). config.json keeps the value the run started
    # from, the history logs the change, and the loop logs that the init is not read.
    "diffusion.init_from",
)  # fmt: skip
# Refused changes, first match wins: (prefix, class named in the message).
CLASSES = (
    ("stage", "stage"),
    ("train.global_batch_size", "data"),
    ("data", "data"),
    ("first_stage", "first-stage"),
    ("conditioning", "conditioning"),
    ("diffusion", "objective"),
    ("loss", "objective"),
    ("optimizer", "optimizer"),
    ("ema", "optimizer"),
    ("seed", "seed"),
    ("autoencoder", "architecture"),
    ("unet", "architecture"),
    ("dit", "architecture"),
    ("pixart", "architecture"),
    ("controlnet", "architecture"),
    ("lora", "architecture"),
)


class ResumeRefused(ValueError):
    """A resume would change the run's identity (one line listing the keys)."""


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def classify(key: str) -> str | None:
    """None when changing ``key`` mid-run is allowed, else the class named in the refusal."""
    if any(_matches(key, prefix) for prefix in ALLOWED):
        return None
    for prefix, name in CLASSES:
        if _matches(key, prefix):
            return name
    return "other"


def _as_dict(config: Any) -> dict:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    # The JSON round trip makes tuples lists and non-JSON values strings, as config.json holds them.
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, Mapping):
        for name, value in tree.items():
            key = f"{prefix}{name}"
            if isinstance(value, Mapping) and value:
                out.update(_flatten(value, key + "."))
            else:
                out[key] = value
    return out


def config_diff(stored: Any, new: Any) -> dict[str, list]:
    """``{dotted key: [stored value, new value]}`` for every leaf that differs (None ==
    absent == an empty section)."""
    a, b = _flatten(_as_dict(stored)), _flatten(_as_dict(new))
    empty = (None, {})
    return {
        key: [a.get(key), b.get(key)]
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) and not (a.get(key) in empty and b.get(key) in empty)
    }


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_stored_config(checkpoint_dir: str | os.PathLike) -> dict | None:
    path = os.path.join(os.fspath(checkpoint_dir), CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ResumeRefused(f"cannot read the workdir's config {path}: {error}") from None


def has_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether ``checkpoint_dir`` holds a finished checkpoint (a ``<step>/`` directory)."""
    directory = os.fspath(checkpoint_dir)
    return os.path.isdir(directory) and any(
        name.isdigit() and os.path.isdir(os.path.join(directory, name)) for name in os.listdir(directory)
    )


def check_resume(checkpoint_dir: str | os.PathLike, config: Any) -> dict[str, list]:
    """The allowed changes of ``config`` against the workdir's stored config (``{}`` for a new
    run). Raises ResumeRefused (one line listing every refused key, stored -> new) when the
    workdir holds a checkpoint and a refused key changed. Reads only."""
    stored = read_stored_config(checkpoint_dir)
    if stored is None or not has_checkpoint(checkpoint_dir):
        return {}
    diff = config_diff(stored, config)
    refused = {key: values for key, values in diff.items() if classify(key) is not None}
    if refused:
        listed = "; ".join(
            f"{classify(key)}: {key} {_short(old)} -> {_short(new)}" for key, (old, new) in refused.items()
        )
        raise ResumeRefused(
            f"refusing to resume {os.path.dirname(os.path.abspath(os.fspath(checkpoint_dir)))}: it was started "
            f"with another config ({listed}); restore those values or use a new --workdir"
        )
    return diff


def check_first_stage(checkpoint_dir: str | os.PathLike, fingerprint: str) -> None:
    """ResumeRefused when the newest readable checkpoint of ``checkpoint_dir`` was trained on a
    first stage with another params fingerprint (a resumed LDM would mix two latent spaces).
    Checkpoints without a stored fingerprint (older runs) are not checked. Reads only."""
    from ldm_jax.training.workdir import checkpoint_steps, read_metadata

    workdir = os.path.dirname(os.path.abspath(os.fspath(checkpoint_dir)))
    for step in reversed(checkpoint_steps(workdir)):
        try:
            metadata = read_metadata(workdir, step)
        except Exception:  # noqa: BLE001 - a damaged checkpoint: the next older one tells
            continue
        stored = metadata.get("first_stage_params_hash")
        if stored is not None and stored != fingerprint:
            raise ResumeRefused(
                f"refusing to resume {workdir}: its checkpoints (step {step}) were trained on a first stage "
                f"with params fingerprint {stored}, the configured first stage has {fingerprint}; "
                f"point config.first_stage at the original autoencoder or use a new --workdir"
            )
        return


def _append_history(directory: str, entry: dict) -> None:
    with open(os.path.join(directory, HISTORY_FILE), "a") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomically(path: str, value: dict) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config.", suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def record_start(checkpoint_dir: str | os.PathLike, config: Any, *, is_main: bool = True) -> dict[str, list]:
    """Check (:func:`check_resume`), then record this start: ``config.json`` when the workdir
    has none (or has no checkpoint yet: nothing was trained with the old one) and one line of
    ``config_history.jsonl``. Returns the allowed changes (logged in one line). Only the main
    process writes (``is_main``)."""
    directory = os.fspath(checkpoint_dir)
    changes = check_resume(directory, config)
    resumed = has_checkpoint(directory)
    stored = read_stored_config(directory)
    if changes:
        log.info("resuming with changed settings: %s",
                 ", ".join(f"{key} {_short(old)} -> {_short(new)}" for key, (old, new) in changes.items()))
    if not is_main:
        return changes
    os.makedirs(directory, exist_ok=True)
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    if stored is None or not resumed:
        if stored is not None:
            entry["replaced"] = config_diff(stored, config)  # a start that never saved a checkpoint
        _write_json_atomically(os.path.join(directory, CONFIG_FILE), _as_dict(config))
        entry["event"] = "start" if not resumed else "resume (no stored config.json: written now)"
    else:
        entry["event"] = "resume"
        entry["changes"] = changes
    _append_history(directory, entry)
    return changes
