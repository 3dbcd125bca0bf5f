#!/usr/bin/env bash
# `make demo`: train the digits autoencoder, then the class-conditional latent diffusion model
# on it, on this machine's CPU, and write a grid of samples (one row per digit, 0 to 9: the
# final in-loop evaluation's samples, or the last preview when the config has no evaluation
# grid) to <workdir>/demo_grid.png and docs/demo_grid.png, and its evaluation curve to
# docs/demo_eval_curve.png (scripts/plot_eval_curve.py). Re-running resumes/skips finished stages;
# delete the workdir to start over.
set -euo pipefail

WORKDIR="${1:-runs/demo}"
cd "$(dirname "$0")/.."
PY=".venv/bin/python"
if [ ! -x "$PY" ]; then
    PY="python3"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
mkdir -p "$WORKDIR"

start=$(date +%s)
echo "== 1/2 autoencoder (configs/digits_autoencoder.py) -> $WORKDIR/autoencoder"
"$PY" train.py --config configs/digits_autoencoder.py --workdir "$WORKDIR/autoencoder"
ae_done=$(date +%s)
echo "== 2/2 latent diffusion (configs/digits_ldm.py) -> $WORKDIR/ldm"
"$PY" train.py --config configs/digits_ldm.py --workdir "$WORKDIR/ldm" \
    --config.first_stage.workdir="$WORKDIR/autoencoder"
ldm_done=$(date +%s)

grid=$(ls "$WORKDIR"/ldm/samples/eval_*.png 2>/dev/null | sort | tail -n 1 || true)
if [ -z "$grid" ]; then
    grid=$(ls "$WORKDIR"/ldm/samples/samples_*.png | sort | tail -n 1)
fi
cp "$grid" "$WORKDIR/demo_grid.png"
mkdir -p docs
cp "$grid" docs/demo_grid.png
curve=""
if [ -f "$WORKDIR/ldm/eval_metrics.jsonl" ]; then
    # the evaluation curve (config.eval of configs/digits_ldm.py): accuracy and FD against step
    "$PY" scripts/plot_eval_curve.py "$WORKDIR/ldm" --out docs/demo_eval_curve.png
    curve="
   evaluation curve: docs/demo_eval_curve.png (rows above; $WORKDIR/ldm/eval_metrics.jsonl)"
fi
cat <<SUMMARY
== done in $((ldm_done - start)) s (autoencoder $((ae_done - start)) s, latent diffusion $((ldm_done - ae_done)) s)
   samples, one row per digit 0..9: $WORKDIR/demo_grid.png (copied to docs/demo_grid.png)$curve
   exported models: $WORKDIR/autoencoder/model, $WORKDIR/ldm/model
   TensorBoard:     tensorboard --logdir $WORKDIR
SUMMARY
