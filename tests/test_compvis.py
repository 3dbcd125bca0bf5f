"""CompVis single-file SD checkpoints -> diffusers layout, checked against diffusers/transformers.

Truths used:
* tiny random-weight diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers
  ``CLIPTextModel`` are exported to the CompVis layout by a small inverse mapping written here
  (from the CompVis module structure), and our split must give back exactly their state dicts;
* diffusers' own single-file converters (``diffusers.loaders.single_file_utils``) on the same
  CompVis dict must give the same keys and tensors;
* the OpenCLIP text tower is re-run with ``torch.nn.MultiheadAttention`` on the packed
  ``in_proj`` weights, which must match transformers' CLIPTextModel on our q/k/v split;
* the written diffusers folder must load with ``from_pretrained`` into models whose configs
  and outputs equal the originals'.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_jax.interop import compvis
from ldm_jax.interop.torch_weights import WeightsError

SD1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=64,
    attention_head_dim=8,
)
SD1_VAE = dict(
    sample_size=512,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    latent_channels=4,
    scaling_factor=0.18215,
)
SD1_CLIP = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# SD 2.x-like: 64-wide UNet heads, linear proj_in/out, inpainting in_channels=9, depth-2 transformers,
# and a 24-layer OpenCLIP text tower (diffusers' converter hard-codes dropping resblocks.23).
SD2_UNET = dict(
    sample_size=96,
    in_channels=9,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=[1, 2],
    use_linear_projection=True,
    transformer_layers_per_block=2,
)
SD2_VAE = dict(
    sample_size=768,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,  # not inferable from shapes: passed as an override
    scaling_factor=0.18215,
)
SD2_CLIP = dict(SD1_CLIP, num_hidden_layers=24, hidden_act="gelu", projection_dim=512, intermediate_size=96)
OPEN_CLIP_PROJECTION_DIM = 32


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter so that no two tensors coincide (norms start as ones/zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _strip_text_model(sd: dict) -> dict:
    """transformers >= 5.6 drops CLIPTextModel's ``text_model.`` prefix in state_dict(); compare without it."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------
# Inverse mapping diffusers/transformers -> CompVis, written from the CompVis module structure
# (openaimodel.UNetModel, model.Encoder/Decoder, open_clip.CLIP), independent of the code under test.

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_to_compvis(sd: dict, cfg: dict) -> dict:
    lpb = cfg["layers_per_block"]
    has_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if module in fixed:
            new = fixed[module]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            b, j, name = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * (lpb + 1) + j}.0.{_UNET_RESNET[name]}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", module):
            b, j = int(m[1]), int(m[2])
            new = f"input_blocks.{1 + b * (lpb + 1) + j}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            new = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)$", module):
            new = f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)$", module):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            u, j = int(m[1]), int(m[2])
            new = f"output_blocks.{u * (lpb + 1) + j}.0.{_UNET_RESNET[m[3]]}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", module):
            u, j = int(m[1]), int(m[2])
            new = f"output_blocks.{u * (lpb + 1) + j}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            u = int(m[1])
            new = f"output_blocks.{u * (lpb + 1) + lpb}.{2 if has_attn[u] else 1}.conv"
        else:
            raise AssertionError(f"test inverse mapping misses {key}")
        out[f"model.diffusion_model.{new}.{param}"] = value
    return out


def vae_to_compvis(sd: dict, cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    resnet = {"conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{resnet.get(m[3], m[3])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            new = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{resnet.get(m[3], m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv"
        elif m := re.match(r"(\w+)\.mid_block\.resnets\.(\d)\.(\w+)$", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet.get(m[3], m[3])}"
        elif m := re.match(r"(\w+)\.mid_block\.attentions\.0\.(.+)$", module):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}"
            if m[2] != "group_norm" and param == "weight":
                value = value[:, :, None, None]  # CompVis AttnBlock: 1x1 convs
        elif m := re.match(r"(\w+)\.conv_norm_out$", module):
            new = f"{m[1]}.norm_out"
        elif module in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                        "quant_conv", "post_quant_conv"):
            new = module
        else:
            raise AssertionError(f"test inverse mapping misses {key}")
        out[f"first_stage_model.{new}.{param}"] = value
    return out


