"""diffusers ``UNet2DConditionModel`` config dicts <-> :class:`ldm_jax.models.unet.UNet` arguments.

Kept apart from the module so that ``unet.py`` holds the network: which diffusers options exist,
which ones ldm_jax implements, and which are accepted only at their "feature off" value.
Nothing here imports the module (``unet.py`` imports this file).
"""

from __future__ import annotations

from typing import Any, Mapping

# Stable Diffusion v1.x (runwayml/stable-diffusion-v1-5 unet/config.json, model-defining keys).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "center_input_sample": False,
}

# Stable Diffusion v2.x (stabilityai/stable-diffusion-2-1 unet/config.json, model-defining keys).
SD2_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}


def _tupled(value):
    """Lists (possibly nested, as in config.json) -> tuples, so the module stays hashable."""
    return tuple(_tupled(v) for v in value) if isinstance(value, (list, tuple)) else value


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (list, tuple)) else value


def unet_to_diffusers_config(unet) -> dict[str, Any]:
    """The ``config.json`` dict of a :class:`~ldm_jax.models.unet.UNet` (see ``UNet.to_diffusers_config``)."""
    r = unet.resolved()
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": unet.sample_size,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": unet.freq_shift,
        "down_block_types": list(unet.down_block_types),
        "mid_block_type": unet.mid_block_type,
        "up_block_types": list(unet.up_block_types),
        "only_cross_attention": False,
        "block_out_channels": list(r["channels"]),
        "layers_per_block": _jsonable(unet.layers_per_block),
        "downsample_padding": 1,
        "mid_block_scale_factor": unet.mid_block_scale_factor,
        "dropout": unet.dropout,
        "act_fn": "silu",
        "norm_num_groups": unet.norm_num_groups,
        "norm_eps": unet.norm_eps,
        "cross_attention_dim": _jsonable(unet.cross_attention_dim),
        "transformer_layers_per_block": _jsonable(unet.transformer_layers_per_block),
        "reverse_transformer_layers_per_block": _jsonable(unet.reverse_transformer_layers_per_block),
        # diffusers refuses num_attention_heads; its attention_head_dim means "heads" anyway.
        "attention_head_dim": _jsonable(
            unet.num_attention_heads if unet.num_attention_heads is not None else unet.attention_head_dim
        ),
        "num_attention_heads": None,
        "dual_cross_attention": False,
        "use_linear_projection": unet.use_linear_projection,
        "class_embed_type": None,
        "num_class_embeds": r["class_rows"],
        "upcast_attention": unet.upcast_attention,
        "resnet_time_scale_shift": unet.resnet_time_scale_shift,
        "time_embedding_type": "positional",
        "time_embedding_dim": unet.time_embedding_dim,
        "addition_embed_type": unet.addition_embed_type,
        "addition_time_embed_dim": unet.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": unet.projection_class_embeddings_input_dim,
        "conv_in_kernel": unet.conv_in_kernel,
        "conv_out_kernel": unet.conv_out_kernel,
    }
    if unet.num_classes is not None:
        cfg["_ldm_jax_num_classes"] = unet.num_classes
    return cfg


# --------------------------------------------------------------------- diffusers config parsing

# Options UNet implements, mapped to its attribute names (identity).
_SUPPORTED_KEYS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "dropout",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "num_class_embeds",
    "resnet_time_scale_shift",
    "time_embedding_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "conv_in_kernel",
    "conv_out_kernel",
)

# Options accepted only at the value(s) that mean "feature off" (the diffusers defaults).
_ONLY_VALUES: dict[str, tuple] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "resnet_skip_time_act": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}

# Options that only affect block types / embeddings UNet rejects anyway, so any value builds
# the same network (diffusers passes resnet_out_scale_factor only to ResnetDownsampleBlock2D and
# SimpleCrossAttn blocks; addition_embed_type_num_heads only to addition_embed_type="text_image").
_IRRELEVANT_KEYS = ("resnet_out_scale_factor", "addition_embed_type_num_heads")


def diffusers_config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet keyword arguments from a diffusers ``UNet2DConditionModel`` config dict.

    Keys starting with "_" are metadata and skipped, except ``_ldm_jax_num_classes`` (written by
    :meth:`UNet.to_diffusers_config`), which restores ``num_classes``.
    """
    kwargs: dict[str, Any] = {}
    num_classes = config.get("_ldm_jax_num_classes")
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise ValueError(f"config _class_name={class_name!r} is not 'UNet2DConditionModel'")
    for key, value in config.items():
        if key.startswith("_") or key in _IRRELEVANT_KEYS:
            continue
        if key in _ONLY_VALUES:
            if value not in _ONLY_VALUES[key]:
                raise ValueError(
                    f"unsupported UNet2DConditionModel option {key}={value!r} "
                    f"(ldm_jax supports only {_ONLY_VALUES[key]})"
                )
            continue
        if key not in _SUPPORTED_KEYS:
            raise ValueError(f"unknown UNet2DConditionModel config key {key!r}={value!r}")
        kwargs[key] = _tupled(value)
    if kwargs.get("norm_num_groups", 32) is None:
        raise ValueError("unsupported UNet2DConditionModel option norm_num_groups=None (no output norm)")
    if num_classes is not None:
        rows = kwargs.pop("num_class_embeds", None)
        if rows is not None and rows != num_classes + 1:
            raise ValueError(f"_ldm_jax_num_classes={num_classes} disagrees with num_class_embeds={rows}")
        kwargs["num_classes"] = num_classes
    return kwargs
