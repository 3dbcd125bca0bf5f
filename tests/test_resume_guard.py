"""Guarded resume (ldm_jax.training.resume_guard): a workdir's config.json is written once;
a resume that changes the run's identity (architecture, data, first stage, stage,
conditioning, objective, optimizer, seed) refuses in one line listing the keys and writes
nothing (the workdir tree is hashed before and after); allowed changes (num_steps, cadence,
schedule length) resume and are appended to config_history.jsonl; a diffusion checkpoint's
first-stage fingerprint is checked whatever cache_latents says."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import digits_autoencoder, digits_ldm  # noqa: E402
from ldm_jax.training import resume_guard  # noqa: E402
from ldm_jax.training import workdir as wd  # noqa: E402

# Whole training runs in module fixtures: minutes on 2 cores; `make test-all` runs them.
pytestmark = pytest.mark.slow


def _load_train_module():
    """train.py as a module, loaded once per process (it defines absl flags; test files share it)."""
    from cli_modules import load_cli

    return load_cli("train")


train_cli = _load_train_module()


def tree_hash(root) -> str:
    """sha256 over every path (directories too) and file content under ``root``."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        digest.update(os.path.relpath(directory, root).encode() + b"/\n")
        for name in sorted(files):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, root).encode() + b"\n")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _ae_config(**train):
    c = digits_autoencoder.get_config("runlocal")
    c.data.resolution = 8
    c.autoencoder.block_out_channels = (8,)
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.train.log_every = 2
    c.optimizer.warmup_steps = 1
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    c.preview.every_steps = -1
    c.export.enabled = False
    c.train.update(train)
    return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The resumed run's programs are the first run's: compiled once."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = [getattr(jax.config, name) for name in names]
    for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
        jax.config.update(name, value)
    yield
    for name, value in zip(names, previous):
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("guard") / "ae"
    train_cli.run(_ae_config(), str(workdir))
    return workdir


REFUSED = [
    ("architecture", lambda c: c.autoencoder.update(latent_channels=2), "autoencoder.latent_channels"),
    ("data", lambda c: c.data.update(resolution=16), "data.resolution"),
    ("data", lambda c: c.data.update(name="shapes", channels=None), "data.name"),
    ("data", lambda c: c.train.update(global_batch_size=16), "train.global_batch_size"),
    ("objective", lambda c: c.loss.update(kl_weight=1e-3), "loss.kl_weight"),
    ("optimizer", lambda c: c.optimizer.update(learning_rate=5e-4), "optimizer.learning_rate"),
    ("optimizer", lambda c: c.ema.update(decay=0.5), "ema.decay"),
    ("seed", lambda c: c.update(seed=7), "seed"),
]


@pytest.mark.parametrize("kind, change, key", REFUSED, ids=[r[2] for r in REFUSED])
def test_refused_resume_names_the_keys_in_one_line_and_writes_nothing(ae_run, kind, change, key):
    config = _ae_config()
    change(config)
    before = tree_hash(ae_run)
    with pytest.raises(train_cli.StartupError) as error:
        train_cli.run(config, str(ae_run))
    message = str(error.value)
    assert "\n" not in message and f"{kind}: {key}" in message and "refusing to resume" in message, message
    assert tree_hash(ae_run) == before


def test_stage_change_refuses_and_keeps_the_first_stage_workdir_usable(ae_run):
    """The finding: an LDM config pointed at an autoencoder workdir overwrote its config.json."""
    config = digits_ldm.get_config("runlocal")
    config.first_stage.source = "identity"
    config.logging.progress_bar = False
    before = tree_hash(ae_run)
    with pytest.raises(train_cli.StartupError, match=r"stage: stage \"autoencoder\" -> \"diffusion\""):
        train_cli.run(config, str(ae_run))
    assert tree_hash(ae_run) == before
    assert wd.read_config(ae_run).stage == "autoencoder"


