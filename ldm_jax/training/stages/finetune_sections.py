"""Config sections of the fine-tuning stage (``config.stage = "finetune"``), JAX-free so configs
can import them (``configs/lora_*.py``, ``configs/dreambooth_*.py``).

* ``config.finetune``: the base model folder and the method (``"lora"`` or ``"full"``);
* ``config.lora``: rank, alpha and target patterns (``ldm_jax.models.lora.LoraConfig``);
* ``config.dreambooth``: instance images + prompt, prior preservation with class images the
  base model generates before training.

The model itself (U-Net, first stage, conditioner, schedule, prediction) comes from the base
folder, so a fine-tuning config has no ``unet`` / ``first_stage`` / ``conditioning`` sections.
"""

from __future__ import annotations

import ml_collections

# peft / diffusers spellings (ldm_jax.models.lora's presets, repeated here: configs stay JAX-free).
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_CONV_TARGETS = (
    "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj",
    "downsamplers.0.conv", "upsamplers.0.conv",
)
TEXT_ENCODER_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
METHODS = ("lora", "full")


def finetune_defaults() -> ml_collections.ConfigDict:
    """``config.finetune``."""
    return ml_collections.ConfigDict(
        {
            # An ldm_jax model folder (ldm_jax.json, e.g. <workdir>/model of a diffusion run) or a
            # local diffusers Stable Diffusion folder (model_index.json).
            "base": "",
            "method": "lora",  # "lora": train LoRA factors only; "full": every U-Net weight
            # Also adapt (lora) / train (full) the conditioner: the text encoder (CLIP or the
            # from-scratch TextTransformer) or the class embedder.
            "train_conditioner": False,
            "dtype": "float32",  # compute dtype of the loaded modules (params stay float32)
            "weighting": "simple",  # "simple" | "min_snr" (schedule and prediction: the base's)
            "min_snr_gamma": 5.0,
            "drop_prob": 0.0,  # probability of the null condition (classifier-free guidance)
            "sample_posterior": True,  # KL first stages: train on posterior samples (else the mean)
            "scale_factor": 0.0,  # > 0 overrides the base folder's latent scale factor
            "export_merged": True,  # lora: also export the merged model folder (<export>/merged)
        }
    )


def lora_defaults() -> ml_collections.ConfigDict:
    """``config.lora``: ``target_modules`` is a tuple of module names (peft's suffix match) or one
    regular expression string over the ``/``-joined flax path."""
    return ml_collections.ConfigDict(
        {
            "rank": 4,
            "alpha": 0.0,  # 0: alpha = rank (scaling 1)
            "use_rslora": False,
            "target_modules": UNET_ATTENTION_TARGETS,
            "conditioner_target_modules": TEXT_ENCODER_ATTENTION_TARGETS,
        }
    )


def dreambooth_defaults() -> ml_collections.ConfigDict:
    """``config.dreambooth`` (off unless ``enabled``). The instance images are ``config.data``
    (e.g. ``name="folder"``); text models condition them on ``instance_prompt``, class models
    on ``instance_label``. Prior preservation (``prior_loss_weight`` > 0) adds ``num_class_images``
    images the base model generates from ``class_prompt`` / ``class_label`` before training
    (kept in ``class_dir``, default ``<workdir>/class_images``, and reused by later runs):
    the loss is ``instance loss + prior_loss_weight * prior loss``, each a batch mean."""
    return ml_collections.ConfigDict(
        {
            "enabled": False,
            "instance_prompt": "a photo of sks dog",
            "instance_label": -1,
            "class_prompt": "a photo of dog",
            "class_label": -1,
            "prior_loss_weight": 1.0,  # 0: no prior preservation (no class images)
            "num_class_images": 100,
            "class_dir": "",
            "class_seed": 0,
            "class_sampler": "ddim",
            "class_num_steps": 50,
            "class_guidance_scale": 7.5,
            "class_batch_size": 8,
        }
    )


def add_finetune_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the fine-tuning stage's sections (and its preview keys) to a base config, in place."""
    with config.unlocked():
        config.stage = "finetune"
        config.finetune = finetune_defaults()
        config.lora = lora_defaults()
        config.dreambooth = dreambooth_defaults()
        preview = ml_collections.ConfigDict(
            {
                "every_steps": 0, "seed": 0, "columns": 4, "max_rows": 4, "prompts": [],
                "num_images": 8, "sampler": "ddim", "num_steps": 50, "guidance_scale": 3.0,
            }
        )
        for key, value in (config.get("preview") or {}).items():
            if key in ("every_steps", "seed"):
                preview[key] = value
        config.preview = preview
    return config