def clip_to_compvis(sd: dict) -> dict:
    out = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in _strip_text_model(sd).items()}
    # older checkpoints carry the arange buffer
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def clip_to_open_clip(sd: dict, projection: np.ndarray) -> dict:
    sd = _strip_text_model(sd)
    p = "cond_stage_model.model."
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
        p + "text_projection": projection,
        p + "logit_scale": np.asarray(np.log(1 / 0.07), dtype=np.float32),
    }
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    for n in range(n_layers):
        src, dst = f"encoder.layers.{n}.", f"{p}transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            # nn.MultiheadAttention packs [q; k; v] row-wise
            out[dst + f"attn.in_proj_{param}"] = np.concatenate(
                [sd[src + f"self_attn.{x}_proj.{param}"] for x in "qkv"], axis=0
            )
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{new}.{param}"] = sd[src + f"{old}.{param}"]
    return out


def schedule_buffers(num_timesteps: int = 10) -> dict:
    betas = np.linspace(1e-4, 2e-2, num_timesteps, dtype=np.float32)
    alphas_cumprod = np.cumprod(1 - betas).astype(np.float32)
    out = {"betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1])}
    for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        out[name] = np.random.default_rng(0).random(num_timesteps).astype(np.float32)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Fixtures: one tiny SD1-like and one SD2-like pipeline, shared by the module.


class Pipeline:
    def __init__(self, unet_cfg, vae_cfg, clip_cfg, open_clip: bool, seed: int):
        torch.manual_seed(seed)
        self.unet = _perturbed(UNet2DConditionModel(**unet_cfg), seed)
        self.vae = _perturbed(AutoencoderKL(**vae_cfg), seed + 1)
        self.clip = _perturbed(CLIPTextModel(CLIPTextConfig(**clip_cfg)), seed + 2)
        self.unet_sd, self.vae_sd, self.clip_sd = (_numpy_state(m) for m in (self.unet, self.vae, self.clip))
        self.compvis = {}
        self.compvis.update(unet_to_compvis(self.unet_sd, dict(self.unet.config)))
        self.compvis.update(vae_to_compvis(self.vae_sd, dict(self.vae.config)))
        if open_clip:
            rng = np.random.default_rng(seed)
            projection = rng.standard_normal((clip_cfg["hidden_size"], OPEN_CLIP_PROJECTION_DIM)).astype(np.float32)
            self.compvis.update(clip_to_open_clip(self.clip_sd, projection))
        else:
            self.compvis.update(clip_to_compvis(self.clip_sd))
        self.compvis.update(schedule_buffers())


@pytest.fixture(scope="module")
def sd1():
    return Pipeline(SD1_UNET, SD1_VAE, SD1_CLIP, open_clip=False, seed=0)


@pytest.fixture(scope="module")
def sd2():
    return Pipeline(SD2_UNET, SD2_VAE, SD2_CLIP, open_clip=True, seed=10)


SD2_OVERRIDES = {"vae": {"norm_num_groups": 16}}


def _assert_same_tensors(ours: dict, reference: dict, what: str) -> None:
    assert sorted(ours) == sorted(reference), (
        f"{what}: only ours {sorted(set(ours) - set(reference))[:5]}, "
        f"only reference {sorted(set(reference) - set(ours))[:5]}"
    )
    for key in reference:
        ref = reference[key].detach().numpy() if hasattr(reference[key], "detach") else reference[key]
        assert ours[key].shape == ref.shape, f"{what}: {key} {ours[key].shape} vs {ref.shape}"
        np.testing.assert_array_equal(ours[key], ref, err_msg=f"{what}: {key}")


def _without_last_layer(sd: dict, n_layers: int) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(f"encoder.layers.{n_layers - 1}.")}


# ------------------------------------------------------------------------------------------------
# (a) our split reproduces the original diffusers/transformers state dicts


def test_split_sd1_reproduces_original_diffusers_and_transformers_state_dicts(sd1):
    parts = compvis.split_compvis_state_dict(sd1.compvis)
    _assert_same_tensors(parts["unet"], sd1.unet_sd, "unet")
    _assert_same_tensors(parts["vae"], sd1.vae_sd, "vae")
    assert all(k.startswith("text_model.") for k in parts["text_encoder"])
    _assert_same_tensors(_strip_text_model(parts["text_encoder"]), _strip_text_model(sd1.clip_sd), "text")


