"""``config.eval``: sample-quality evaluation during training (JAX-free, so configs can import it).

Read by ``ldm_jax.training.eval_hook``; add it to a config with :func:`add_eval_section`.
"""

from __future__ import annotations

import ml_collections

FEATURE_NETWORKS = ("classifier", "inception")
# Metric names the hook reports (TensorBoard ``eval/<name>``) and whether lower is better.
METRIC_MODES = {
    "accuracy": "max", "fd": "min", "fd_ratio": "min",  # features="classifier"
    "fid": "min", "is_mean": "max",  # features="inception"
}


def eval_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "every_steps": 0,  # 0: off (also at the end of the run, with at_end)
            "at_end": True,
            "num_samples": 500,  # K samples from the EMA params; class models cycle the labels 0..K-1
            "batch_size": 0,  # samples per generation call (multiple of the data-parallel size); 0: all K
            "seed": 1234,  # sampling key of every evaluation (the same noise each time)
            # generation settings; "" / 0 / -1: the preview's
            "sampler": "",
            "num_steps": 0,
            "guidance_scale": -1.0,
            "guidance_interval": (),  # (t_low, t_high) as config.preview's; (): the preview's
            "features": "classifier",  # "classifier" (trained on the data's labels) | "inception"
            "classifier_cache_dir": "",  # "": $LDM_JAX_CACHE or ~/.cache/ldm_jax
            "classifier_test_split": "test",  # held-out split scoring the classifier itself
            "classifier_steps": 0,  # training steps of the classifier; 0: ClassifierSpec's default
            "inception_path": "",  # FID Inception weights (pytorch-fid .pth / converted .safetensors)
            "reference_stats": "",  # inception: a pytorch-fid .npz; "": computed from config.data
            "num_reference": 0,  # inception reference images from config.data (0: all)
            "best_metric": "fd",  # keep <workdir>/best_checkpoint by this metric; "": no best checkpoint
            "best_mode": "",  # "min" | "max"; "": the metric's natural direction (METRIC_MODES)
            # <workdir>/samples/eval_<step>.png: the scored samples themselves, one row per class
            # (its first grid_columns samples; unconditional models: the first rows x columns)
            "grid_columns": 0,  # 0: no grid
            "grid_rows": 10,
        }
    )


def add_eval_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the default ``config.eval`` (off) to a config, in place."""
    with config.unlocked():
        config.eval = eval_defaults()
    return config
