"""Model folders: load local diffusers Stable Diffusion folders, and save/load ldm_jax's own.

diffusers folder (``model_index.json``)::

    unet/            UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors|.bin)
    vae/             AutoencoderKL (or VQModel)
    text_encoder/    transformers CLIPTextModel
    tokenizer/       CLIP vocab.json + merges.txt (+ tokenizer_config.json)
    scheduler/scheduler_config.json

The scheduler config gives the noise schedule (``beta_schedule`` / ``trained_betas``,
``num_train_timesteps``, ``rescale_betas_zero_snr``), the prediction type and the sampler
defaults (``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample`` /
``thresholding``, ``use_karras_sigmas``, ``variance_type``). An inpainting U-Net
(``in_channels = 2 x latent + 1``) turns on concat inpainting. Safety checker and feature
extractor are not used.

ldm_jax model folder (format version 1; what :func:`save_model_folder` writes, e.g. at the
end of training): the same layout, every part loadable by diffusers / transformers where
such a class exists, plus ``ldm_jax.json``::

    {
      "format": "ldm_jax.model", "format_version": 1,
      "denoiser": "unet" (unet/ folder) | "dit" | "pixart" (transformer/ folder: diffusers
                  DiTTransformer2DModel / PixArtTransformer2DModel); absent: "unet",
      "objective": "ddpm" | "flow" (absent: "ddpm"),
      "schedule": {make_schedule keyword arguments} (flow: make_flow_schedule's),
      "prediction": "eps" | "v" | "x0" (flow: "velocity" | "eps" | "x0"),
      "sampler_defaults": {"spacing": ..., "steps_offset": ..., ...},
      "concat": null | "inpainting" | "low_res",
      "first_stage": {"kind": "kl" | "vq"} (vae/ folder) | {"kind": "identity", "channels": C},
      "conditioning": {"kind": "none"}
                    | {"kind": "class", "num_classes": K, "embedder": null | "class_embedder"}
                    | {"kind": "text", "encoder": "clip", "context_layer": ..., "context_final_norm": ...}
                    | {"kind": "text", "encoder": "text_transformer", "tokenizer": "byte", "max_length": L},
      "provenance": {"step": ..., "params_hash": ..., "created": ..., ...}
    }

Conditioning modules without a diffusers/transformers class (``TextTransformer``,
``ClassEmbedder``) live in ``conditioner/``: ``config.json`` (the module's attributes) and
``model.safetensors`` (parameters keyed by their Flax path joined with "/"). A
``model_index.json`` is written only when the folder is a Stable Diffusion pipeline diffusers
can load (KL autoencoder, CLIP text encoder, no or inpainting concat).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.interop.diffusers_dit import load_diffusers_dit, save_diffusers_dit
from ldm_jax.interop.diffusers_unet import load_diffusers_unet, save_diffusers_unet
from ldm_jax.interop.diffusers_vae import save_diffusers_autoencoder_kl, save_diffusers_vq_model
from ldm_jax.interop.torch_weights import StateDict, load_state_dict, save_state_dict
from ldm_jax.interop.transformers_clip import load_clip_text_encoder, save_clip_text_encoder
from ldm_jax.interop.diffusers_vae import load_diffusers_autoencoder_kl
from ldm_jax.ldm.conditioning import (
    ClassConditioner,
    TextConditioner,
    Unconditional,
    load_clip_tokenizer,
    load_sdxl_conditioner,
)
from ldm_jax.ldm.first_stage import KLFirstStage, PixelSpace, load_autoencoder_folder
from ldm_jax.models.clip import CLIPTextEncoder
from ldm_jax.models.conditioning import ClassEmbedder, TextTransformer
from ldm_jax.models.dit import DiT
from ldm_jax.models.pixart import PixArtDiT
from ldm_jax.models.tokenizers import ByteTokenizer, CLIPTokenizer
from ldm_jax.models.unet import UNet

FORMAT = "ldm_jax.model"
FORMAT_VERSION = 1
LDM_JAX_JSON = "ldm_jax.json"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")

_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_CONDITIONER_MODULES = {"TextTransformer": TextTransformer, "ClassEmbedder": ClassEmbedder}
# ldm_jax.json "denoiser" -> (module class, subfolder); the folders are diffusers' own layouts.
DENOISER_FOLDERS = {"unet": (UNet, "unet"), "dit": (DiT, "transformer"), "pixart": (PixArtDiT, "transformer")}
OBJECTIVES = ("ddpm", "flow")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def _write_json(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------- scheduler config


def read_scheduler_config(config: Mapping[str, Any]) -> tuple[dict, str, dict]:
    """A diffusers scheduler config -> (``make_schedule`` kwargs, prediction, sampler defaults).

    Keys a config omits take the scheduler class's diffusers default; a missing
    ``timestep_spacing`` leaves each sampler its own default spacing, as diffusers does when a
    config is loaded into another scheduler class.
    """
    cls = config.get("_class_name", "DDIMScheduler")
    num_timesteps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        schedule: dict[str, Any] = {"betas": [float(b) for b in config["trained_betas"]]}
    else:
        beta_schedule = config.get("beta_schedule", "linear")
        if beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; expected one of {sorted(_BETA_SCHEDULES)}")
        kind = _BETA_SCHEDULES[beta_schedule]
        schedule = {"kind": kind, "num_timesteps": num_timesteps}
        if kind != "cosine":
            schedule["beta_start"] = float(config.get("beta_start", 0.0001))
            schedule["beta_end"] = float(config.get("beta_end", 0.02))
    if config.get("rescale_betas_zero_snr", False):
        schedule["rescale_to_zero_terminal_snr"] = True
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in _PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {sorted(_PREDICTIONS)}")

    defaults: dict[str, Any] = {"steps_offset": int(config.get("steps_offset", 0))}
    if config.get("timestep_spacing") is not None:
        defaults["spacing"] = config["timestep_spacing"]
    if "set_alpha_to_one" in config or cls in ("DDIMScheduler", "PNDMScheduler"):
        defaults["set_alpha_to_one"] = bool(config.get("set_alpha_to_one", cls == "DDIMScheduler"))
    if config.get("thresholding", False):
        defaults.update(
            thresholding="dynamic",
            threshold_percentile=float(config.get("dynamic_thresholding_ratio", 0.995)),
            threshold_max=float(config.get("sample_max_value", 1.0)),
        )
    elif config.get("clip_sample", cls in ("DDIMScheduler", "DDPMScheduler")):
        defaults.update(thresholding="static", threshold_max=float(config.get("clip_sample_range", 1.0)))
    if config.get("use_karras_sigmas", False):
        defaults["karras_sigmas"] = True
    variance_type = config.get("variance_type")
    if variance_type in ("fixed_large", "fixed_large_log"):
        defaults["variance"] = "fixed_large"
    return schedule, _PREDICTIONS[prediction_type], defaults


def write_flow_scheduler_config(schedule: Mapping[str, Any]) -> dict:
    """A ``FlowMatchEulerDiscreteScheduler`` config equivalent to a flow schedule
    (``make_flow_schedule`` keyword arguments; omitted ones take their defaults)."""
    get = lambda key, default: schedule.get(key, default)  # noqa: E731
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": int(get("num_train_timesteps", 1000)),
        "shift": float(get("shift", 1.0)),
        "use_dynamic_shifting": bool(get("dynamic_shifting", False)),
        "base_shift": float(get("base_shift", 0.5)),
        "max_shift": float(get("max_shift", 1.15)),
        "base_image_seq_len": int(get("base_seq_len", 256)),
        "max_image_seq_len": int(get("max_seq_len", 4096)),
        "time_shift_type": str(get("time_shift_type", "exponential")),
        "shift_terminal": get("shift_terminal", None),
    }


def write_scheduler_config(schedule: Mapping[str, Any], prediction: str, defaults: Mapping[str, Any]) -> dict:
    """A ``DDIMScheduler`` config equivalent to our schedule, prediction and DDIM defaults."""
    inverse = {v: k for k, v in _BETA_SCHEDULES.items()}
    config: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[prediction],
        "rescale_betas_zero_snr": bool(schedule.get("rescale_to_zero_terminal_snr", False)),
        "set_alpha_to_one": bool(defaults.get("set_alpha_to_one", True)),
        "steps_offset": int(defaults.get("steps_offset", 0)),
        "timestep_spacing": defaults.get("spacing") or "leading",
        "clip_sample": defaults.get("thresholding") == "static",
        "clip_sample_range": float(defaults.get("threshold_max", 1.0)),
        "thresholding": defaults.get("thresholding") == "dynamic",
        "dynamic_thresholding_ratio": float(defaults.get("threshold_percentile", 0.995)),
        "sample_max_value": float(defaults.get("threshold_max", 1.0)),
    }
    if schedule.get("betas") is not None:
        betas = [float(b) for b in schedule["betas"]]
        config.update(num_train_timesteps=len(betas), beta_schedule="linear", trained_betas=betas)
    else:
        kind = schedule.get("kind", "linear")
        start, end = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}.get(kind, (1e-4, 0.02))
        config.update(
            num_train_timesteps=int(schedule.get("num_timesteps", 1000)),
            beta_schedule=inverse[kind],
            beta_start=float(schedule.get("beta_start") or start),
            beta_end=float(schedule.get("beta_end") or end),
            trained_betas=None,
        )
    return config


# ----------------------------------------------------------------------------- conditioner modules


def _module_attributes(module: nn.Module) -> dict:
    skip = {"parent", "name", "dtype", "param_dtype"}
    return {f.name: getattr(module, f.name) for f in module.__dataclass_fields__.values() if f.name not in skip}


def save_conditioner_module(folder: str, module: nn.Module, params) -> None:
    """``config.json`` (class and attributes) + ``model.safetensors`` (params by "/"-joined path)."""
    name = type(module).__name__
    if name not in _CONDITIONER_MODULES:
        raise ValueError(f"cannot save conditioner module {name}; expected one of {sorted(_CONDITIONER_MODULES)}")
    os.makedirs(folder, exist_ok=True)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    save_state_dict(
        {"/".join(path): np.asarray(jax.device_get(v), np.float32) for path, v in flat.items()},
        os.path.join(folder, "model.safetensors"),
    )
    _write_json({"class": name, "attributes": _module_attributes(module)}, os.path.join(folder, "config.json"))


def load_conditioner_module(folder: str, dtype=jnp.float32) -> tuple[nn.Module, dict]:
    """Inverse of :func:`save_conditioner_module`; WeightsError names a missing, extra or
    mis-shaped tensor."""
    config = _read_json(os.path.join(folder, "config.json"))
    name = config.get("class")
    if name not in _CONDITIONER_MODULES:
        raise ValueError(f"unknown conditioner class {name!r} in {folder}; expected one of {sorted(_CONDITIONER_MODULES)}")
    module = _CONDITIONER_MODULES[name](**config["attributes"], dtype=dtype)
    if isinstance(module, ClassEmbedder):
        dummy = (jnp.zeros((1,), jnp.int32),)
    else:
        dummy = (jnp.zeros((1, module.max_length), jnp.int32), jnp.ones((1, module.max_length), bool))
    abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *dummy)))["params"]
    path = os.path.join(folder, "model.safetensors")
    state = StateDict(load_state_dict(path), source=path)
    flat = {p: jnp.asarray(state.take("/".join(p), leaf.shape), leaf.dtype) for p, leaf in
            traverse_util.flatten_dict(abstract).items()}
    state.finish()
    return module, traverse_util.unflatten_dict(flat)


def _save_clip_tokenizer(tokenizer: CLIPTokenizer, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer.encoder, f, ensure_ascii=False)
    merges = sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for (a, b), _ in merges)
    specials = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
    }
    decoder = {
        str(tokenizer.encoder[t]): {
            "content": t, "lstrip": False, "normalized": t in tokenizer.normalized_special_tokens,
            "rstrip": False, "single_word": False, "special": True,
        }
        for t in set(specials.values())
    }
    _write_json(
        {**specials, "model_max_length": tokenizer.max_length, "tokenizer_class": "CLIPTokenizer",
         "added_tokens_decoder": decoder, "do_lower_case": True},
        os.path.join(folder, "tokenizer_config.json"),
    )


# ----------------------------------------------------------------------------- loading


def read_model_folder(folder: str | os.PathLike, *, dtype: Any = jnp.float32, variant: str | None = None) -> dict:
    """``LatentDiffusionPipeline`` keyword arguments of an ldm_jax model folder
    (``ldm_jax.json``) or a local diffusers Stable Diffusion folder (``model_index.json``);
    ``ldm_jax.pipeline.load_model_folder`` builds the pipeline from them.

    ``dtype`` is the compute dtype of every module (parameters stay float32). Raises
    FileNotFoundError for a missing folder or file and ValueError for unsupported content,
    each naming it. ``variant`` (e.g. "fp16") reads a diffusers folder's variant weight files.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    for name, components in ((LDM_JAX_JSON, _ldm_jax_components), (MODEL_INDEX, _diffusers_components)):
        if os.path.isfile(os.path.join(folder, name)):
            try:
                if components is _diffusers_components:
                    return components(folder, dtype, variant)
                return components(folder, dtype)
            except KeyError as e:  # a config file without an entry the format requires
                raise ValueError(f"a config file in {folder} lacks the entry {e}") from None
    raise FileNotFoundError(f"{folder} holds neither {LDM_JAX_JSON} nor {MODEL_INDEX}")


