#!/usr/bin/env python
"""Convert pytorch-fid's FID Inception weights to a torch-free ``.safetensors`` file.

    python scripts/convert_inception.py pt_inception-2015-12-05-6726825d.pth inception-2015-12-05.safetensors

The input is read with ``torch.load(weights_only=True)`` (no pickled code runs), checked against
:class:`ldm_jax.evaluation.inception.FIDInceptionV3` (every tensor used, every shape right) and
written with the same tensor names in float32, so ``load_inception`` reads either file. The
SHA-256 of the input is printed; pytorch-fid's release file starts with ``6726825d``. Nothing is
downloaded: get the ``.pth`` file yourself (pytorch-fid's GitHub release
``fid_weights_0.1.0``).

``--random SEED`` writes random weights instead (for tests and smoke runs; never for numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

PYTORCH_FID_SHA256_PREFIX = "6726825d"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ldm_jax.evaluation.inception_weights import random_state_dict, variables_from_state_dict
    from ldm_jax.interop.torch_weights import WeightsError, load_state_dict, save_state_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="pytorch-fid .pth (or any torch/safetensors FID Inception state dict)")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--random", type=int, default=None, metavar="SEED", help="write random weights instead")
    args = p.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        print(f"error: output must end in .safetensors: {args.output}", file=sys.stderr)
        return 2
    try:
        if args.random is not None:
            tensors, origin = random_state_dict(args.random), f"random(seed={args.random})"
        elif args.source is None:
            print("error: give a source file or --random SEED", file=sys.stderr)
            return 2
        else:
            digest = _sha256(args.source)
            print(f"{args.source}: sha256 {digest}")
            if not digest.startswith(PYTORCH_FID_SHA256_PREFIX):
                print(f"note: not pytorch-fid's release file (sha256 {PYTORCH_FID_SHA256_PREFIX}...)", file=sys.stderr)
            tensors, origin = load_state_dict(args.source), os.path.basename(args.source)
            tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        variables_from_state_dict(tensors, source=origin)  # raises naming any wrong key
    except (FileNotFoundError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_state_dict({k: v.astype("float32") for k, v in tensors.items()}, args.output,
                    metadata={"format": "pt", "source": origin})
    print(f"wrote {len(tensors)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