def test_split_sd2_reproduces_original_state_dicts_minus_last_open_clip_layer(sd2):
    parts = compvis.split_compvis_state_dict(sd2.compvis)
    _assert_same_tensors(parts["unet"], sd2.unet_sd, "unet")
    _assert_same_tensors(parts["vae"], sd2.vae_sd, "vae")
    expected = _without_last_layer(_strip_text_model(sd2.clip_sd), SD2_CLIP["num_hidden_layers"])
    _assert_same_tensors(_strip_text_model(parts["text_encoder"]), expected, "text")
    # with the last layer kept, the whole 24-layer tower comes back
    full = compvis.split_compvis_state_dict(sd2.compvis, open_clip_skip_last_layer=False)
    _assert_same_tensors(_strip_text_model(full["text_encoder"]), _strip_text_model(sd2.clip_sd), "text full")


def test_infer_configs_reproduce_original_model_configs(sd1, sd2):
    for pipe, overrides, version in ((sd1, None, "v1"), (sd2, SD2_OVERRIDES, "v2")):
        cfg = compvis.infer_configs(pipe.compvis, overrides=overrides)
        assert cfg["version"] == version
        for ours, model in ((cfg["unet"], pipe.unet), (cfg["vae"], pipe.vae)):
            for key, value in ours.items():
                if key.startswith("_"):
                    continue
                ref = model.config[key]
                norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
                assert norm(value) == norm(ref), f"{version} {type(model).__name__}.{key}: {value} vs {ref}"
        clip_cfg = pipe.clip.config
        expected_layers = clip_cfg.num_hidden_layers - (1 if version == "v2" else 0)
        assert cfg["text_encoder"]["num_hidden_layers"] == expected_layers
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                    "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id",
                    "eos_token_id", "pad_token_id", "projection_dim"):
            assert cfg["text_encoder"][key] == getattr(clip_cfg, key), f"{version} text {key}"
    assert cfg["unet"]["in_channels"] == 9 and cfg["unet"]["use_linear_projection"] is True


def test_version_detection_falls_back_to_context_dim_and_validates_override(sd1):
    assert compvis.detect_version(sd1.compvis) == "v1"
    assert compvis.detect_version(sd1.compvis, "v2") == "v2"
    with pytest.raises(ValueError, match="'v3'"):
        compvis.detect_version(sd1.compvis, "v3")
    # UNet-only dicts fall back on the context width; 64 is neither SD1's 768 nor SD2's 1024
    unet_only = {k: v for k, v in sd1.compvis.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(WeightsError, match="attn2.to_k.weight"):
        compvis.detect_version(unet_only)
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert compvis.detect_version({key: np.zeros((64, 1024), np.float32)}) == "v2"
    assert compvis.detect_version({key: np.zeros((64, 768), np.float32)}) == "v1"
    with pytest.raises(ValueError, match="'textencoder'"):
        compvis.infer_configs(sd1.compvis, overrides={"textencoder": {}})


# ------------------------------------------------------------------------------------------------
# (b), (c) diffusers' own single-file converters agree with ours


def _torch_dict(sd: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_matches_diffusers_single_file_unet_and_vae_converters(name, request):
    pipe = request.getfixturevalue(name)
    parts = compvis.split_compvis_state_dict(pipe.compvis)
    checkpoint = _torch_dict(pipe.compvis)
    ref_unet = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config))
    ref_vae = sfu.convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config))
    _assert_same_tensors(parts["unet"], ref_unet, f"{name} unet vs diffusers")
    _assert_same_tensors(parts["vae"], ref_vae, f"{name} vae vs diffusers")


def test_sd1_text_matches_diffusers_convert_ldm_clip_checkpoint(sd1):
    parts = compvis.split_compvis_state_dict(sd1.compvis)
    ref = sfu.convert_ldm_clip_checkpoint(_torch_dict(sd1.compvis))
    ref.pop("text_model.embeddings.position_ids")  # a buffer that CLIPTextModel no longer persists
    _assert_same_tensors(parts["text_encoder"], ref, "clip vs diffusers")


def test_sd2_open_clip_text_matches_diffusers_convert_open_clip_checkpoint(sd2):
    parts = compvis.split_compvis_state_dict(sd2.compvis)
    ref = sfu.convert_open_clip_checkpoint(sd2.clip, _torch_dict(sd2.compvis), prefix="cond_stage_model.model.")
    # diffusers also drops resblocks.23 (SD 2.x's unused last layer) and text_projection
    _assert_same_tensors(parts["text_encoder"], ref, "open clip vs diffusers")


