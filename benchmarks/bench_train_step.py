"""Train-step benchmark: ldm_jax's jitted U-Net train step against diffusers + torch AdamW.

Both sides train the same network (``ldm_jax.models.unet.UNet`` and diffusers'
``UNet2DConditionModel`` built from ``UNet.to_diffusers_config()``, loaded with *our* initial
weights through a strict state-dict load, so every parameter name and shape must match) on
the same random latents and conditioning, with the same batch, optimizer and step contents:

  ours   ``ldm_jax.training``: make_optimizer (clip_by_global_norm(1) -> AdamW), one jitted
         step from make_train_step/compile_train_step with explicit shardings and donated
         state, loss ``ldm_jax.diffusion.diffusion_loss`` (random t, random noise, q_sample,
         eps-prediction MSE), EMA update and non-finite guard inside the step.
  torch  eager PyTorch: random t and noise, q_sample, forward, MSE, backward,
         clip_grad_norm_(1), torch.optim.AdamW(foreach=True), EMA via torch._foreach_lerp_.

Reported per config: compile time of our step (lower + compile, separately from steps),
median step time after warm-up (each step ends in jax.block_until_ready / a synchronous
torch step), images/s, the ratio ours/torch, and achieved FLOP/s = XLA's cost-analysis FLOPs
of our compiled step / step time, as a fraction of this machine's float32 matmul peak measured
in the same run (benchmarks/machine_peak.py). The torch column divides the same FLOP count by
torch's step time (torch's own FlopCounterMode count is printed as a cross-check).

The two sides are timed interleaved, a few steps of ours then a few of torch, repeated, so
that load from other processes on the machine slows both alike; the ratio is the robust
number, absolute times are not. This is a benchmark, not a test: nothing is asserted.

    .venv/bin/python benchmarks/bench_train_step.py --config both
    .venv/bin/python benchmarks/bench_train_step.py --config large --steps 6 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine_peak  # noqa: E402  (benchmarks/ is not a package)

from ldm_jax.diffusion import diffusion_loss, make_schedule  # noqa: E402
from ldm_jax.interop.diffusers_unet import params_to_diffusers_state_dict  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402
from ldm_jax.training import (  # noqa: E402
    compile_train_step,
    create_sharded_state,
    logical_axis_rules,
    make_mesh,
    make_optimizer,
    make_train_step,
    state_shardings,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The optimizer both sides use: AdamW at a constant rate with decoupled weight decay on every
# parameter (diffusers' training scripts; torch's AdamW has no mask), global-norm clipping at 1.
OPTIMIZER = {
    "name": "adamw",
    "learning_rate": 1e-4,
    "schedule": "constant",
    "warmup_steps": 0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "weight_decay_on": "all",
    "grad_clip_norm": 1.0,
}
EMA = {"decay": 0.9999, "warmup": True}
# Issue #8's targets for ours/torch (images/s ratio, float32, idle machine); stretch 1.5 on both.
TARGETS = {"small": 1.2, "large": 1.0}
NUM_TIMESTEPS = 1000
# Our U-Nets' conv formulation (ldm_jax.kernels.conv): "auto" runs the tiny-map and 1x1 convs as
# GEMMs on CPU, where XLA's conv emitter is slowest (benchmarks/results/conv_cpu.md); a module-only
# attribute, so both sides still train the same network. --conv-impl xla gives the lax.conv step.
CONV_IMPL = "auto"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmarked network and its inputs: latents [batch, latent_size, latent_size, 4],
    plus class labels [batch] (``num_classes``) or a context [batch, context_length, D]."""

    name: str
    description: str
    unet: dict
    latent_size: int
    batch: int
    steps: int
    context_length: int = 0


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config() -> BenchConfig:
    """The U-Net, latent shape and batch of the demo (``configs/digits_ldm.py`` on the latents
    of ``configs/digits_autoencoder.py``), read from the config files so the benchmark follows
    them: a small convolutional class-conditional U-Net on 8x8x4 latents, no attention (class
    labels enter through the time embedding)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)  # config files import ``configs.base``
    from configs import digits_autoencoder, digits_ldm

    ldm, ae = digits_ldm.get_config(), digits_autoencoder.get_config()
    latent_size = ldm.data.resolution // 2 ** (len(ae.autoencoder.block_out_channels) - 1)
    u = ldm.unet
    if any(t.startswith("CrossAttn") for t in (*u.down_block_types, *u.up_block_types)):
        raise ValueError("configs/digits_ldm.py now has cross-attention blocks; update demo_config()")
    return BenchConfig(
        name="small",
        description="the demo's class-conditional U-Net (configs/digits_ldm.py)",
        unet=dict(
            sample_size=latent_size,
            in_channels=ae.autoencoder.latent_channels,
            out_channels=ae.autoencoder.latent_channels,
            block_out_channels=tuple(u.block_out_channels),
            layers_per_block=u.layers_per_block,
            down_block_types=tuple(u.down_block_types),
            up_block_types=tuple(u.up_block_types),
            mid_block_type=u.mid_block_type,
            norm_num_groups=u.norm_num_groups,
            resnet_time_scale_shift=u.resnet_time_scale_shift,
            num_classes=10,  # the digits
            conv_impl=CONV_IMPL,
        ),
        latent_size=latent_size,
        batch=int(ldm.train.global_batch_size),
        steps=20,
    )


CONFIGS = {
    "small": demo_config,
    # An SD-style text-conditional U-Net, three levels of widths (128, 256, 256) instead of SD's
    # four of (320, 640, 1280, 1280), on 32x32x4 latents (256 px images through an f=8
    # autoencoder): cross-attention at the two upper levels and the mid block, 8 heads, a
    # CLIP-length context.
    "large": lambda: BenchConfig(
        name="large",
        description="SD-style cross-attention U-Net",
        unet=dict(
            sample_size=32,
            block_out_channels=(128, 256, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            norm_num_groups=32,
            cross_attention_dim=512,
            attention_head_dim=8,
            conv_impl=CONV_IMPL,
        ),
        latent_size=32,
        batch=8,
        steps=6,
        context_length=77,
    ),
}


# --------------------------------------------------------------------------------- inputs


def random_batch(cfg: BenchConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random NHWC latents and conditioning as NumPy arrays (shared by both sides)."""
    rng = np.random.default_rng(seed)
    channels = cfg.unet.get("in_channels", 4)
    out = {"latents": rng.standard_normal((batch, cfg.latent_size, cfg.latent_size, channels), dtype=np.float32)}
    if cfg.unet.get("num_classes"):
        out["labels"] = rng.integers(0, cfg.unet["num_classes"], size=(batch,), dtype=np.int32)
    if cfg.context_length:
        out["context"] = rng.standard_normal(
            (batch, cfg.context_length, cfg.unet["cross_attention_dim"]), dtype=np.float32
        )
    return out


