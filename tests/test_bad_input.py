"""Bad input to train.py and sample.py: a parametrized suite of command lines, each asserting a
non-zero exit, one error line naming the offending value (the last non-empty stderr line, the
only one starting with the program's name), no traceback, and an unchanged workdir (its tree
hashed before and after).

Most cases run in-process, through the code each CLI runs: train.py's absl flags parser
(``ldm_jax.training.cli.absl_flags_parser``, before absl parses anything) or its
``run_command`` (after), and ``sample.main``. A handful run as real subprocesses to cover the
paths through absl's own parsing and the exit codes as a shell sees them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sample  # noqa: E402
from configs import digits_autoencoder  # noqa: E402
from ldm_jax.training import cli  # noqa: E402


def load_train_module():
    """train.py as a module, loaded once per process (it defines absl flags)."""
    from cli_modules import load_cli

    return load_cli("train")


train_cli = load_train_module()
CONFIG = os.path.join(ROOT, "configs", "digits_autoencoder.py")
LDM_CONFIG = os.path.join(ROOT, "configs", "digits_ldm.py")


def tree_hash(root) -> str:
    digest = hashlib.sha256()
    if not os.path.exists(root):
        return "absent"
    if os.path.isfile(root):
        with open(root, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        digest.update(os.path.relpath(directory, root).encode() + b"/\n")
        for name in sorted(files):
            path = os.path.join(directory, name)
            digest.update(os.path.relpath(path, root).encode() + b"\n")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def error_line(err: str, prog: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    assert sum(line.startswith(f"{prog}:") for line in lines) == 1, err[-3000:]
    assert lines[-1].startswith(f"{prog}: error: "), lines[-1]
    return lines[-1]


# ----------------------------------------------------------------------------- fixtures


def _tiny_ae_config():
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
    return c


def _fake_workdir(workdir):
    """A workdir as a finished tiny autoencoder run leaves it, without training: the resolved
    config recorded by the resume guard and a checkpoint (a small stand-in state)."""
    from ldm_jax.training.checkpointing import Checkpointer
    from ldm_jax.training.config import resolve_config
    from ldm_jax.training.resume_guard import record_start
    from ldm_jax.training.train_state import TrainState

    config = _tiny_ae_config()
    config.workdir = str(workdir)
    resolved = resolve_config(config, jax.device_count())
    record_start(workdir / "checkpoints", resolved)
    state = TrainState(step=jnp.asarray(2, jnp.int32), params={"w": jnp.ones(3)}, opt_state={},
                       ema_params={"w": jnp.ones(3)}, rng=jnp.zeros(2, jnp.uint32))
    with Checkpointer(workdir / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(2, state, {"stage": "autoencoder"})


def _tiny_vae_folder(directory):
    from ldm_jax.interop.diffusers_vae import save_diffusers_autoencoder_kl
    from ldm_jax.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        mid_block_add_attention=False, in_channels=1, out_channels=1)
    save_diffusers_autoencoder_kl(vae, _random_params(vae, jnp.zeros((1, 8, 8, 1))), str(directory), sample_size=8)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One prepared tree: a tiny autoencoder workdir with a checkpoint, an empty workdir, a
    file, broken config files, image folders, a diffusers VAE folder and a model folder, each
    also with truncated and pickled weights."""
    root = tmp_path_factory.mktemp("bad_input")
    ae = root / "ae"
    _fake_workdir(ae)
    _tiny_vae_folder(root / "vae")
    (root / "empty_workdir").mkdir()
    (root / "empty_workdir" / "keep.txt").write_text("user data\n")
    (root / "a_file").write_text("not a directory\n")
    (root / "syntax.py").write_text("def get_config(arg=None)\n    return 1\n")
    (root / "no_get_config.py").write_text("x = 1\n")
    (root / "raises.py").write_text("def get_config(arg=None):\n    raise RuntimeError('boom in get_config')\n")
    (root / "no_images").mkdir()
    (root / "no_images" / "readme.txt").write_text("nothing here\n")
    bad = root / "undecodable"
    bad.mkdir()
    good = bad / "template.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    for i in range(3):  # valid PNG headers, truncated pixel data: pass the header check, fail to decode
        (bad / f"img{i}.png").write_bytes(data[: len(data) // 2])
    good.unlink()
    truncated = root / "vae_truncated"
    shutil.copytree(root / "vae", truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    pickled = root / "vae_pickle"
    shutil.copytree(root / "vae", pickled)
    (pickled / "diffusion_pytorch_model.safetensors").unlink()
    (pickled / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))
    model = root / "model"
    _tiny_pipeline_folder(model)
    unet_weights = next((model / "unet").glob("*.safetensors"))
    broken = root / "model_truncated"
    shutil.copytree(model, broken)
    (broken / "unet" / unet_weights.name).write_bytes(unet_weights.read_bytes()[:300])
    evil = root / "model_pickle"
    shutil.copytree(model, evil)
    (evil / "unet" / unet_weights.name).unlink()
    (evil / "unet" / unet_weights.name.replace(".safetensors", ".bin")).write_bytes(pickle.dumps(_Evil()))
    (root / "prompts_empty.txt").write_text("\n \n")
    (root / "not_an_image.png").write_text("text, not a PNG\n")
    return root


def _random_params(module, *args, seed=0):
    abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: 0.05 * rng.standard_normal(leaf.shape).astype(np.float32), abstract)


def _tiny_pipeline_folder(directory):
    """An unconditional pixel-free latent model: tiny U-Net on a tiny KL autoencoder."""
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.unet import UNet
    from ldm_jax.pipeline import KLFirstStage, LatentDiffusionPipeline, Unconditional, save_model_folder

    unet = UNet(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8,), layers_per_block=1,
                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8,
                mid_block_type=None, cross_attention_dim=None)
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        mid_block_add_attention=False)
    pipe = LatentDiffusionPipeline.from_components(
        unet=unet, unet_params=_random_params(unet, *unet.dummy_inputs().values()),
        first_stage=KLFirstStage(vae), first_stage_variables={"params": _random_params(vae, jnp.zeros((1, 8, 8, 3)))},
        conditioner=Unconditional(), schedule={"kind": "linear", "num_timesteps": 1000},
    )
    return save_model_folder(pipe, directory, step=1)