def _component(index: Mapping, name: str) -> str | None:
    entry = index.get(name)
    if not entry or entry[0] is None:
        return None
    return entry[1]


def _concat_kind(unet, latent_channels: int, source: str) -> str | None:
    if unet.in_channels == latent_channels:
        return None
    if unet.in_channels == 2 * latent_channels + 1:
        return "inpainting"
    raise ValueError(
        f"unsupported U-Net in_channels={unet.in_channels} in {source} "
        f"(expected {latent_channels}, or {2 * latent_channels + 1} for inpainting)"
    )


def _diffusers_components(folder: str, dtype, variant: str | None = None) -> dict:
    """``LatentDiffusionPipeline`` keyword arguments from a diffusers Stable Diffusion (1.x, 2.x
    or XL: base, refiner, inpainting) folder."""
    index = _read_json(os.path.join(folder, MODEL_INDEX))
    for name, expected in (("unet", ("UNet2DConditionModel",)), ("vae", ("AutoencoderKL", "VQModel"))):
        found = _component(index, name)
        if found not in expected:
            raise ValueError(f"{MODEL_INDEX} in {folder}: component {name!r} is {found!r}, expected one of {expected}")
    unet, unet_params = load_diffusers_unet(os.path.join(folder, "unet"), dtype=dtype, variant=variant)
    if variant:
        vae, vae_params = load_diffusers_autoencoder_kl(os.path.join(folder, "vae"), dtype=dtype, variant=variant)
        first_stage, first_stage_variables = KLFirstStage(vae), {"params": vae_params}
    else:
        first_stage, first_stage_variables = load_autoencoder_folder(os.path.join(folder, "vae"), dtype)
    text_encoder = _component(index, "text_encoder")
    conditioner, conditioner_params = Unconditional(), None
    if _component(index, "text_encoder_2") is not None:
        # SDXL (base: both encoders; refiner: only text_encoder_2)
        conditioner, conditioner_params = load_sdxl_conditioner(folder, dtype=dtype, variant=variant)
    elif text_encoder is not None:
        if text_encoder != "CLIPTextModel":
            raise ValueError(f"unsupported text encoder {text_encoder!r} in {folder} (only CLIPTextModel)")
        encoder, conditioner_params = load_clip_text_encoder(os.path.join(folder, "text_encoder"), dtype=dtype)
        tokenizer = load_clip_tokenizer(os.path.join(folder, "tokenizer"))
        conditioner = TextConditioner(tokenizer, encoder)
    elif unet.num_classes is not None:
        conditioner = ClassConditioner(unet.num_classes)
    schedule, prediction, defaults = read_scheduler_config(_read_json(os.path.join(folder, SCHEDULER_CONFIG)))
    return dict(
        unet=unet,
        unet_params=unet_params,
        first_stage=first_stage,
        first_stage_variables=first_stage_variables,
        conditioner=conditioner,
        conditioner_params=conditioner_params,
        schedule=schedule,
        prediction=prediction,
        concat=_concat_kind(unet, first_stage.latent_channels, folder),
        sampler_defaults=defaults,
        info={"source": folder, "format": "diffusers", "pipeline_class": index.get("_class_name")},
    )