def open_clip_reference(sd: dict, ids: torch.Tensor, n_layers: int, heads: int) -> torch.Tensor:
    """OpenCLIP's text tower (open_clip.Transformer) run with torch.nn.MultiheadAttention on ``in_proj``.

    Returns ``ln_final`` of the output of the first ``n_layers`` residual blocks: [B, L, W].
    """
    t = {k.removeprefix("cond_stage_model.model."): torch.from_numpy(np.asarray(v)) for k, v in sd.items()
         if k.startswith("cond_stage_model.model.")}
    seq = ids.shape[1]
    width = t["token_embedding.weight"].shape[1]
    x = t["token_embedding.weight"][ids] + t["positional_embedding"][:seq]
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    for n in range(n_layers):
        p = f"transformer.resblocks.{n}."
        mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        mha.load_state_dict({
            "in_proj_weight": t[p + "attn.in_proj_weight"],
            "in_proj_bias": t[p + "attn.in_proj_bias"],
            "out_proj.weight": t[p + "attn.out_proj.weight"],
            "out_proj.bias": t[p + "attn.out_proj.bias"],
        })
        h = F.layer_norm(x, (width,), t[p + "ln_1.weight"], t[p + "ln_1.bias"], 1e-5)
        x = x + mha(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (width,), t[p + "ln_2.weight"], t[p + "ln_2.bias"], 1e-5)
        h = F.gelu(F.linear(h, t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"])
    return F.layer_norm(x, (width,), t["ln_final.weight"], t["ln_final.bias"], 1e-5)


# ------------------------------------------------------------------------------------------------
# (f) written diffusers folders load with from_pretrained and reproduce the original models


def _compare_pipelines(pipe: Pipeline, folder, text_reference) -> dict:
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    gen = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    latents = torch.randn(2, cfg.in_channels, 8, 8, generator=gen)
    context = torch.randn(2, 5, cfg.cross_attention_dim, generator=gen)
    t = torch.tensor([3, 700])
    image = torch.randn(1, 3, 16, 16, generator=gen)
    ids = torch.tensor([[0, 5, 17, 999, 3, 1, 1], [0, 42, 999, 1, 1, 1, 1]])
    errors = {}
    with torch.no_grad():
        errors["unet"] = (unet(latents, t, context).sample - pipe.unet(latents, t, context).sample).abs().max()
        ours, ref = vae.encode(image).latent_dist, pipe.vae.encode(image).latent_dist
        errors["vae_encode"] = torch.maximum((ours.mean - ref.mean).abs().max(), (ours.logvar - ref.logvar).abs().max())
        z = torch.randn(1, 4, 8, 8, generator=gen)
        errors["vae_decode"] = (vae.decode(z).sample - pipe.vae.decode(z).sample).abs().max()
        errors["text"] = (clip(ids).last_hidden_state - text_reference(ids)).abs().max()
    return {k: float(v) for k, v in errors.items()}


def test_write_diffusers_folder_sd1_loads_and_matches_original_models(sd1, tmp_path):
    path = tmp_path / "sd1.safetensors"
    save_file(sd1.compvis, str(path))
    configs = compvis.write_diffusers_folder(path, tmp_path / "out")
    assert configs["version"] == "v1"
    errors = _compare_pipelines(sd1, tmp_path / "out", lambda ids: sd1.clip(ids).last_hidden_state)
    assert max(errors.values()) <= 1e-6, errors


def test_write_diffusers_folder_sd2_loads_and_matches_original_and_open_clip_reference(sd2, tmp_path):
    path = tmp_path / "sd2.safetensors"
    save_file(sd2.compvis, str(path))
    compvis.write_diffusers_folder(path, tmp_path / "out", overrides=SD2_OVERRIDES)
    heads = SD2_CLIP["num_attention_heads"]
    n_used = SD2_CLIP["num_hidden_layers"] - 1  # SD 2.x: penultimate layer
    errors = _compare_pipelines(sd2, tmp_path / "out", lambda ids: open_clip_reference(sd2.compvis, ids, n_used, heads))
    assert max(errors.values()) <= 1e-5, errors
    # the same penultimate output from the original 24-layer transformers model
    ids = torch.tensor([[0, 5, 17, 999, 3, 1, 1]])
    clip = CLIPTextModel.from_pretrained(tmp_path / "out", subfolder="text_encoder").eval()
    with torch.no_grad():
        hidden = sd2.clip(ids, output_hidden_states=True).hidden_states[-2]
        text_model = sd2.clip.text_model if hasattr(sd2.clip, "text_model") else sd2.clip  # transformers < 5.6
        final_norm = text_model.final_layer_norm
        np.testing.assert_allclose(clip(ids).last_hidden_state.numpy(), final_norm(hidden).numpy(), atol=1e-5)


def test_write_diffusers_folder_casts_dtype(sd1, tmp_path):
    path = tmp_path / "sd1.safetensors"
    save_file(sd1.compvis, str(path))
    compvis.write_diffusers_folder(path, tmp_path / "out", dtype="float16")
    written = load_file(str(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"))
    _assert_same_tensors(written, {k: v.astype(np.float16) for k, v in sd1.vae_sd.items()}, "fp16 vae")
    vae = AutoencoderKL.from_pretrained(tmp_path / "out", subfolder="vae", torch_dtype=torch.float16)
    assert vae.dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# (d) .ckpt via torch.save + weights_only load, EMA selection


def _with_ema(pipe: Pipeline) -> tuple[dict, dict]:
    """CompVis dict whose raw UNet is perturbed and whose model_ema.* holds the original UNet."""
    sd = dict(pipe.compvis)
    raw = {}
    for key, value in pipe.compvis.items():
        if key.startswith("model.diffusion_model."):
            sd["model_ema." + key[len("model."):].replace(".", "")] = value
            raw[key] = value + np.float32(1.0)
    sd.update(raw)
    sd["model_ema.decay"] = np.asarray(0.9999, np.float32)
    sd["model_ema.num_updates"] = np.asarray(1234, np.int32)
    return sd, raw


def test_ckpt_with_state_dict_wrapper_and_ema_reads_like_diffusers_extract_ema(sd1, tmp_path):
    sd, raw = _with_ema(sd1)
    path = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": _torch_dict(sd), "global_step": 5, "epoch": 1}, path)

    with_ema = compvis.read_compvis_checkpoint(path)
    assert not any(k.startswith("model_ema") for k in with_ema)
    _assert_same_tensors(with_ema, sd1.compvis, "ckpt ema")
    without_ema = compvis.read_compvis_checkpoint(path, use_ema=False)
    _assert_same_tensors(without_ema, {**sd1.compvis, **raw}, "ckpt raw")

    # diffusers' converter flattens EMA keys the same way
    ours = compvis.split_compvis_state_dict(sd)["unet"]
    ref = sfu.convert_ldm_unet_checkpoint(_torch_dict(sd), dict(sd1.unet.config), extract_ema=True)
    _assert_same_tensors(ours, ref, "ema unet vs diffusers")
    _assert_same_tensors(ours, sd1.unet_sd, "ema unet vs original")


def test_incomplete_ema_fails_naming_the_missing_key(sd1):
    sd, _ = _with_ema(sd1)
    del sd["model_ema.diffusion_modelout2weight"]
    with pytest.raises(WeightsError, match="model_ema.diffusion_modelout2weight"):
        compvis.select_ema_weights(sd)
    sd, _ = _with_ema(sd1)
    sd["model_ema.diffusion_modelextraweight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match="model_ema.diffusion_modelextraweight"):
        compvis.select_ema_weights(sd)


# ------------------------------------------------------------------------------------------------
# (e) unknown / missing / malformed keys fail naming the key


@pytest.mark.parametrize(
    "key",
    [
        "model.diffusion_model.input_blocks.1.0.extra.weight",
        "first_stage_model.decoder.up.0.attn.0.q.weight",
        "cond_stage_model.transformer.text_model.pooler.weight",
        "some_controlnet.weight",
    ],
)
def test_unknown_key_fails_naming_it(sd1, key):
    sd = dict(sd1.compvis)
    sd[key] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match=re.escape(key)):
        compvis.split_compvis_state_dict(sd)


@pytest.mark.parametrize(
    "key",
    [
        "first_stage_model.decoder.up.0.block.2.conv2.bias",
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight",
        "model.diffusion_model.input_blocks.3.0.op.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ],
)
def test_missing_key_fails_naming_it(sd1, key):
    sd = dict(sd1.compvis)
    del sd[key]
    with pytest.raises(WeightsError, match=re.escape(key)):
        compvis.split_compvis_state_dict(sd)


def test_unrecognised_layouts_fail_naming_the_key(sd1, sd2):
    sd = dict(sd1.compvis)
    del sd["model.diffusion_model.input_blocks.2.0.in_layers.2.weight"]
    with pytest.raises(WeightsError, match=r"model\.diffusion_model\.input_blocks\.2\.0\."):
        compvis.infer_configs(sd)
    sd = dict(sd1.compvis)
    key = "first_stage_model.encoder.mid.attn_1.q.weight"
    sd[key] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(WeightsError, match=re.escape(key)):
        compvis.split_compvis_state_dict(sd)
    # an OpenCLIP in_proj of the wrong size cannot be split into q/k/v
    sd = dict(sd2.compvis)
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    sd[key] = sd[key][:-1]
    with pytest.raises(WeightsError, match=re.escape(key)):
        compvis.split_compvis_state_dict(sd)
    # both text encoders at once is not an SD 1.x/2.x checkpoint
    with pytest.raises(WeightsError, match="cond_stage_model.model."):
        compvis.infer_configs({**sd1.compvis, **{k: v for k, v in sd2.compvis.items() if k.startswith("cond_stage")}})


def test_known_irrelevant_keys_are_skipped(sd1):
    sd = dict(sd1.compvis)
    sd["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
    sd["first_stage_model.loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)
    sd["scale_factor"] = np.asarray(0.13025, np.float32)
    parts = compvis.split_compvis_state_dict(sd)
    _assert_same_tensors(parts["vae"], sd1.vae_sd, "vae")
    assert compvis.infer_configs(sd)["vae"]["scaling_factor"] == pytest.approx(0.13025)


# ------------------------------------------------------------------------------------------------
# Full-size SD 1.5 / SD 2.1 layouts (shapes only: meta-device models, zero-stride arrays)

SD_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # diffusers' defaults, as in SD 1.x/2.x
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
SD21_UNET = dict(
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=96
)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD21_CLIP = dict(SD15_CLIP, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, hidden_act="gelu")


def _shape_only(model_cls, *args, **kwargs) -> dict:
    with torch.device("meta"):
        model = model_cls(*args, **kwargs)
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_sd_layouts_give_hub_configs_and_are_fully_consumed(version):
    unet_cfg = SD15_UNET if version == "v1" else SD21_UNET
    unet = _shape_only(UNet2DConditionModel, **unet_cfg)
    vae = _shape_only(AutoencoderKL, **SD_VAE)
    clip = _shape_only(CLIPTextModel, CLIPTextConfig(**(SD15_CLIP if version == "v1" else SD21_CLIP)))
    sd = {**unet_to_compvis(unet, {"layers_per_block": 2, "up_block_types": SD_UP_BLOCKS}),
          **vae_to_compvis(vae, SD_VAE)}
    if version == "v1":
        sd.update(clip_to_compvis(clip))
        # sd-v1-5 single files: 686 UNet + 248 VAE + 197 text (incl. position_ids) tensors
        assert len(sd) == 1131
    else:
        sd.update(clip_to_open_clip(clip, np.zeros((1024, 1024), np.float32)))
    cfg = compvis.infer_configs(sd)
    assert cfg["version"] == version
    assert cfg["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["unet"]["layers_per_block"] == 2
    assert cfg["unet"]["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["unet"]["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert cfg["unet"]["transformer_layers_per_block"] == 1
    assert cfg["unet"]["attention_head_dim"] == unet_cfg["attention_head_dim"]
    assert cfg["unet"]["cross_attention_dim"] == unet_cfg["cross_attention_dim"]
    assert cfg["unet"]["use_linear_projection"] is (version == "v2")
    assert cfg["vae"]["block_out_channels"] == [128, 256, 512, 512] and cfg["vae"]["layers_per_block"] == 2
    text = cfg["text_encoder"]
    if version == "v1":
        assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
    else:
        assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (1024, 23, 16)
    parts = compvis.split_compvis_state_dict(sd)
    assert sorted(parts["unet"]) == sorted(unet) and sorted(parts["vae"]) == sorted(vae)
    expected_text = _strip_text_model(clip)
    if version == "v2":
        expected_text = _without_last_layer(expected_text, 24)
    assert sorted(_strip_text_model(parts["text_encoder"])) == sorted(expected_text)