class _Evil:
    def __reduce__(self):  # what a malicious checkpoint does on plain pickle.load
        return (os.system, ("echo pwned > /dev/null",))


# ----------------------------------------------------------------------------- train.py: command line


def _parse_in_process(argv, capsys):
    """train.py's flags parser up to its first error: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.absl_flags_parser("train.py")(["train.py", *argv])
    return exit_info.value.code, capsys.readouterr().err


FLAG_CASES = [
    (["--config.train.foo=1"], "--config.train.foo"),
    (["--config.trian.batch_size=3"], "did you mean --config.train.global_batch_size?"),
    (["--config.train.batchsize=8"], "did you mean --config.train.global_batch_size?"),
    (["--config.optimizer.learning_rat=1e-3"], "did you mean --config.optimizer.learning_rate"),
    (["--config.data.pth=/x"], "did you mean --config.data.path"),
    (["--config.autoencoder.latent_channel=2"], "did you mean --config.autoencoder.latent_channels"),
    (["--config.zzz=1"], "unknown config key --config.zzz; top-level keys"),
    (["--config.ema.dcay", "0.5"], "did you mean --config.ema.decay"),
    (["--noconfig.checkpoint.async_sav"], "did you mean --config.checkpoint.async_save"),
    (["--config.loss.disc_wieght=0"], "did you mean --config.loss.disc_weight"),
]


@pytest.mark.parametrize("extra, expected", FLAG_CASES, ids=[c[0][0] for c in FLAG_CASES])
def test_train_unknown_config_keys_get_the_nearest_names(env, capsys, extra, expected):
    workdir = env / "empty_workdir"
    before = tree_hash(workdir)
    code, err = _parse_in_process(["--config", f"{CONFIG}:runlocal", "--workdir", str(workdir), *extra], capsys)
    assert code == 2
    assert expected in error_line(err, "train.py")
    assert tree_hash(workdir) == before


def test_train_ldm_config_key_suggestions(env, capsys):
    code, err = _parse_in_process(["--config", f"{LDM_CONFIG}:runlocal", "--workdir", str(env / "x"),
                                   "--config.unet.block_out_channel=(8,)"], capsys)
    assert code == 2 and "did you mean --config.unet.block_out_channels" in error_line(err, "train.py")
    assert not (env / "x").exists()


CONFIG_FILE_CASES = [
    ("missing.py", "config file not found"),
    ("syntax.py", "SyntaxError"),
    ("no_get_config.py", "defines no get_config()"),
    ("raises.py", "RuntimeError: boom in get_config"),
]


@pytest.mark.parametrize("name, expected", CONFIG_FILE_CASES, ids=[c[0] for c in CONFIG_FILE_CASES])
def test_train_broken_config_files_are_one_line(env, capsys, name, expected):
    before = tree_hash(env / "empty_workdir")
    code, err = _parse_in_process(["--config", str(env / name), "--workdir", str(env / "empty_workdir")], capsys)
    line = error_line(err, "train.py")
    assert code == 2 and expected in line and name in line
    assert tree_hash(env / "empty_workdir") == before


def test_train_override_without_config_file(env, capsys):
    code, err = _parse_in_process(["--workdir", str(env / "x"), "--config.train.num_steps=3"], capsys)
    assert code == 2 and "--config.train.num_steps given without --config" in error_line(err, "train.py")


# ----------------------------------------------------------------------------- train.py: after parsing


def _run_command(config, workdir, capsys):
    code = train_cli.run_command(config, str(workdir))
    return code, capsys.readouterr().err


def _with(**overrides):
    def change(c):
        for dotted, value in overrides.items():
            section, _, key = dotted.rpartition(".")
            node = c
            for part in section.split(".") if section else ():
                node = node[part]
            with node.unlocked() if hasattr(node, "unlocked") else _null():
                node[key] = value
        return c

    return change


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


RUN_CASES = [
    # (id, config change, workdir name, expected text, env paths to format into the text)
    ("dataset_name", _with(**{"data.name": "mnistt"}), "empty_workdir", "unknown dataset name 'mnistt'"),
    ("folder_missing", _with(**{"data.name": "folder", "data.path": "{env}/nope"}), "empty_workdir", "nope"),
    ("folder_no_images", _with(**{"data.name": "folder", "data.path": "{env}/no_images"}), "empty_workdir",
     "no readable"),
    ("folder_undecodable", _with(**{"data.name": "folder", "data.path": "{env}/undecodable", "data.channels": 3}),
     "empty_workdir", "failed to decode"),
    ("batch_divisible", _with(**{"train.global_batch_size": 12}), "empty_workdir", "global_batch_size=12"),
    ("mesh_too_big", _with(**{"mesh.shape": {"data": 16}}), "empty_workdir", "16 devices"),
    ("stage_typo", _with(stage="autoencodr"), "empty_workdir", "'autoencodr'"),
    ("ae_kind", _with(**{"autoencoder.kind": "vqq"}), "empty_workdir", "vqq"),
    ("ema_decay", _with(**{"ema.decay": 1.5}), "empty_workdir", "config.ema.decay"),
    ("max_to_keep", _with(**{"checkpoint.max_to_keep": 0}), "empty_workdir", "max_to_keep"),
    ("schedule", _with(**{"optimizer.schedule": "cosin"}), "empty_workdir", "cosin"),
    ("num_steps", _with(**{"train.num_steps": -1}), "empty_workdir", "num_steps"),
    ("workdir_is_file", _with(), "a_file", "a_file is a file"),
    ("workdir_in_file", _with(), "a_file/sub", "a_file"),
    ("resume_architecture", _with(**{"autoencoder.latent_channels": 2}), "ae", "autoencoder.latent_channels"),
    ("resume_data", _with(**{"data.resolution": 16}), "ae", "data.resolution"),
    ("resume_optimizer", _with(**{"optimizer.learning_rate": 0.5}), "ae", "optimizer.learning_rate"),
]


@pytest.mark.parametrize("change, workdir, expected", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_train_bad_config_values_and_workdirs(env, capsys, change, workdir, expected):
    config = _tiny_ae_config()
    change(config)
    if isinstance(config.data.get("path"), str):
        config.data.path = config.data.path.format(env=env)
    target = env / workdir
    watched = env / workdir.split("/")[0]
    before = tree_hash(watched)
    code, err = _run_command(config, target, capsys)
    assert code == 2
    assert expected in error_line(err, "train.py")
    assert tree_hash(watched) == before


def test_train_locked_workdir(env, capsys):
    from ldm_jax.training.workdir_lock import WorkdirLock

    with WorkdirLock(env / "ae"):
        before = tree_hash(env / "ae")
        code, err = _run_command(_tiny_ae_config(), env / "ae", capsys)
        assert tree_hash(env / "ae") == before
    assert code == 2 and str(os.getpid()) in error_line(err, "train.py")


def _ldm_on(first_stage_path):
    from configs import digits_ldm

    c = digits_ldm.get_config("runlocal")
    c.first_stage.source = "diffusers"
    c.first_stage.path = str(first_stage_path)
    c.first_stage.workdir = ""
    c.data.resolution = 8
    c.logging.progress_bar = False
    return c


@pytest.mark.parametrize("folder, expected", [
    ("vae_truncated", "vae_truncated/diffusion_pytorch_model.safetensors"),
    ("vae_pickle", "vae_pickle/diffusion_pytorch_model.bin"),
    ("no_such_vae", "no_such_vae"),
])
def test_train_broken_first_stage_weights(env, capsys, folder, expected):
    before = tree_hash(env / "empty_workdir")
    code, err = _run_command(_ldm_on(env / folder), env / "empty_workdir", capsys)
    assert code == 2 and expected in error_line(err, "train.py")
    assert tree_hash(env / "empty_workdir") == before


def test_train_first_stage_workdir_that_is_not_a_run(env, capsys):
    c = _ldm_on(env)
    c.first_stage.source = "workdir"
    c.first_stage.workdir = str(env / "no_images")
    code, err = _run_command(c, env / "empty_workdir", capsys)
    assert code == 2 and "no_images" in error_line(err, "train.py")


# ----------------------------------------------------------------------------- train.py: real processes


def _subprocess(argv, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


PROCESS_CASES = [
    (["--config.train.global_batch_size=abc"], "--config.train.global_batch_size=abc"),
    (["--config.ema.decay=fast"], "fast"),
    (["--config.train.foo=1"], "--config.train.foo"),
    (["--nonsense_flag=1"], "nonsense_flag"),
    (["positional"], "unexpected arguments: positional"),
]


@pytest.mark.parametrize("extra, expected", PROCESS_CASES, ids=[c[0][0] for c in PROCESS_CASES])
def test_train_process_exit_code_and_one_line(env, extra, expected):
    workdir = env / "empty_workdir"
    before = tree_hash(workdir)
    done = _subprocess([os.path.join(ROOT, "train.py"), "--config", f"{CONFIG}:runlocal", "--workdir", str(workdir),
                        *extra])
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in error_line(done.stderr, "train.py")
    assert tree_hash(workdir) == before


# ----------------------------------------------------------------------------- sample.py


def _sample(argv, capsys):
    code = sample.main([str(a) for a in argv])
    return code, capsys.readouterr().err


SAMPLE_CASES = [
    ([], "required"),
    (["--out", "{out}"], "--model_dir"),
    (["--model_dir", "{env}/nope", "--out", "{out}"], "nope"),
    (["--workdir", "{env}/nope", "--out", "{out}"], "nope"),
    (["--model_dir", "{env}/no_images", "--out", "{out}"], "no_images"),
    (["--model_dir", "{env}/model_truncated", "--out", "{out}"], "model_truncated/unet/diffusion_pytorch_model.safetensors"),
    (["--model_dir", "{env}/model_pickle", "--out", "{out}"], "model_pickle/unet/diffusion_pytorch_model.bin"),
    (["--model_dir", "{env}/model", "--prompts", "{env}/prompts_empty.txt", "--out", "{out}"], "prompts_empty.txt"),
    (["--model_dir", "{env}/model", "--init_image", "{env}/not_an_image.png", "--out", "{out}"], "not_an_image.png"),
    (["--model_dir", "{env}/model", "--init_image", "{env}/missing.png", "--out", "{out}"], "missing.png"),
    (["--workdir", "{env}/no_images", "--out", "{out}"], "no_images"),
    (["--workdir", "{env}/ae", "--step", "99", "--out", "{out}"], "is a 'autoencoder' run"),
    (["--model_dir", "{env}/model", "--num_samples", "0", "--out", "{out}"], "--num_samples must be >= 1, got 0"),
    (["--model_dir", "{env}/model", "--num_samples", "abc", "--out", "{out}"], "'abc'"),
    (["--model_dir", "{env}/model", "--batch_size", "0", "--out", "{out}"], "--batch_size"),
    (["--model_dir", "{env}/model", "--guidance_scale", "high", "--out", "{out}"], "'high'"),
    (["--model_dir", "{env}/model", "--sampler", "dddim", "--out", "{out}"], "'dddim'"),
    (["--model_dir", "{env}/model", "--seed", "-1", "--out", "{out}"], "--seed"),
    (["--model_dir", "{env}/model", "--start_index", "-3", "--out", "{out}"], "--start_index"),
    (["--model_dir", "{env}/model", "--strength", "0.5", "--out", "{out}"], "--strength needs --init_image"),
    (["--model_dir", "{env}/model", "--mask", "m.png", "--out", "{out}"], "--mask needs --init_image"),
    (["--model_dir", "{env}/model", "--config", "c.py", "--out", "{out}"], "--config applies to --workdir"),
    (["--model_dir", "{env}/model", "--step", "3", "--out", "{out}"], "--step applies to --workdir"),
    (["--model_dir", "{env}/model", "--prompts", "{env}/missing.txt", "--out", "{out}"], "missing.txt"),
    (["--model_dir", "{env}/model", "--prompt", "a", "--class", "1", "--out", "{out}"], "not allowed with"),
    (["--model_dir", "{env}/model", "--class", "one", "--out", "{out}"], "'one'"),
    (["--model_dir", "{env}/model", "--frobnicate", "--out", "{out}"], "--frobnicate"),
    (["--workdir", "{env}/ae", "--config", "{env}/syntax.py", "--out", "{out}"], "syntax.py"),
]


@pytest.mark.parametrize("argv, expected", SAMPLE_CASES, ids=[" ".join(c[0][:2]) + f"#{i}" for i, c in enumerate(SAMPLE_CASES)])
def test_sample_bad_input_one_line_exit_2(env, capsys, tmp_path, argv, expected):
    out = tmp_path / "out"
    argv = [a.format(env=env, out=out) for a in argv]
    expected = expected.format(env=env, out=out)
    before = tree_hash(env)
    code, err = _sample(argv, capsys)
    assert code == 2
    assert expected in error_line(err, "sample.py")
    assert tree_hash(env) == before and not out.exists()


def test_sample_process_refused_pickle(env, tmp_path):
    """As a shell sees it (the truncated case and the rest run in-process above)."""
    for folder in ("model_pickle",):
        done = _subprocess([os.path.join(ROOT, "sample.py"), "--model_dir", str(env / folder), "--out",
                            str(tmp_path / "out")])
        assert done.returncode == 2, done.stderr[-2000:]
        assert folder in error_line(done.stderr, "sample.py")