def test_allowed_changes_resume_and_are_logged_in_the_history(ae_run, tmp_path):
    workdir = tmp_path / "ae"
    import shutil

    shutil.copytree(ae_run, workdir)
    stored = (workdir / "checkpoints" / "config.json").read_bytes()
    config = _ae_config(num_steps=3, log_every=3)
    config.checkpoint.every_steps = 3
    config.checkpoint.max_to_keep = 5
    result = train_cli.run(config, str(workdir))
    assert result.step == 3 and result.resumed_from == 2
    assert (workdir / "checkpoints" / "config.json").read_bytes() == stored  # immutable
    history = [json.loads(line) for line in (workdir / "checkpoints" / resume_guard.HISTORY_FILE).read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    changes = history[-1]["changes"]
    assert changes["train.num_steps"] == [2, 3] and changes["checkpoint.max_to_keep"] == [3, 5]
    assert changes["optimizer.decay_steps"] == [2, 3]  # the schedule length follows num_steps


def test_classification_of_keys():
    assert resume_guard.classify("train.num_steps") is None
    assert resume_guard.classify("preview.every_steps") is None
    assert resume_guard.classify("eval.every_steps") is None
    assert resume_guard.classify("first_stage.workdir") is None  # identity: the fingerprint
    assert resume_guard.classify("first_stage.step") == "first-stage"
    assert resume_guard.classify("conditioning.kind") == "conditioning"
    assert resume_guard.classify("diffusion.prediction") == "objective"
    assert resume_guard.classify("unet.block_out_channels") == "architecture"
    assert resume_guard.classify("optimizer.warmup_steps") == "optimizer"
    assert resume_guard.classify("something_new") == "other"
    # None and absent are the same (a new default-less key does not refuse an old workdir)
    assert resume_guard.config_diff({"data": {"name": "x"}}, {"data": {"name": "x", "path": None}}) == {}


def _fake_diffusion_checkpoint(directory, fingerprint):
    from ldm_jax.training.checkpointing import Checkpointer
    from ldm_jax.training.train_state import TrainState

    state = TrainState(step=jnp.asarray(1, jnp.int32), params={"w": jnp.ones(3)}, opt_state={},
                       ema_params={"w": jnp.ones(3)}, rng=jnp.zeros(2, jnp.uint32))
    with Checkpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(1, state, {"first_stage_params_hash": fingerprint})


def test_first_stage_fingerprint_is_checked_on_resume(tmp_path):
    directory = tmp_path / "ldm" / "checkpoints"
    _fake_diffusion_checkpoint(directory, "0123456789abcdef")
    resume_guard.check_first_stage(directory, "0123456789abcdef")  # same first stage: fine
    before = tree_hash(tmp_path / "ldm")
    with pytest.raises(resume_guard.ResumeRefused, match="fingerprint 0123456789abcdef.*has fedcba9876543210"):
        resume_guard.check_first_stage(directory, "fedcba9876543210")
    assert tree_hash(tmp_path / "ldm") == before


@pytest.mark.parametrize("cache_latents", [False, True])
def test_ldm_resume_on_another_autoencoder_refuses_before_the_latent_cache(ae_run, tmp_path, cache_latents):
    """The stage computes the fingerprint of the first stage it loaded and checks it before
    building the latent cache; here the stored one is a stand-in for another autoencoder."""
    ldm = tmp_path / "ldm"
    config = digits_ldm.get_config("runlocal")
    config.first_stage.workdir = str(ae_run)
    config.first_stage.cache_latents = cache_latents
    config.first_stage.scale_factor = 1.0
    config.data.resolution = 8
    config.logging.progress_bar = False
    _fake_diffusion_checkpoint(ldm / "checkpoints", "not-this-one")
    before = tree_hash(ldm)
    from ldm_jax.data import build_dataset, dataset_stats
    from ldm_jax.training.stages import diffusion

    with config.unlocked():
        config.workdir = str(ldm)
    source = build_dataset(config.data)
    with pytest.raises(resume_guard.ResumeRefused, match="params fingerprint not-this-one"):
        diffusion.build_stage(config, dataset_stats(source, "digits"), source=source)
    assert tree_hash(ldm) == before and not (ldm / "latent_cache").exists()
