"""Checkpoint integrity: fault injection on real checkpoints written by the real Checkpointer.

Truths: the values that were saved (each case damages the newest of three checkpoints of a
tiny sharded TrainState and the restore must return the previous one, bit for bit), an
independent NumPy implementation of the fingerprint, and the files the old ldm_jax wrote
(checkpoints without a manifest, written here with the old save code: an orbax
CheckpointManager with the items ``state`` and ``metadata`` only).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from ldm_jax.training import TrainState, make_mesh
from ldm_jax.training import checkpoint_integrity as integrity
from ldm_jax.training.checkpointing import (
    DAMAGED_DIR,
    CheckpointError,
    Checkpointer,
)

STEPS = (1, 2, 3)
NEWEST, PREVIOUS = 3, 2


def _state(mesh, step: int, nan: bool = False) -> TrainState:
    rng = np.random.default_rng(step)
    fsdp = NamedSharding(mesh, PS("fsdp"))
    replicated = NamedSharding(mesh, PS())
    w = rng.standard_normal((64, 64)).astype(np.float32)
    if nan:
        w[3, 2] = np.nan
    return TrainState(
        step=jax.device_put(np.int32(step), replicated),
        params={"w": jax.device_put(w, fsdp), "b": jax.device_put(rng.standard_normal(64).astype(np.float32), replicated)},
        opt_state=({"mu": jax.device_put(rng.standard_normal((64, 64)).astype(np.float32), fsdp)},),
        ema_params={"w": jax.device_put(w * 0.5, fsdp), "b": jax.device_put(np.zeros(64, np.float32), replicated)},
        rng=jax.device_put(np.array([7, step], np.uint32), replicated),
    )


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_state_equal(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"shape": {"data": 2, "fsdp": 4, "tensor": 1}})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, mesh):
    """Three verified checkpoints (steps 1, 2, 3), copied afresh by each case."""
    directory = tmp_path_factory.mktemp("pristine") / "ckpt"
    with Checkpointer(directory, max_to_keep=3) as checkpointer:
        for step in STEPS:
            checkpointer.save(step, _state(mesh, step), {"data_position": step * 10})
    return directory


@pytest.fixture()
def run_dir(pristine, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(pristine, directory)
    return directory


def _data_files(step_dir) -> list[str]:
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return sorted(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _data_files(step_dir)[-1]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _flip_64_bytes(step_dir):
    path = _data_files(step_dir)[-1]
    data = bytearray(open(path, "rb").read())
    start = len(data) // 2
    for i in range(start, start + 64):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _delete(name):
    def damage(step_dir):
        path = os.path.join(step_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    return damage


def _swap_state_from_previous(step_dir):
    """A data set that decodes cleanly but is not the one the manifest describes."""
    previous = os.path.join(os.path.dirname(step_dir), str(PREVIOUS), "state")
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(previous, os.path.join(step_dir, "state"))


def _edit_metadata(step_dir):
    path = os.path.join(step_dir, "metadata", "metadata")
    text = open(path).read()
    assert '"data_position": 30' in text
    open(path, "w").write(text.replace('"data_position": 30', '"data_position": 31'))


CASES = {
    # case id: (damage, expected words of the reason)
    "truncated_data_file": (_truncate, "unreadable"),
    "flipped_64_bytes": (_flip_64_bytes, "checksum mismatch in ."),
    "deleted_metadata_item": (_delete("metadata"), "missing metadata/"),
    "deleted_manifest_item": (_delete("manifest"), "missing manifest/"),
    "deleted_state_item": (_delete("state"), "missing state/"),
    "deleted_orbax_step_metadata": (_delete("_CHECKPOINT_METADATA"), "missing _CHECKPOINT_METADATA"),
    "deleted_state_array_metadata": (_delete("state/_METADATA"), "missing state/_METADATA"),
    "state_from_another_step": (_swap_state_from_previous, "checksum mismatch in ."),
    "edited_metadata_json": (_edit_metadata, "checksum mismatch in metadata"),
}


def _damage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_newest_checkpoint_falls_back_to_previous_with_one_line(case, run_dir, mesh, caplog):
    damage, reason_words = CASES[case]
    damage(os.path.join(run_dir, str(NEWEST)))
    caplog.set_level(logging.WARNING, logger="ldm_jax.training.checkpointing")
    with Checkpointer(run_dir, max_to_keep=3) as checkpointer:
        restored = checkpointer.restore_latest_valid(_abstract(_state(mesh, 1)))
        assert restored.step == PREVIOUS and restored.verified
        _assert_state_equal(restored.state, _state(mesh, PREVIOUS))
        assert restored.metadata == {"step": PREVIOUS, "data_position": PREVIOUS * 10}
        [line] = _damage_lines(caplog)
        assert "\n" not in line and len(line) < 600
        assert f"checkpoint step {NEWEST} in {run_dir} is damaged (" in line, line
        assert reason_words in line, line
        assert f"resuming from step {PREVIOUS}" in line
        [damaged] = restored.damaged
        assert damaged.step == NEWEST and damaged.moved_to == os.path.join(run_dir, DAMAGED_DIR, f"step_{NEWEST}")
        # The damaged one is kept aside (not deleted) and no longer counts as a checkpoint.
        assert os.path.isdir(damaged.moved_to)
        assert checkpointer.all_steps() == [1, PREVIOUS] and checkpointer.last_good_step == PREVIOUS
        # Training goes on: the step can be saved again, and it verifies.
        checkpointer.save(NEWEST, _state(mesh, NEWEST), {"data_position": NEWEST * 10})
        checkpointer.wait_until_finished()
    with Checkpointer(run_dir, max_to_keep=3) as checkpointer:
        again = checkpointer.restore_latest_valid(_abstract(_state(mesh, 1)))
    assert again.step == NEWEST and again.verified and again.damaged == ()
    _assert_state_equal(again.state, _state(mesh, NEWEST))


def test_non_finite_params_in_newest_checkpoint_fall_back_and_rotation_keeps_last_good(run_dir, mesh, caplog):
    caplog.set_level(logging.WARNING, logger="ldm_jax.training.checkpointing")
    # max_to_keep=1: orbax's rotation would keep only the newest (a NaN one) and delete step 3.
    with Checkpointer(run_dir, max_to_keep=1) as checkpointer:
        checkpointer.save(4, _state(mesh, 4, nan=True), {"data_position": 40})
        checkpointer.save(5, _state(mesh, 5, nan=True), {"data_position": 50})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [NEWEST, 5]
    assert any("non-finite params/EMA" in r.getMessage() for r in caplog.records)
    with Checkpointer(run_dir, max_to_keep=1) as checkpointer:
        restored = checkpointer.restore_latest_valid(_abstract(_state(mesh, 1)))
        assert restored.step == NEWEST
        [line] = _damage_lines(caplog)
        assert "checkpoint step 5" in line and "non-finite values in .params['w']" in line
        _assert_state_equal(restored.state, _state(mesh, NEWEST))
        # A good save supersedes the last good one; then rotation keeps only the newest.
        checkpointer.save(6, _state(mesh, 6), {"data_position": 60})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [6] and checkpointer.last_good_step == 6


def test_every_checkpoint_damaged_raises_one_line_and_moves_nothing(run_dir, mesh):
    for step in STEPS:
        _delete("manifest")(os.path.join(run_dir, str(step)))
    with Checkpointer(run_dir) as checkpointer:
        with pytest.raises(CheckpointError) as info:
            checkpointer.restore_latest_valid(_abstract(_state(mesh, 1)))
        assert checkpointer.all_steps() == list(STEPS)
    message = str(info.value)
    assert "\n" not in message and "every checkpoint" in message
    assert "step 3: missing manifest/; step 2: missing manifest/; step 1: missing manifest/" in message
    assert not os.path.exists(os.path.join(run_dir, DAMAGED_DIR))


def test_model_that_does_not_fit_is_refused_not_treated_as_damage(run_dir, mesh):
    wrong = _state(mesh, 1)
    wrong = wrong.replace(params={**wrong.params, "w": jnp.zeros((16, 4), jnp.float32)})
    with Checkpointer(run_dir) as checkpointer:
        with pytest.raises(CheckpointError, match=r"step 3 .* does not fit the model: \.params\['w'\] saved "
                                                  r"float32\(64, 64\) vs model float32\(16, 4\)"):
            checkpointer.restore_latest_valid(_abstract(wrong))
        assert checkpointer.all_steps() == list(STEPS)


def _legacy_save(directory, steps, mesh, nan_at=None):
    """What ldm_jax wrote before manifests (the former Checkpointer.save, verbatim in effect)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=3, create=True, cleanup_tmp_directories=True)
    with ocp.CheckpointManager(directory, options=options, item_names=("state", "metadata")) as manager:
        for step in steps:
            meta = {"step": step, "data_position": step * 10}
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state(mesh, step, nan=step == nan_at)), metadata=ocp.args.JsonSave(meta)),
                force=True)
        manager.wait_until_finished()


