"""LoRA fine-tuning of the digits LDM (``configs/digits_ldm.py``) to a new style, on this CPU.

    python scripts/lora_demo.py                  # makes the data, trains, samples, measures
    python train.py --config configs/lora_digits.py --workdir runs/lora_digits \
        --config.finetune.base=runs/demo/ldm/model --config.data.path=runs/lora_digits_data

The base is an exported digits LDM (``<workdir>/model`` of a ``digits_ldm`` run: its frozen
autoencoder, U-Net, class conditioning and schedule come from that folder). The data is an
image folder with one subfolder per digit (``0/`` .. ``9/``, labels from the subfolder names),
e.g. the digits with thickened strokes that ``scripts/lora_demo.py`` writes. The digits U-Net
has no attention layers, so the LoRA adapts its convolutions and time-embedding projections
(rank 4: ~3% of the U-Net's parameters). ``:runlocal`` is a seconds-long smoke run.
"""

from __future__ import annotations

from configs import base
from ldm_jax.training.stages.finetune_sections import UNET_CONV_TARGETS, add_finetune_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_finetune_sections(base.get_base_config("finetune"))
    c.data = base.data_config("folder", 32, path="runs/lora_digits_data", folder_labels=True)
    c.data.channels = 1

    c.finetune.base = "runs/demo/ldm/model"
    c.finetune.method = "lora"
    c.finetune.weighting = "min_snr"  # as the base was trained
    c.finetune.drop_prob = 0.1  # keep the null class trained: guidance still works after the LoRA
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.lora.target_modules = UNET_CONV_TARGETS

    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.end_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.95

    c.train.global_batch_size = 32
    c.train.num_steps = 300
    c.train.log_every = 50
    c.checkpoint.every_steps = 100
    c.preview.every_steps = 0  # one preview grid after the last step
    c.preview.columns = 8
    c.preview.max_rows = 10
    c.preview.sampler = "ddpm"
    c.preview.num_steps = 50
    c.preview.guidance_scale = 3.0

    if local:  # a 16-pixel base (configs/digits_ldm.py:runlocal's export)
        base.shrink_for_local(c, 4, sample_steps=2)
        c.preview.max_rows = 2
    return c