# --------------------------------------------------------------------------------- ours


@dataclasses.dataclass
class OursRunner:
    """Our compiled step and its state; ``step()`` runs one update and waits for it."""

    unet: UNet
    compiled: Any
    state: Any
    batch: dict
    keys: list
    compile_seconds: float
    init_seconds: float
    flops: float
    bytes_accessed: float
    num_params: int
    calls: int = 0

    def step(self) -> None:
        key = self.keys[self.calls % len(self.keys)]
        self.state, metrics = self.compiled(self.state, self.batch, key)
        jax.block_until_ready((self.state, metrics))
        self.calls += 1


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    # Older jax returned one dict per device program.
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return dict(cost or {})


def build_ours(cfg: BenchConfig, batch_np: dict, dtype: str) -> tuple[OursRunner, dict]:
    """Our state (created sharded) and compiled step; returns the runner and the initial
    params as a diffusers state dict (for the torch side)."""
    compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    unet = UNet(**cfg.unet, dtype=compute_dtype)
    schedule = make_schedule("scaled_linear", NUM_TIMESTEPS)
    dummy = unet.dummy_inputs()

    def init_params(key):
        return unet.init(key, **dummy)["params"]

    def loss_fn(params, batch, key):
        def model_fn(x_t, t):
            return unet.apply(
                {"params": params}, x_t, t, context=batch.get("context"), class_labels=batch.get("labels")
            )

        return diffusion_loss(schedule, model_fn, batch["latents"], key), {}

    mesh = make_mesh({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
    rules = logical_axis_rules({"preset": "dp"})
    tx, lr_schedule = make_optimizer(OPTIMIZER)

    start = time.perf_counter()
    _, shardings = state_shardings(init_params, tx, mesh, rules, seed=0)
    state = create_sharded_state(init_params, tx, shardings, seed=0)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - start
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    # Converted before the first step: the step donates (invalidates) the state it is given.
    # The float32 twin of the module names the same parameters whatever the compute dtype.
    state_dict = params_to_diffusers_state_dict(UNet(**cfg.unet), state.params)

    step_fn = make_train_step(
        loss_fn, tx, lr_schedule, {"num_microbatches": 1}, EMA, mesh=mesh, state_shardings=shardings
    )
    jitted = compile_train_step(step_fn, shardings, mesh)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    keys = [jax.random.fold_in(jax.random.key(1), i) for i in range(16)]
    start = time.perf_counter()
    compiled = jitted.lower(state, batch, keys[0]).compile()
    compile_seconds = time.perf_counter() - start
    cost = _cost(compiled)
    runner = OursRunner(
        unet=unet,
        compiled=compiled,
        state=state,
        batch=batch,
        keys=keys,
        compile_seconds=compile_seconds,
        init_seconds=init_seconds,
        flops=float(cost.get("flops", float("nan"))),
        bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
        num_params=num_params,
    )
    return runner, state_dict


# --------------------------------------------------------------------------------- torch


@dataclasses.dataclass
class TorchRunner:
    """diffusers U-Net + torch AdamW; ``step()`` runs one synchronous update."""

    model: Any
    optimizer: Any
    params: list
    ema: list
    batch: dict
    sqrt_alphas_cumprod: Any
    sqrt_one_minus_alphas_cumprod: Any
    autocast_dtype: Any
    num_params: int
    generator: Any
    calls: int = 0

    def _loss(self):
        import torch
        import torch.nn.functional as F

        x0 = self.batch["latents"]
        b = x0.shape[0]
        t = torch.randint(0, NUM_TIMESTEPS, (b,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        x_t = (
            self.sqrt_alphas_cumprod[t].view(b, 1, 1, 1) * x0
            + self.sqrt_one_minus_alphas_cumprod[t].view(b, 1, 1, 1) * noise
        )
        autocast = (
            torch.autocast("cpu", dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(
                x_t, t, self.batch.get("context"), class_labels=self.batch.get("labels"), return_dict=False
            )[0]
        return F.mse_loss(out.float(), noise)

    def step(self) -> None:
        import torch

        loss = self._loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.calls += 1
        # The same warmed-up EMA decay as ldm_jax.training.step.ema_decay_at.
        decay = min(EMA["decay"], (1.0 + self.calls) / (10.0 + self.calls))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)

    def count_flops(self) -> float:
        """FLOPs of forward + backward by torch's FlopCounterMode (matmuls and convolutions
        only, padded positions included), on a throwaway gradient."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            loss = self._loss()
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def build_torch(cfg: BenchConfig, unet: UNet, state_dict: dict, batch_np: dict, dtype: str) -> TorchRunner:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(unet.to_diffusers_config())
    # strict: every diffusers parameter must be one of ours, with the same shape, and vice versa.
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, strict=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=OPTIMIZER["learning_rate"],
        betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]),
        eps=OPTIMIZER["eps"],
        weight_decay=OPTIMIZER["weight_decay"],
        foreach=True,
    )
    schedule = make_schedule("scaled_linear", NUM_TIMESTEPS)
    batch = {"latents": torch.from_numpy(batch_np["latents"].transpose(0, 3, 1, 2).copy())}
    if "labels" in batch_np:
        batch["labels"] = torch.from_numpy(batch_np["labels"].astype(np.int64))
    if "context" in batch_np:
        batch["context"] = torch.from_numpy(batch_np["context"])
    return TorchRunner(
        model=model,
        optimizer=optimizer,
        params=params,
        ema=[p.detach().clone() for p in params],
        batch=batch,
        sqrt_alphas_cumprod=torch.tensor(np.array(schedule.sqrt_alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=torch.tensor(np.array(schedule.sqrt_one_minus_alphas_cumprod)),
        autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
        num_params=sum(p.numel() for p in model.parameters()),
        generator=torch.Generator().manual_seed(0),
    )


def forward_difference(cfg: BenchConfig, ours: OursRunner, runner: TorchRunner, batch_np: dict, n: int = 2) -> float:
    """Max |ours - torch| / max |torch| of one float32 forward pass on the first ``n`` examples
    with the *initial* weights (call before any step): a check that the two networks compute
    the same function, not only hold the same parameters."""
    import torch

    unet32 = UNet(**cfg.unet)
    forward = jax.jit(lambda p, x, t, c, y: unet32.apply({"params": p}, x, t, context=c, class_labels=y))
    x = batch_np["latents"][:n]
    t = np.linspace(10, 900, n).astype(np.int32)
    ctx = batch_np["context"][:n] if "context" in batch_np else None
    labels = batch_np["labels"][:n] if "labels" in batch_np else None
    ours_out = np.asarray(forward(ours.state.params, x, t, ctx, labels), np.float64)
    with torch.no_grad():
        ref = runner.model(
            torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(t.astype(np.int64)),
            None if ctx is None else torch.from_numpy(ctx),
            class_labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
            return_dict=False,
        )[0]
    ref = ref.numpy().transpose(0, 2, 3, 1).astype(np.float64)
    return float(np.abs(ours_out - ref).max() / np.abs(ref).max())


# --------------------------------------------------------------------------------- timing


def time_interleaved(sides: dict, steps: int, chunk: int, warmup: int) -> dict[str, list[list[float]]]:
    """Per-step seconds of each side (name -> zero-argument step function): ``warmup``
    untimed steps each, then rounds in which every side runs ``chunk`` timed steps in turn,
    until each has ``steps``. Returns name -> one list of step times per round. A step
    function that returns a float has timed itself (a worker process, to leave out the IPC).

    A short pause before each chunk lets the previous library's worker threads stop
    spinning, so they do not steal the cores from the next side's first step.
    """
    for run in sides.values():
        for _ in range(warmup):
            run()
    rounds: dict[str, list[list[float]]] = {name: [] for name in sides}
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for name, run in sides.items():
            time.sleep(0.05)
            chunk_times = []
            for _ in range(n):
                start = time.perf_counter()
                reported = run()
                elapsed = time.perf_counter() - start
                chunk_times.append(reported if isinstance(reported, float) else elapsed)
            rounds[name].append(chunk_times)
        done += n
    return rounds


def summarize(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# XLA:CPU with one thread for everything (Eigen intra-op pool and the runtime's own pool).
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _ours_worker(conn, cfg: BenchConfig, batch_np: dict, dtype: str) -> None:
    """Child process body: build and compile our step, then run one timed step per message."""
    ours, _ = build_ours(cfg, batch_np, dtype)
    conn.send(ours.compile_seconds)
    while conn.recv() is not None:
        start = time.perf_counter()
        ours.step()
        conn.send(time.perf_counter() - start)


class OursSingleThread:
    """Our step in a child process whose XLA runs on one thread (XLA's thread count is fixed
    when the backend starts, so it cannot change inside this process). Steps run one at a
    time on request, so timing stays interleaved with the other sides."""

    def __init__(self, cfg: BenchConfig, batch_np: dict, dtype: str):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: XLA_FLAGS apply
        self.conn, child_conn = context.Pipe()
        previous = os.environ.get("XLA_FLAGS")
        os.environ["XLA_FLAGS"] = ((previous or "") + " " + SINGLE_THREAD_XLA_FLAGS).strip()
        try:
            self.process = context.Process(target=_ours_worker, args=(child_conn, cfg, batch_np, dtype), daemon=True)
            self.process.start()
        finally:
            if previous is None:
                del os.environ["XLA_FLAGS"]
            else:
                os.environ["XLA_FLAGS"] = previous
        self.compile_seconds = self.conn.recv()

    def step(self) -> float:
        self.conn.send(True)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


def _with_threads(step, threads: int):
    import torch

    def run():
        torch.set_num_threads(threads)
        step()

    return run


def run_config(cfg: BenchConfig, args, peak_flops: float) -> dict:
    batch_size = args.batch or cfg.batch
    steps = args.steps or cfg.steps
    devices = jax.device_count()
    if batch_size % devices:
        raise ValueError(f"--batch {batch_size} is not divisible by the {devices} JAX devices")
    print(f"\n== {cfg.name}: {cfg.description}, batch {batch_size}, {args.dtype}", flush=True)
    batch_np = random_batch(cfg, batch_size)
    ours, state_dict = build_ours(cfg, batch_np, args.dtype)
    print(
        f"ours: {ours.num_params:,} params; state init {ours.init_seconds:.1f} s; "
        f"step compile {ours.compile_seconds:.1f} s; XLA cost analysis {ours.flops / 1e9:.2f} GFLOP/step",
        flush=True,
    )
    runner = build_torch(cfg, ours.unet, state_dict, batch_np, args.dtype)
    print(f"torch (diffusers UNet2DConditionModel): {runner.num_params:,} params", flush=True)
    if runner.num_params != ours.num_params:
        print("WARNING: parameter counts differ; the comparison is not like for like", flush=True)
    forward_rel_diff = None
    if not args.skip_forward_check:
        forward_rel_diff = forward_difference(cfg, ours, runner, batch_np)
        print(f"same initial weights, float32 forward max |ours - torch| / max |torch| = {forward_rel_diff:.2e}")
    torch_flops = runner.count_flops()
    print(f"torch FlopCounterMode: {torch_flops / 1e9:.2f} GFLOP/step (fwd+bwd matmuls/convs only)", flush=True)

    # One torch side per thread count; the comparison uses the fastest (see --torch-threads).
    # One side per library and thread setting; each library is represented by its fastest.
    sides = {"ours_xla": ours.step}
    single = None
    if args.ours_single_thread and machine_peak.cpu_count() > 1:
        print("compiling our step again in a single-threaded XLA process ...", flush=True)
        single = OursSingleThread(cfg, batch_np, args.dtype)
        sides["ours_1t"] = single.step
    for threads in args.torch_threads:
        sides[f"torch_{threads}t"] = _with_threads(runner.step, threads)
    load_before = os.getloadavg()[0]
    try:
        rounds = time_interleaved(sides, steps, args.chunk, args.warmup)
    finally:
        if single is not None:
            single.close()
    load_after = os.getloadavg()[0]

    step_seconds = {name: summarize([x for r in rs for x in r]) for name, rs in rounds.items()}
    def fastest(prefix):
        names = [name for name in sides if name.startswith(prefix)]
        return min(names, key=lambda name: step_seconds[name]["median"])

    best_ours, best_torch = fastest("ours_"), fastest("torch_")
    ours_t, torch_t = step_seconds[best_ours], step_seconds[best_torch]
    ours_ips = batch_size / ours_t["median"]
    torch_ips = batch_size / torch_t["median"]
    # images/s ratio ours/torch within each round = torch time / our time (medians of the chunk).
    round_ratios = [
        statistics.median(t) / statistics.median(o) for o, t in zip(rounds[best_ours], rounds[best_torch])
    ]
    result = {
        "config": cfg.name,
        "description": cfg.description,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.unet.items()},
        "latent_shape": [cfg.latent_size, cfg.latent_size, cfg.unet.get("in_channels", 4)],
        "context_shape": [cfg.context_length, cfg.unet["cross_attention_dim"]] if cfg.context_length else None,
        "batch": batch_size,
        "dtype": args.dtype,
        "jax_devices": devices,
        "params_ours": ours.num_params,
        "params_torch": runner.num_params,
        "forward_rel_diff": forward_rel_diff,
        "state_init_seconds": ours.init_seconds,
        "compile_seconds": ours.compile_seconds,
        "xla_flops_per_step": ours.flops,
        "xla_bytes_accessed_per_step": ours.bytes_accessed,
        "torch_counted_flops_per_step": torch_flops,
        "step_seconds": step_seconds,
        "best_ours": best_ours,
        "best_torch": best_torch,
        "images_per_second_ours": ours_ips,
        "images_per_second_torch": torch_ips,
        "ratio_ours_over_torch": ours_ips / torch_ips,
        "target_ours_over_torch": TARGETS.get(cfg.name),
        "attention_backend": _attention_backends(cfg, batch_size, args.dtype),
        "round_ratios": round_ratios,
        "achieved_flops_ours": ours.flops / ours_t["median"],
        "achieved_flops_torch": ours.flops / torch_t["median"],
        "fraction_of_peak_ours": ours.flops / ours_t["median"] / peak_flops,
        "fraction_of_peak_torch": ours.flops / torch_t["median"] / peak_flops,
        "load_average_1min": [load_before, load_after],
        "raw_step_seconds": rounds,
    }
    for name in sides:
        print(
            f"{name}: median {step_seconds[name]['median'] * 1e3:.1f} ms/step "
            f"({batch_size / step_seconds[name]['median']:.1f} img/s)",
            flush=True,
        )
    target = TARGETS.get(cfg.name)
    print(
        f"ours/torch ({best_ours} / {best_torch}) {result['ratio_ours_over_torch']:.2f}"
        + (f" (target >= {target}: {'met' if result['ratio_ours_over_torch'] >= target else 'NOT met'})" if target else "")
        + f"; ours at {100 * result['fraction_of_peak_ours']:.1f}% of the jnp.dot peak",
        flush=True,
    )
    return result


def _attention_backends(cfg: BenchConfig, batch: int, dtype: str) -> list[str]:
    """Which backend "auto" (the U-Net default) picks for each attention shape of this config."""
    from ldm_jax.kernels import select_backend

    if not any(t.startswith("CrossAttn") for t in cfg.unet.get("down_block_types", ())):
        return []
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    chosen = set()
    levels = len(cfg.unet["block_out_channels"])
    for level in range(levels):
        side = cfg.latent_size // 2**level
        q = jax.ShapeDtypeStruct((batch, side * side, 1, 8), jdtype)
        ctx = jax.ShapeDtypeStruct((batch, cfg.context_length or side * side, 1, 8), jdtype)
        chosen.add(f"{side}x{side} self: {cfg.unet.get('attention', 'auto')}->"
                   f"{select_backend(cfg.unet.get('attention', 'auto'), q, q)}")
        chosen.add(f"cross: {select_backend(cfg.unet.get('attention', 'auto'), q, ctx)}")
    return sorted(chosen)


# --------------------------------------------------------------------------------- report


def _threads(side: str) -> str:
    """Side name -> its thread setting for display: ours_xla -> "XLA default", torch_2t -> "2"."""
    setting = side.split("_", 1)[1]
    return "XLA default" if setting == "xla" else setting[:-1]


def _ms(summary: dict) -> str:
    return f"{summary['median'] * 1e3:.1f} ({summary['min'] * 1e3:.0f}-{summary['max'] * 1e3:.0f})"


def markdown_report(machine: dict, peaks: dict, results: list[dict], args) -> str:
    peak = peaks["machine_peak"]
    torch_peaks = "; ".join(
        f"torch.mm {threads} thread{'s' if threads > 1 else ''}: "
        + ", ".join(f"{n}: {v / 1e9:.0f}" for n, v in by_size.items())
        for threads, by_size in peaks["torch"].items()
    )
    command = args.command_line
    lines = [
        "# Train-step benchmark: ldm_jax vs diffusers + torch AdamW",
        "",
        f"Written by `benchmarks/bench_train_step.py {command}`. See benchmarks/README.md for what the numbers mean.",
        "",
        "## Machine",
        "",
        machine_peak.describe_markdown(machine),
        f"- float32 square-matmul peak measured in this run, GFLOP/s by size (best of {args.peak_repeats}): "
        "jnp.dot: " + ", ".join(f"{n}: {v / 1e9:.0f}" for n, v in peaks["jax"].items()) + "; " + torch_peaks
        + f". Peak used below = the best of all = {peak / 1e9:.0f} GFLOP/s (measured under the same load as "
        "the steps, so it is below what an idle machine reaches).",
        f"- JAX: {results[0]['jax_devices'] if results else '?'} CPU device(s); our step timed with XLA's default "
        f"thread pool{' and, in a child process, with one thread' if args.ours_single_thread else ''}; "
        f"torch thread counts tried: {', '.join(str(t) for t in args.torch_threads)}",
        "",
        "## Results",
        "",
        "| config | params (ours = torch) | batch | dtype | compile s | ours ms/step (threads) "
        "| torch ms/step (threads) "
        "| ours img/s | torch img/s | **ours/torch** (per-round) | target | GFLOP/step (XLA) "
        "| ours GFLOP/s (% peak) | torch GFLOP/s (% peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        same = "=" if r["params_ours"] == r["params_torch"] else "!="
        lines.append(
            f"| {r['config']} | {r['params_ours']:,} {same} {r['params_torch']:,} | {r['batch']} | {r['dtype']} "
            f"| {r['compile_seconds']:.1f} "
            f"| {_ms(r['step_seconds'][r['best_ours']])} ({_threads(r['best_ours'])}) "
            f"| {_ms(r['step_seconds'][r['best_torch']])} ({_threads(r['best_torch'])}) "
            f"| {r['images_per_second_ours']:.1f} | {r['images_per_second_torch']:.1f} "
            f"| **{r['ratio_ours_over_torch']:.2f}** ({min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}) "
            f"| {'>= ' + str(r['target_ours_over_torch']) if r.get('target_ours_over_torch') else '-'} "
            f"| {r['xla_flops_per_step'] / 1e9:.2f} "
            f"| {r['achieved_flops_ours'] / 1e9:.1f} ({100 * r['fraction_of_peak_ours']:.1f}%) "
            f"| {r['achieved_flops_torch'] / 1e9:.1f} ({100 * r['fraction_of_peak_torch']:.1f}%) |"
        )
    lines += [
        "",
        "Step times: median (min-max) in ms over the timed steps of each side. Each library's column is its "
        "fastest thread setting; all of them:",
        "",
    ]
    for r in results:
        variants = ", ".join(
            f"{name.split('_')[0]} {_threads(name)}{'' if name == 'ours_xla' else ' thread(s)'} {_ms(summary)} ms"
            for name, summary in r["step_seconds"].items()
        )
        lines.append(
            f"- {r['config']} ({r['step_seconds']['ours_xla']['n']} timed steps per side): {variants}; "
            f"1-min load average {r['load_average_1min'][0]:.1f} before and {r['load_average_1min'][1]:.1f} after"
        )
    lines += ["", "Configs:", ""]
    for r in results:
        fwd = f"{r['forward_rel_diff']:.1e}" if r["forward_rel_diff"] is not None else "not checked"
        ctx = f", context {r['context_shape'][0]}x{r['context_shape'][1]}" if r["context_shape"] else ""
        lines.append(
            f"- **{r['config']}**: {r['description']}; latents {'x'.join(map(str, r['latent_shape']))}{ctx}; "
            f"U-Net `{json.dumps(r['unet'])}`. "
            f"Same initial weights on both sides (strict state-dict load); float32 forward relative "
            f"difference {fwd}. torch's FlopCounterMode counts {r['torch_counted_flops_per_step'] / 1e9:.2f} "
            f"GFLOP/step (matmuls/convs, padding included) vs XLA's {r['xla_flops_per_step'] / 1e9:.2f}. "
            f"Creating the sharded state (including compiling its init) took {r['state_init_seconds']:.1f} s."
        )
    lines += [
        "",
        "Notes:",
        "",
        "- One step on both sides = random t and noise, q_sample, U-Net forward, eps MSE, backward, "
        "global-norm clip at 1, AdamW (lr 1e-4, weight decay 1e-2), EMA update. Ours is one jitted XLA program "
        "(ldm_jax.training: donated state, explicit shardings, non-finite guard); torch is eager "
        "diffusers + foreach AdamW (no torch.compile).",
        f"- Timed steps come after {args.warmup} untimed warm-up step(s) per side; our compile time is separate "
        "and excluded from step times.",
        f"- The sides were timed interleaved ({args.chunk} steps of each side and thread setting in turn, "
        "repeated; one side runs at a time) because other processes share this machine's cores: load then hits "
        "all sides in the same minutes, and the ratio is the number to read. Absolute times are noisy here; the "
        "per-round range is the ratio within each round.",
        "- Each library is timed at several thread counts and represented by its fastest, because a thread pool "
        "as wide as the machine degrades badly when another process holds a core (torch's OpenMP threads wait "
        "at every op's barrier: with 2 threads on a loaded 2-core machine it can be many times slower than "
        "with 1). XLA's thread count is fixed at start-up, so our single-threaded variant runs the same step in "
        "a child process (`XLA_FLAGS=" + SINGLE_THREAD_XLA_FLAGS + "`), still one side at a time.",
        "- Achieved FLOP/s in both columns = XLA's cost-analysis FLOPs of our compiled step (the same model and "
        "step) / that side's median step time. XLA counts convolution FLOPs on valid (unpadded) taps only and "
        "includes elementwise and optimizer work, so it differs a little from torch's count.",
    ]
    if args.dtype == "bfloat16":
        lines.append(
            "- bfloat16: our U-Net computes in bf16 (params, optimizer state, norms, softmax and loss in float32); "
            "torch runs under torch.autocast('cpu', bfloat16). CPUs without native bf16 instructions run it "
            "slower than float32 (conversions); check the SIMD flags above for avx512_bf16 / amx_bf16. The peak "
            "above is float32."
        )
    return "\n".join(lines) + "\n"


def render_json(path: str) -> None:
    """Rewrite ``<path without .json>.md`` from a JSON file this script wrote."""
    with open(path) as f:
        saved = json.load(f)
    # JSON turned the int keys (matrix sizes, thread counts) into strings.
    peaks = saved["matmul_peak_flops"]
    peaks = {
        "jax": {int(n): v for n, v in peaks["jax"].items()},
        "torch": {int(t): {int(n): v for n, v in by_size.items()} for t, by_size in peaks["torch"].items()},
        "machine_peak": peaks["machine_peak"],
    }
    args = argparse.Namespace(**saved["args"])
    report = markdown_report(saved["machine"], peaks, saved["results"], args)
    out = path[: -len(".json")] if path.endswith(".json") else path
    with open(out + ".md", "w") as f:
        f.write(report)
    print(report)
    print(f"wrote {out}.md")


def _thread_counts(text: str) -> list[int]:
    counts = []
    for part in text.split(","):
        part = part.strip()
        value = machine_peak.cpu_count() if part == "nproc" else int(part)
        if value < 1:
            raise ValueError(f"--torch-threads entries must be >= 1 or 'nproc', got {part!r}")
        if value not in counts:
            counts.append(value)
    return counts


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("small", "large", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default: small 20, large 6)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: small 64, large 8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--chunk", type=int, default=2, help="steps per side before switching to the next side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compilation")
    parser.add_argument(
        "--torch-threads",
        type=_thread_counts,
        default="nproc,1",
        help="comma-separated torch thread counts to time ('nproc' = all cores); the fastest is compared",
    )
    parser.add_argument(
        "--no-ours-single-thread",
        dest="ours_single_thread",
        action="store_false",
        help="do not also time our step with a single-threaded XLA (child process, compiles again)",
    )
    parser.add_argument(
        "--conv-impl", default=CONV_IMPL, help="our U-Nets' conv formulation (ldm_jax.kernels.conv.CONV_IMPL_NAMES)"
    )
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=list(machine_peak.DEFAULT_SIZES))
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--skip-forward-check", action="store_true", help="skip the ours-vs-torch forward check")
    parser.add_argument(
        "--out", default=os.path.join(RESULTS_DIR, "train_step"), help="output path without extension (.md and .json)"
    )
    parser.add_argument(
        "--render", metavar="JSON", help="only rewrite the markdown report of an earlier run's JSON file (no timing)"
    )
    args = parser.parse_args(argv)
    args.command_line = " ".join(sys.argv[1:] if argv is None else argv)
    if args.render:
        render_json(args.render)
        return
    for name in ("steps", "batch", "chunk", "peak_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")

    machine = machine_peak.machine_description()
    print(machine_peak.describe_markdown(machine), flush=True)
    peaks = {"jax": machine_peak.jax_matmul_peak(args.peak_sizes, args.peak_repeats), "torch": {}}
    for threads in args.torch_threads:
        torch.set_num_threads(threads)
        peaks["torch"][threads] = machine_peak.torch_matmul_peak(args.peak_sizes, args.peak_repeats)
    peaks["machine_peak"] = max(
        max(peaks["jax"].values()), max(v for by_size in peaks["torch"].values() for v in by_size.values())
    )
    print("jnp.dot peak GFLOP/s:", {n: round(v / 1e9, 1) for n, v in peaks["jax"].items()}, flush=True)
    for threads, by_size in peaks["torch"].items():
        print(f"torch.mm peak GFLOP/s, {threads} thread(s):", {n: round(v / 1e9, 1) for n, v in by_size.items()})

    names = ("small", "large") if args.config == "both" else (args.config,)
    configs = [CONFIGS[name]() for name in names]
    configs = [dataclasses.replace(c, unet={**c.unet, "conv_impl": args.conv_impl}) for c in configs]
    results = [run_config(cfg, args, peaks["machine_peak"]) for cfg in configs]

    report = markdown_report(machine, peaks, results, args)
    print("\n" + report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(report)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": machine, "matmul_peak_flops": peaks, "args": vars(args), "results": results}, f, indent=2)
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
