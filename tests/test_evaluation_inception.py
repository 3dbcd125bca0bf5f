"""FID Inception-v3 against pytorch-fid's InceptionV3 with random weights (no download)."""

import importlib
import numpy as np
import pytest

torch = importlib.import_module("torch")
pytorch_fid_inception = importlib.import_module("pytorch_fid.inception")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ldm_jax.evaluation.inception import FIDInceptionV3, resize_bilinear  # noqa: E402
from ldm_jax.evaluation.inception_weights import (  # noqa: E402
    WeightsError,
    load_inception,
    random_state_dict,
    variables_from_state_dict,
)


def _reference_fid_network(state_dict):
    """pytorch-fid's ``fid_inception_v3`` network built without its download (the same block
    substitutions), loaded with ``state_dict`` (strict)."""
    import torchvision

    m = pytorch_fid_inception
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = m.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = m.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = m.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = m.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = m.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = m.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = m.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = m.FIDInceptionE_1(1280)
    net.Mixed_7c = m.FIDInceptionE_2(2048)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def reference():
    """(state dict, pytorch-fid InceptionV3 wrapper (resize + normalize + pool3), torch fc)."""
    state = random_state_dict(seed=0)
    net = _reference_fid_network(state)
    original = pytorch_fid_inception.fid_inception_v3
    pytorch_fid_inception.fid_inception_v3 = lambda: net  # its only download; everything else is theirs
    try:
        wrapper = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    finally:
        pytorch_fid_inception.fid_inception_v3 = original
    return state, wrapper, net.fc


@pytest.fixture(scope="module")
def flax_model(reference):
    state, _, _ = reference
    variables = variables_from_state_dict(state)
    module = FIDInceptionV3()
    return module, variables


def _relative_error(ours, theirs):
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def test_state_dict_keys_match_pytorch_fid_network(reference):
    state, _, _ = reference
    torch_keys = set(_reference_fid_network(state).state_dict()) - {k for k in state if "num_batches" in k}
    torch_keys = {k for k in torch_keys if not k.endswith("num_batches_tracked")}
    assert torch_keys == set(state)


def test_resize_matches_torch_interpolate_bilinear():
    rng = np.random.default_rng(0)
    for size in (37, 512):
        x = rng.uniform(size=(1, size, size + 3, 3)).astype(np.float32)
        ours = np.asarray(resize_bilinear(jnp.asarray(x), 299))
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, theirs, atol=2e-6)


def test_pool3_and_logits_match_pytorch_fid_at_299(reference, flax_model):
    """The published protocol end to end: 64x64 inputs in [0, 1], resized to 299 inside."""
    _, wrapper, fc = reference
    module, variables = flax_model
    x = np.random.default_rng(2).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        pool3 = wrapper(torch.from_numpy(x).permute(0, 3, 1, 2))[0][:, :, 0, 0]
        logits = fc(pool3).numpy()
        pool3 = pool3.numpy()
    out = jax.jit(lambda v, im: module.apply(v, im))(variables, x)
    err_pool3 = _relative_error(np.asarray(out.pool3), pool3)
    err_logits = _relative_error(np.asarray(out.logits), logits)
    bias = fc.bias.detach().numpy()
    err_unbiased = _relative_error(np.asarray(out.logits_unbiased), logits - bias)
    print(f"\nInception parity at 299: pool3 rel {err_pool3:.2e}, logits rel {err_logits:.2e}, "
          f"unbiased logits rel {err_unbiased:.2e}; pool3 max |ref| {np.abs(pool3).max():.3g}")
    assert np.abs(pool3).max() > 1e-2  # the random network is not degenerate
    assert err_pool3 < 1e-4 and err_logits < 1e-4 and err_unbiased < 1e-4


def test_load_inception_reads_pth_and_safetensors(tmp_path, reference):
    from ldm_jax.interop.torch_weights import save_state_dict

    state, _, _ = reference
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "pt_inception.pth")
    save_state_dict(state, tmp_path / "inception.safetensors")
    _, from_pth = load_inception(tmp_path / "pt_inception.pth")
    _, from_st = load_inception(tmp_path / "inception.safetensors")
    np.testing.assert_array_equal(np.asarray(from_pth["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]),
                                  state["Mixed_7c.branch_pool.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(from_st["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"]),
                                  state["Conv2d_1a_3x3.bn.running_var"])


def test_load_inception_names_bad_keys(tmp_path, reference):
    state, _, _ = reference
    broken = dict(state)
    del broken["fc.bias"]
    with pytest.raises(WeightsError, match="fc.bias"):
        variables_from_state_dict(broken)
    broken = dict(state, extra=np.zeros(1, np.float32))
    with pytest.raises(WeightsError, match="extra"):
        variables_from_state_dict(broken)
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        load_inception(tmp_path / "missing.pth")


def test_convert_inception_script_round_trips_pth(tmp_path, reference):
    import importlib.util
    import pathlib

    from ldm_jax.interop.torch_weights import load_state_dict

    state, _, _ = reference
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "in.pth")
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_inception.py"
    spec = importlib.util.spec_from_file_location("convert_inception", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path / "in.pth"), str(tmp_path / "out.safetensors")]) == 0
    converted = load_state_dict(tmp_path / "out.safetensors")
    assert set(converted) == set(state)
    for key in ("fc.weight", "Mixed_6e.branch7x7dbl_5.bn.running_mean"):
        np.testing.assert_array_equal(converted[key], state[key])
    assert mod.main([str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 2
