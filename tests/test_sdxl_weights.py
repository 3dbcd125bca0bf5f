"""SDXL weights in and out: diffusers SDXL folders (fp16 variants included) and Stability's
single-file (sgm) checkpoints.

Truths used:
* tiny random-weight diffusers / transformers SDXL components are exported to the sgm layout by
  the inverse mappings of ``test_compvis`` (written from the CompVis module structure, independent
  of the code under test) plus the two SDXL additions written here (``label_emb`` and OpenCLIP's
  ``text_projection``, applied as ``x @ P``); our split must give back exactly their state dicts;
* diffusers' own single-file converters on the same dict must give the same keys and tensors;
* diffusers' ``StableDiffusionXLPipeline.from_pretrained(..., variant="fp16")`` must load what we
  write, tensor for tensor.
"""

from __future__ import annotations

import copy
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import save_file
from test_compvis import _numpy_state, _perturbed, clip_to_open_clip, unet_to_compvis, vae_to_compvis
from test_sdxl_text import _write_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer as HFCLIPTokenizer

from ldm_jax.interop import sgm
from ldm_jax.interop.diffusers_unet import load_diffusers_unet, save_diffusers_unet
from ldm_jax.interop.diffusers_vae import load_diffusers_autoencoder_kl, save_diffusers_autoencoder_kl
from ldm_jax.interop.torch_weights import WeightsError
from ldm_jax.interop.transformers_clip import load_clip_text_encoder, save_clip_text_encoder
from ldm_jax.models.embeddings import sdxl_time_ids

# 64-wide heads and 32 norm groups, as the single-file config inference assumes (SDXL releases).
CLIP_L = dict(vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
BIG_G = dict(CLIP_L, hidden_size=128, intermediate_size=256, num_attention_heads=2, hidden_act="gelu",
             projection_dim=32)
BASE_UNET = dict(
    sample_size=8, block_out_channels=(64, 128), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64 + 128, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=32 + 6 * 256,
)
REFINER_UNET = dict(
    BASE_UNET, block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2), transformer_layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, projection_class_embeddings_input_dim=32 + 5 * 256,
)
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
           scaling_factor=0.13025, sample_size=1024)


