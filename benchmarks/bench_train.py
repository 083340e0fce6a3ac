#!/usr/bin/env python
"""Training throughput (images/s) of the MNIST FPVAE: latentdiag's trainer against a plain training loop, on the
CPU and, when a GPU is present, on CUDA in float32 and with mixed precision.

Model: ``lpvae_mnist(horizon="full")``, 256-way categorical on the 28 x 28 grey levels of the bundled MNIST-5k
training digits. On CUDA it runs at the paper's sizes (``--gpu-size paper``: 500-unit layers, 32 conditioning
channels, a 256-channel PixelCNN with 5 residual blocks of three masked 3 x 3 convolutions); on the CPU at a small
size by default (``--cpu-size small``: 256 units, 8 channels, a 32-channel PixelCNN with 2 blocks), because one
paper-size step of 100 images takes minutes there.

- **ours**: ``latentdiag.train.train(config, x, epochs=E, batch_size=B)`` without test data or checkpoints; the
  figure is the ``images_per_s`` of its last epoch (the first one is the warm-up: allocator, cuDNN autotuning).
- **reference**: a plain loop written for this script from the usual PixelVAE training code: per batch, encode,
  z = mu + sigma * eps with ``torch.randn_like``, the log-likelihood and the analytic KL of the model, the mean of
  -ELBO, ``backward``, ``Adam.step``; the same autocast settings; no objective object, no global-batch noise
  generator, no DDP wrapper. Timed the same way (last of E epochs, ``torch.cuda.synchronize`` at the end).

The ratio ours / reference is the trainer's overhead (1.0 = none). With AMP, autocast covers the networks and
the likelihood reduction stays in float32 (the model's ``log_likelihood`` disables autocast there).

Run: ``python benchmarks/bench_train.py`` (CPU, and CUDA when available); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.distributions import kl_divergence

from _harness import machine_line  # noqa: E402 -- benchmarks/ is the script's own folder on sys.path

SIZES = {
    "paper": {},
    "small": {"hidden": 256, "cond_channels": 8, "channels": 32, "res_blocks": 2},
    "tiny": {"hidden": 64, "cond_channels": 4, "channels": 16, "res_blocks": 1},
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=100, help="global batch (the paper's 100)")
    ap.add_argument("--cpu-size", choices=sorted(SIZES), default="small")
    ap.add_argument("--gpu-size", choices=sorted(SIZES), default="paper")
    ap.add_argument("--cpu-steps", type=int, default=8, help="optimiser steps per timed CPU epoch")
    ap.add_argument("--gpu-steps", type=int, default=40, help="optimiser steps per timed CUDA epoch")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method; the table gives the median")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU part")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few steps")
    return ap.parse_args(argv)


def make_config(size: str) -> dict:
    from latentdiag.models.lpvae import reference_config

    return reference_config("lpvae_mnist", horizon="full", likelihood="categorical", **SIZES[size])


def ours(config: dict, x: torch.Tensor, device: str, amp: bool, amp_dtype: str, batch: int, epochs: int) -> float:
    from latentdiag.train.trainer import train

    res = train(config, x, epochs=epochs, batch_size=batch, device=device, amp=amp, amp_dtype=amp_dtype, seed=0,
                distributed=False)
    return float(res.history[-1]["images_per_s"])


def reference(config: dict, x: torch.Tensor, device: str, amp: bool, amp_dtype: str, batch: int,
              epochs: int) -> float:
    from latentdiag.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    dtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp and dtype == torch.float16 else None
    rate = 0.0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0])
        t0 = time.perf_counter()
        seen = 0
        for idx in perm.split(batch):
            if idx.numel() < batch:
                continue
            xb = x[idx].to(device, non_blocking=True)
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=amp):
                q, p = model.encode(xb), model.prior()
                z = q.base_dist.loc + q.base_dist.scale * torch.randn_like(q.base_dist.loc)
                loss = (kl_divergence(q, p) - model.log_likelihood(xb, z[None])[0]).mean()
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            seen += xb.shape[0]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        rate = seen / (time.perf_counter() - t0)
    return rate


def run(label: str, config: dict, x: torch.Tensor, device: str, amp: bool, amp_dtype: str, args) -> float:
    ours_rates, ref_rates = [], []
    for _ in range(args.repeats):     # alternate, so that both see the same machine load
        ref_rates.append(reference(config, x, device, amp, amp_dtype, args.batch_size, args.epochs))
        ours_rates.append(ours(config, x, device, amp, amp_dtype, args.batch_size, args.epochs))
    o, r = statistics.median(ours_rates), statistics.median(ref_rates)
    ratios = [a / b for a, b in zip(ours_rates, ref_rates)]
    print(f"{label:<44} ours {o:9.1f} img/s   reference loop {r:9.1f} img/s   ours/reference "
          f"{statistics.median(ratios):.2f}", flush=True)
    return o


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.cpu_size, args.gpu_size, args.cpu_steps, args.gpu_steps, args.repeats = "tiny", "tiny", 3, 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentdiag.data import mnist5k

    x_all = mnist5k("train", format="levels").x
    print(machine_line())
    print(f"MNIST FPVAE (lpvae_mnist, horizon='full', 256-way categorical, 28x28), batch {args.batch_size}, "
          f"timed: the last of {args.epochs} epochs, median of {args.repeats} run(s)")
    figures = {}
    if not args.skip_cpu:
        x = x_all[:args.cpu_steps * args.batch_size]
        figures["cpu"] = run(f"cpu, {args.cpu_size} size, float32", make_config(args.cpu_size), x, "cpu", False,
                             "bfloat16", args)
    if not torch.cuda.is_available():
        print("CUDA: no GPU on this machine (the CUDA rows, with and without AMP, need one)")
        return 0
    print(f"CUDA device: {torch.cuda.get_device_name(0)}")
    x = x_all[:args.gpu_steps * args.batch_size]
    config = make_config(args.gpu_size)
    print(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN convolutions {torch.backends.cudnn.allow_tf32}")
    base = run(f"cuda, {args.gpu_size} size, float32", config, x, "cuda", False, "bfloat16", args)
    for amp_dtype in ("bfloat16", "float16"):
        fast = run(f"cuda, {args.gpu_size} size, AMP {amp_dtype}", config, x, "cuda", True, amp_dtype, args)
        print(f"  AMP {amp_dtype} / float32 speed-up: {fast / base:.2f}")
    if "cpu" in figures and args.cpu_size == args.gpu_size:
        print(f"  CUDA float32 / CPU: {base / figures['cpu']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