def test_checkpoint_without_manifest_from_older_version_restores_unverified(tmp_path, mesh, caplog):
    directory = tmp_path / "old"
    _legacy_save(directory, (1, 2), mesh, nan_at=2)
    caplog.set_level(logging.WARNING, logger="ldm_jax.training.checkpointing")
    with Checkpointer(directory) as checkpointer:
        # The old API still reads it as before.
        state, meta = checkpointer.restore(_abstract(_state(mesh, 1)), 1)
        assert meta == {"step": 1, "data_position": 10}
        restored = checkpointer.restore_latest_valid(_abstract(_state(mesh, 1)))
    # Step 2 (NaN params) cannot be verified by checksum but is caught by the finiteness check.
    assert restored.step == 1 and not restored.verified
    _assert_state_equal(restored.state, _state(mesh, 1))
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint step 2" in m and "non-finite values in .params['w']" in m for m in messages)
    assert any("checkpoint step 1" in m and "no integrity manifest" in m and "without checksum" in m
               for m in messages)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int32", "uint32", "int8", "bool"])
def test_fingerprint_matches_numpy_reference_and_ignores_sharding(dtype, mesh):
    rng = np.random.default_rng(0)
    if dtype == "bool":
        host = rng.random((16, 6)) > 0.5
    elif dtype == "bfloat16":
        host = rng.standard_normal((16, 6)).astype(ml_dtypes.bfloat16)
    elif dtype.startswith(("int", "uint")):
        host = rng.integers(-100 if dtype.startswith("int") else 0, 100, (16, 6)).astype(dtype)
    else:
        host = rng.standard_normal((16, 6)).astype(dtype)
    reference = integrity.numpy_fingerprint(host)
    shardings = [NamedSharding(mesh, PS()), NamedSharding(mesh, PS(("data", "fsdp")))]
    for sharding in shardings:
        summary, _, _ = integrity.summarize({"x": jax.device_put(host, sharding)})
        assert summary["['x']"]["fp"] == reference, sharding
    # One flipped bit anywhere changes it.
    flipped = host.copy()
    flipped.view(np.uint8).reshape(-1)[37] ^= 0x01
    assert integrity.numpy_fingerprint(flipped) != reference