class SDXLParts:
    """Random tiny SDXL components, their state dicts, and the sgm single-file dict built from them."""

    def __init__(self, kind: str, seed: int):
        torch.manual_seed(seed)
        self.kind = kind
        self.unet = _perturbed(UNet2DConditionModel(**(BASE_UNET if kind == "base" else REFINER_UNET)), seed)
        self.vae = _perturbed(AutoencoderKL(**VAE), seed + 1)
        self.te2 = _perturbed(CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G)), seed + 2)
        self.state = {"unet": _numpy_state(self.unet), "vae": _numpy_state(self.vae),
                      "text_encoder_2": _prefixed(_numpy_state(self.te2))}
        unet_sd = {k: v for k, v in self.state["unet"].items() if not k.startswith("add_embedding.")}
        self.sgm = {}
        self.sgm.update(unet_to_compvis(unet_sd, dict(self.unet.config)))
        for i, layer in ((0, "linear_1"), (2, "linear_2")):  # sgm's label_emb = Sequential(Linear, SiLU, Linear)
            for p in ("weight", "bias"):
                self.sgm[f"model.diffusion_model.label_emb.0.{i}.{p}"] = self.state["unet"][f"add_embedding.{layer}.{p}"]
        self.sgm.update(vae_to_compvis(self.state["vae"], dict(self.vae.config)))
        # OpenCLIP computes pooled @ P: transformers' Linear weight is P transposed.
        projection = self.state["text_encoder_2"]["text_projection.weight"].T.copy()
        open_clip = clip_to_open_clip(self.state["text_encoder_2"], projection)
        self.sgm.update({k.replace("cond_stage_model.model.", sgm.OPEN_CLIP_PREFIXES[kind]): v
                         for k, v in open_clip.items()})
        if kind == "base":
            self.te = _perturbed(CLIPTextModel(CLIPTextConfig(**CLIP_L)), seed + 3)
            self.state["text_encoder"] = _prefixed(_numpy_state(self.te))
            for k, v in self.state["text_encoder"].items():
                self.sgm[sgm.CLIP_L_PREFIX + k] = v
            self.sgm[sgm.CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        self.sgm["denoiser.sigmas"] = np.linspace(0.03, 14.6, 10, dtype=np.float32)


def _prefixed(sd: dict) -> dict:
    """transformers >= 5.6 state_dict() drops CLIPTextModel's ``text_model.`` prefix; hub files keep it."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def base():
    return SDXLParts("base", seed=0)


@pytest.fixture(scope="module")
def refiner():
    return SDXLParts("refiner", seed=20)


def _assert_same_tensors(ours: dict, reference: dict, what: str) -> None:
    assert sorted(ours) == sorted(reference), (
        f"{what}: only ours {sorted(set(ours) - set(reference))[:5]}, only reference {sorted(set(reference) - set(ours))[:5]}"
    )
    for key, ref in reference.items():
        ref = ref.detach().numpy() if hasattr(ref, "detach") else ref
        assert ours[key].shape == ref.shape, f"{what}: {key}"
        np.testing.assert_array_equal(ours[key], ref, err_msg=f"{what}: {key}")


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_sgm_split_reproduces_original_state_dicts(name, request):
    parts = request.getfixturevalue(name)
    ours = sgm.split_sgm_state_dict(parts.sgm)
    assert sorted(ours) == sorted(parts.state)
    for component, reference in parts.state.items():
        _assert_same_tensors(ours[component], reference, f"{name} {component}")


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_sgm_split_matches_diffusers_single_file_converters(name, request):
    parts = request.getfixturevalue(name)
    checkpoint = {k: torch.from_numpy(np.asarray(v)) for k, v in parts.sgm.items()}
    ours = sgm.split_sgm_state_dict(parts.sgm)
    _assert_same_tensors(ours["unet"], sfu.convert_ldm_unet_checkpoint(checkpoint, dict(parts.unet.config)), "unet")
    _assert_same_tensors(ours["vae"], sfu.convert_ldm_vae_checkpoint(checkpoint, dict(parts.vae.config)), "vae")
    ref2 = sfu.convert_open_clip_checkpoint(parts.te2, checkpoint, prefix=sgm.OPEN_CLIP_PREFIXES[name])
    _assert_same_tensors(ours["text_encoder_2"], ref2, "text_encoder_2")
    if name == "base":
        ref = sfu.convert_ldm_clip_checkpoint(checkpoint)
        ref.pop("text_model.embeddings.position_ids")  # a buffer diffusers carries along; not a weight
        _assert_same_tensors(ours["text_encoder"], ref, "text_encoder")


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_sgm_folder_loads_in_diffusers_and_ldm_jax(name, request, tmp_path):
    parts = request.getfixturevalue(name)
    path = tmp_path / "sd_xl.safetensors"
    save_file(parts.sgm, str(path))
    configs = sgm.write_diffusers_folder(path, tmp_path / "out", dtype="float16", variant="fp16")
    assert configs["kind"] == name
    out = tmp_path / "out"
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet", variant="fp16")
    for key in ("block_out_channels", "projection_class_embeddings_input_dim", "down_block_types",
                "up_block_types", "cross_attention_dim", "attention_head_dim", "addition_time_embed_dim"):
        assert _listed(unet.config[key]) == _listed(parts.unet.config[key]), key
    # (transformer_layers_per_block may be written differently where a level has no attention:
    # the same tensors below say it builds the same network)
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae", variant="fp16")
    assert vae.config.scaling_factor == pytest.approx(0.13025) and vae.config.force_upcast
    te2 = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2", variant="fp16")
    assert te2.config.projection_dim == 32 and te2.config.num_attention_heads == 2
    for state, reference in ((_numpy_state(unet), parts.state["unet"]),
                             (_prefixed(_numpy_state(te2)), parts.state["text_encoder_2"])):
        assert sorted(state) == sorted(reference)
        for key, value in state.items():
            np.testing.assert_array_equal(value, reference[key].astype(np.float16), err_msg=key)
    # ...and into ldm_jax.
    ours_unet, params = load_diffusers_unet(out / "unet", variant="fp16")
    assert ours_unet.addition_embed_type == "text_time" and ours_unet.num_time_ids == (6 if name == "base" else 1)
    kernel = params["add_embedding"]["linear_1"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(kernel), parts.state["unet"]["add_embedding.linear_1.weight"].astype(np.float16).astype(np.float32).T
    )
    module2, _ = load_clip_text_encoder(out, subfolder="text_encoder_2", variant="fp16")
    assert module2.with_projection
    if name == "base":
        module, _ = load_clip_text_encoder(out, subfolder="text_encoder", variant="fp16")
        assert not module.with_projection and module.config.hidden_act == "quick_gelu"
    model, _ = load_diffusers_autoencoder_kl(out / "vae", variant="fp16")
    assert model.scale_factor == pytest.approx(0.13025)


def _listed(value):
    return [_listed(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_diffusers_sdxl_fp16_folder_round_trips_through_ldm_jax(base, tmp_path):
    """A diffusers SDXL pipeline saved with variant="fp16" -> our loaders -> our savers -> diffusers
    loads the result with the same fp16 tensors in every component."""
    root = tmp_path / "src"
    root.mkdir()
    _write_tokenizer(root / "tokenizer", "<|endoftext|>")
    _write_tokenizer(root / "tokenizer_2", "!")
    copies = {name: copy.deepcopy(getattr(base, name)) for name in ("vae", "te", "te2", "unet")}  # .to() is in place
    pipe = StableDiffusionXLPipeline(
        vae=copies["vae"], text_encoder=copies["te"], text_encoder_2=copies["te2"], unet=copies["unet"],
        tokenizer=HFCLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=HFCLIPTokenizer.from_pretrained(root / "tokenizer_2"), scheduler=EulerDiscreteScheduler(),
    ).to(torch.float16)
    pipe.save_pretrained(root, variant="fp16")
    assert (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (root / "text_encoder_2" / "model.fp16.safetensors").is_file()

    dst = tmp_path / "dst"
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(root / name, dst / name)
    shutil.copy(root / "model_index.json", dst / "model_index.json")
    unet, unet_params = load_diffusers_unet(root, variant="fp16")
    save_diffusers_unet(dst / "unet", unet, unet_params, dtype=np.float16, variant="fp16")
    vae, vae_params = load_diffusers_autoencoder_kl(root / "vae", variant="fp16")
    save_diffusers_autoencoder_kl(vae, vae_params, dst / "vae", sample_size=1024, dtype=np.float16, variant="fp16")
    for sub in ("text_encoder", "text_encoder_2"):
        module, params = load_clip_text_encoder(root, subfolder=sub, variant="fp16")
        save_clip_text_encoder(dst / sub, module.config, params, dtype=np.float16, variant="fp16")

    reloaded = StableDiffusionXLPipeline.from_pretrained(dst, variant="fp16", dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert got.keys() == want.keys(), name
        for key in want:
            assert got[key].dtype == torch.float16 and torch.equal(got[key], want[key]), f"{name}: {key}"
    assert json.loads((dst / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(0.13025)

    # The micro-conditioning row our U-Net takes is the one diffusers' SDXL pipeline builds.
    want = pipe._get_add_time_ids((1024, 768), (16, 32), (896, 1152), dtype=torch.float32,
                                  text_encoder_projection_dim=32)
    np.testing.assert_array_equal(np.asarray(sdxl_time_ids((1024, 768), (16, 32), (896, 1152)))[None], want.numpy())


def _drop(sd: dict, key: str) -> dict:
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(
    "key",
    [
        "model.diffusion_model.label_emb.0.2.bias",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
    ],
)
def test_sgm_missing_key_fails_naming_it(base, key):
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        sgm.split_sgm_state_dict(_drop(base.sgm, key))


def test_sgm_mis_shaped_and_unknown_keys_fail_naming_them(base):
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(WeightsError, match=f"shape mismatch for key '{key}'"):
        sgm.split_sgm_state_dict(dict(base.sgm, **{key: np.zeros((3 * 128, 64), np.float32)}))
    key = "conditioner.embedders.1.model.text_projection"
    with pytest.raises(WeightsError, match=f"for key '{key}'"):
        sgm.split_sgm_state_dict(dict(base.sgm, **{key: np.zeros((64, 32), np.float32)}))
    key = "conditioner.embedders.2.model.weight"
    with pytest.raises(WeightsError, match=f"unexpected key '{key}'"):
        sgm.split_sgm_state_dict(dict(base.sgm, **{key: np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match="conditioner.embedders.0.transformer"):
        sgm.detect_kind({k: v for k, v in base.sgm.items() if not k.startswith(sgm.CLIP_L_PREFIX)})


def test_sharded_fp16_variants_load_like_single_files(base, tmp_path):
    # diffusers / transformers name sharded variants "...safetensors.index.fp16.json".
    base.unet.save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="300KB")
    base.te2.save_pretrained(tmp_path / "te2", variant="fp16", max_shard_size="100KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert (tmp_path / "te2" / "model.safetensors.index.fp16.json").is_file()
    _, unet_params = load_diffusers_unet(tmp_path / "unet", variant="fp16")
    want = base.state["unet"]["up_blocks.0.attentions.1.proj_out.weight"]
    np.testing.assert_array_equal(np.asarray(unet_params["up_blocks_0"]["attentions_1"]["proj_out"]["kernel"]), want.T)
    module, params = load_clip_text_encoder(tmp_path / "te2", variant="fp16")
    assert module.with_projection
    np.testing.assert_array_equal(np.asarray(params["text_projection"]["kernel"]),
                                  base.state["text_encoder_2"]["text_projection.weight"].T)