def _ldm_jax_components(folder: str, dtype) -> dict:
    """``LatentDiffusionPipeline`` keyword arguments from an ldm_jax model folder."""
    spec = _read_json(os.path.join(folder, LDM_JAX_JSON))
    if spec.get("format") != FORMAT or spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{LDM_JAX_JSON} in {folder} has format {spec.get('format')!r} version {spec.get('format_version')!r}; "
            f"this ldm_jax reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    family = spec.get("denoiser", "unet")
    if family not in DENOISER_FOLDERS:
        raise ValueError(f"unknown denoiser {family!r} in {LDM_JAX_JSON}; expected one of {sorted(DENOISER_FOLDERS)}")
    objective = spec.get("objective", "ddpm")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} in {LDM_JAX_JSON}; expected one of {OBJECTIVES}")
    cls, subfolder = DENOISER_FOLDERS[family]
    if cls is UNet:
        unet, unet_params = load_diffusers_unet(os.path.join(folder, subfolder), dtype=dtype)
    else:
        unet, unet_params = load_diffusers_dit(os.path.join(folder, subfolder), dtype=dtype)
        if not isinstance(unet, cls):
            raise ValueError(f"{LDM_JAX_JSON} says denoiser {family!r} but {subfolder}/ holds a {type(unet).__name__}")
    first = spec["first_stage"]
    if first["kind"] == "identity":
        first_stage, first_stage_variables = PixelSpace(int(first["channels"])), None
    elif first["kind"] in ("kl", "vq"):
        first_stage, first_stage_variables = load_autoencoder_folder(os.path.join(folder, "vae"), dtype)
        if first_stage.kind != first["kind"]:
            raise ValueError(f"{LDM_JAX_JSON} says first stage {first['kind']!r} but vae/ holds {first_stage.kind!r}")
    else:
        raise ValueError(f"unknown first_stage kind {first['kind']!r} in {LDM_JAX_JSON}")

    cond = spec["conditioning"]
    conditioner, conditioner_params = Unconditional(), None
    if cond["kind"] == "class":
        embedder = None
        if cond.get("embedder") == "class_embedder":
            embedder, conditioner_params = load_conditioner_module(os.path.join(folder, "conditioner"), dtype)
        conditioner = ClassConditioner(int(cond["num_classes"]), embedder)
    elif cond["kind"] == "text" and cond.get("encoder") == "clip":
        encoder, conditioner_params = load_clip_text_encoder(
            os.path.join(folder, "text_encoder"), dtype=dtype,
            context_layer=cond.get("context_layer", "last"), context_final_norm=cond.get("context_final_norm", True),
        )
        conditioner = TextConditioner(load_clip_tokenizer(os.path.join(folder, "tokenizer")), encoder)
    elif cond["kind"] == "text" and cond.get("encoder") == "text_transformer":
        if cond.get("tokenizer", "byte") != "byte":
            raise ValueError(f"unsupported tokenizer {cond.get('tokenizer')!r} for text_transformer (only 'byte')")
        encoder, conditioner_params = load_conditioner_module(os.path.join(folder, "conditioner"), dtype)
        conditioner = TextConditioner(ByteTokenizer(int(cond.get("max_length", encoder.max_length))), encoder)
    elif cond["kind"] == "sdxl":
        conditioner, conditioner_params = load_sdxl_conditioner(folder, dtype=dtype, aesthetic=bool(cond["aesthetic"]))
        conditioner = dataclasses.replace(
            conditioner, force_zeros_for_empty_prompt=bool(cond.get("force_zeros_for_empty_prompt", True))
        )
    elif cond["kind"] != "none":
        raise ValueError(f"unknown conditioning {cond!r} in {LDM_JAX_JSON}")
    return dict(
        unet=unet,
        unet_params=unet_params,
        first_stage=first_stage,
        first_stage_variables=first_stage_variables,
        conditioner=conditioner,
        conditioner_params=conditioner_params,
        schedule=spec["schedule"],
        prediction=spec["prediction"],
        objective=objective,
        concat=spec.get("concat"),
        sampler_defaults=spec.get("sampler_defaults", {}),
        info={"source": folder, "format": "ldm_jax", **spec.get("provenance", {})},
    )