def test_ema_params_read_alone_verify_against_the_manifest(run_dir, mesh):
    """The inference path reads only the EMA tree as host arrays; it can still be verified."""
    manifest = integrity.load_manifest(os.path.join(run_dir, str(NEWEST)))
    ema = jax.tree.map(np.asarray, _state(mesh, NEWEST).ema_params)
    assert integrity.verify_subtree(manifest, ema, ".ema_params") is None
    ema["w"] = ema["w"].copy()
    ema["w"][5, 5] += 1e-3
    assert integrity.verify_subtree(manifest, ema, ".ema_params") == "checksum mismatch in .ema_params['w']"
    assert integrity.load_manifest(os.path.join(run_dir, "nope")) is None


@pytest.mark.parametrize("case", ["edited_metadata_json", "deleted_state_item"])
def test_latest_intact_metadata_skips_a_damaged_newest_without_reading_arrays(case, run_dir):
    CASES[case][0](os.path.join(run_dir, str(NEWEST)))
    with Checkpointer(run_dir) as checkpointer:
        assert checkpointer.latest_intact_metadata() == (PREVIOUS, {"step": PREVIOUS, "data_position": PREVIOUS * 10})
        assert checkpointer.all_steps() == list(STEPS)  # nothing moved by a read


def test_stacked_fingerprints_equal_the_numpy_reference_leaf_by_leaf(mesh, monkeypatch):
    """The manifest program stacks leaves of one shape, dtype and sharding (to compile once per
    stack, not once per leaf); every leaf's fingerprint and finiteness must still be its own:
    stacks of sharded and replicated leaves, a stack split by the byte bound, a leaf alone, a
    NaN in the middle of a stack, a typed PRNG key."""
    monkeypatch.setattr(integrity, "GROUP_BYTES", 3 * 64 * 64 * 4)  # three (64, 64) float32 per stack
    rng = np.random.default_rng(5)
    fsdp, replicated = NamedSharding(mesh, PS("fsdp")), NamedSharding(mesh, PS())
    hosts = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(7)]
    hosts[4][10, 3] = np.nan
    hosts += [rng.standard_normal(64).astype(np.float32) for _ in range(3)] + [np.arange(5, dtype=np.int32)]
    shardings = [fsdp] * 5 + [replicated] * 2 + [replicated] * 3 + [replicated]
    tree = {f"x{i}": jax.device_put(h, s) for i, (h, s) in enumerate(zip(hosts, shardings))}
    tree["key"] = jax.random.key(3)
    groups = integrity._groups(jax.tree.leaves(tree))
    assert sorted(len(g) for g in groups) == [1, 1, 2, 2, 3, 3], groups  # key, int, 2+2 (64,64), 3+3
    summary, _, _ = integrity.summarize(tree)
    for i, host in enumerate(hosts):
        assert summary[f"['x{i}']"]["fp"] == integrity.numpy_fingerprint(host), i
    assert summary["['key']"]["fp"] == integrity.numpy_fingerprint(np.asarray(jax.random.key_data(tree["key"])))
    prints, finite = integrity._fingerprints_and_finite(jax.tree.leaves(tree))
    names = integrity.leaf_names(tree)
    assert [n for n, f in zip(names, finite) if not f] == ["['x4']"]