# ----------------------------------------------------------------------------- saving


def _conditioning_spec(conditioner) -> dict:
    if conditioner.kind == "sdxl":
        return {"kind": "sdxl", "aesthetic": bool(conditioner.aesthetic),
                "force_zeros_for_empty_prompt": bool(conditioner.force_zeros_for_empty_prompt)}
    if isinstance(conditioner, Unconditional):
        return {"kind": "none"}
    if isinstance(conditioner, ClassConditioner):
        return {
            "kind": "class",
            "num_classes": int(conditioner.num_classes),
            "embedder": None if conditioner.embedder is None else "class_embedder",
        }
    if isinstance(conditioner.encoder, CLIPTextEncoder):
        if not isinstance(conditioner.tokenizer, CLIPTokenizer):
            raise ValueError("a CLIP text encoder is saved with a CLIPTokenizer")
        return {
            "kind": "text",
            "encoder": "clip",
            "context_layer": conditioner.encoder.context_layer,
            "context_final_norm": conditioner.encoder.context_final_norm,
        }
    if not isinstance(conditioner.tokenizer, ByteTokenizer):
        raise ValueError("a TextTransformer is saved with a ByteTokenizer")
    return {"kind": "text", "encoder": "text_transformer", "tokenizer": "byte",
            "max_length": conditioner.tokenizer.max_length}


def save_model_folder(
    pipe: Any,
    folder: str | os.PathLike,
    *,
    step: int | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``pipe`` (a ``LatentDiffusionPipeline``) as an ldm_jax model folder (see the module docstring) and return its path.

    ``step`` (the training step) and ``provenance`` (e.g. ``{"workdir": ..., "config": ...}``,
    JSON-serialisable) are recorded with the parameters' hash. The folder is written next to
    its destination and renamed into place, so a crash never leaves a half-written model.
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not overwrite:
        raise ValueError(f"model folder {folder} already exists (pass overwrite=True to replace it)")
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    params = pipe.params
    family = {DiT: "dit", PixArtDiT: "pixart"}.get(type(pipe.unet), "unet")
    subfolder = os.path.join(tmp, DENOISER_FOLDERS[family][1])
    if family == "unet":
        save_diffusers_unet(subfolder, pipe.unet, params["unet"])
    else:
        save_diffusers_dit(subfolder, pipe.unet, params["unet"])
    objective = getattr(pipe, "objective", "ddpm")
    fs = pipe.first_stage
    if fs.kind == "kl":
        save_diffusers_autoencoder_kl(fs.module, params["first_stage"]["params"], os.path.join(tmp, "vae"))
        first_spec = {"kind": "kl"}
    elif fs.kind == "vq":
        save_diffusers_vq_model(fs.module, params["first_stage"], os.path.join(tmp, "vae"))
        first_spec = {"kind": "vq"}
    else:
        first_spec = {"kind": "identity", "channels": fs.channels}

    conditioner = pipe.conditioner
    cond_spec = _conditioning_spec(conditioner)
    if cond_spec["kind"] == "sdxl":
        pairs = [("text_encoder_2", "tokenizer_2", conditioner.encoder_2, conditioner.tokenizer_2)]
        if conditioner.encoder is not None:
            pairs.insert(0, ("text_encoder", "tokenizer", conditioner.encoder, conditioner.tokenizer))
        for enc_dir, tok_dir, encoder, tokenizer in pairs:
            save_clip_text_encoder(os.path.join(tmp, enc_dir), encoder.config, params["conditioner"][enc_dir])
            _save_clip_tokenizer(tokenizer, os.path.join(tmp, tok_dir))
    elif cond_spec["kind"] == "text" and cond_spec["encoder"] == "clip":
        save_clip_text_encoder(os.path.join(tmp, "text_encoder"), conditioner.encoder.config, params["conditioner"])
        _save_clip_tokenizer(conditioner.tokenizer, os.path.join(tmp, "tokenizer"))
    elif cond_spec["kind"] == "text":
        save_conditioner_module(os.path.join(tmp, "conditioner"), conditioner.encoder, params["conditioner"])
    elif cond_spec["kind"] == "class" and conditioner.embedder is not None:
        save_conditioner_module(os.path.join(tmp, "conditioner"), conditioner.embedder, params["conditioner"])

    if objective == "flow":
        scheduler_config = write_flow_scheduler_config(pipe.schedule_config)
    else:
        scheduler_config = write_scheduler_config(pipe.schedule_config, pipe.prediction, pipe.sampler_defaults)
    _write_json(scheduler_config, os.path.join(tmp, SCHEDULER_CONFIG))
    sd_folder = family == "unet" and objective == "ddpm"
    if sd_folder and fs.kind == "kl" and cond_spec["kind"] == "sdxl" and pipe.concat in (None, "inpainting"):
        refiner = conditioner.encoder is None
        name = "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
        if pipe.concat == "inpainting":
            name = "StableDiffusionXLInpaintPipeline"
        text = {} if refiner else {"text_encoder": ["transformers", "CLIPTextModel"],
                                   "tokenizer": ["transformers", "CLIPTokenizer"]}
        _write_json(
            {
                "_class_name": name,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": [None, None],
                "tokenizer": [None, None],
                **text,
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "force_zeros_for_empty_prompt": cond_spec["force_zeros_for_empty_prompt"],
                **({"requires_aesthetics_score": cond_spec["aesthetic"]} if refiner or pipe.concat else {}),
            },
            os.path.join(tmp, MODEL_INDEX),
        )
    elif sd_folder and fs.kind == "kl" and cond_spec.get("encoder") == "clip" and pipe.concat in (None, "inpainting"):
        pipeline_class = "StableDiffusionPipeline" if pipe.concat is None else "StableDiffusionInpaintPipeline"
        _write_json(
            {
                "_class_name": pipeline_class,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            os.path.join(tmp, MODEL_INDEX),
        )
    record = {
        "step": step,
        "params_hash": pipe.params_hash,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **dict(provenance or {}),
    }
    _write_json(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "denoiser": family,
            "objective": objective,
            "schedule": pipe.schedule_config,
            "prediction": pipe.prediction,
            "sampler_defaults": pipe.sampler_defaults,
            "concat": pipe.concat,
            "first_stage": first_spec,
            "conditioning": cond_spec,
            "provenance": record,
        },
        os.path.join(tmp, LDM_JAX_JSON),
    )
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
