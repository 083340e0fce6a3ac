#!/usr/bin/env python
"""The representation study of Zhang et al. ("Improving VAE-based Representation Learning", 2022, Tables 1-2),
end to end on the bundled MNIST-5k digits, on the CPU in a few minutes.

1. Train a small MLP VAE (``latentdiag.models.mlp_vae``, Bernoulli likelihood, binarised digits) with
   ``latentdiag.train.train_elbo`` on the 4,000 training digits.
2. ``representation_table``: posterior samples (k = 1 and k = 100), MAP (posterior mean) and distribution
   embedding, each probed by the nonlinear probe (MLP, hidden 200) and the linear probe (linear SVM) over 3 seeds,
   with the PCA intrinsic dimension, the index-code MI, the rate (the paper's "Mutual Info") and the conditional
   entropy of the 1,000 test digits.
3. Optionally (``--out DIR``) the eigen-spectrum plot (the paper's Figure 5) and a sample-efficiency curve
   (10, 100, 1,000 and all labels) of the MAP representation are written as PNG files.

Run: ``python examples/representation_table.py`` (add ``--quick`` for a smoke run of a few seconds, and
``--threads 1`` on a small machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from latentdiag.data import mnist5k
from latentdiag.estimators.encoded import encode
from latentdiag.estimators.probes import sample_efficiency
from latentdiag.estimators.representations import extract_representations
from latentdiag.studies.representation_table import format_representation_table, representation_table
from latentdiag.models import mlp_vae
from latentdiag.train import train_elbo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latent-dim", type=int, default=32, help="latent size D (the paper's MNIST models: 32)")
    ap.add_argument("--epochs", type=int, default=20, help="VAE training epochs")
    ap.add_argument("--seeds", type=int, default=3, help="probe seeds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNG plots (none when omitted)")
    ap.add_argument("--quick", action="store_true", help="tiny run: 2 epochs, 1 seed, subsets of 1000/300")
    ap.add_argument("--threads", type=int, default=None,
                    help="limit torch and BLAS/OpenMP threads (1 is much steadier on a busy shared machine: tiny "
                         "matrix operations can stall for milliseconds when threads compete for cores)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        import importlib

        for module in ("scipy.linalg", "sklearn.decomposition", "sklearn.svm"):
            importlib.import_module(module)  # threadpoolctl limits only libraries already loaded
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    torch.manual_seed(args.seed)
    train, test = mnist5k("train", format="binary"), mnist5k("test", format="binary")
    model = mlp_vae((1, 28, 28), latent_dim=args.latent_dim, likelihood="bernoulli")
    epochs = 2 if args.quick else args.epochs
    start = time.perf_counter()
    history = train_elbo(model, train.x, epochs=epochs, seed=args.seed, device="cpu")
    print(f"trained mlp_vae(latent_dim={args.latent_dim}) for {epochs} epochs on {train.x.shape[0]} digits in "
          f"{time.perf_counter() - start:.1f} s; -ELBO per datapoint {history[0]:.1f} -> {history[-1]:.1f} nats")

    start = time.perf_counter()
    train_table, test_table = encode(model, train), encode(model, test)  # one encoder pass each
    options = dict(seeds=1, max_train=1000, max_test=300, max_epochs=20) if args.quick else dict(seeds=args.seeds)
    df = representation_table(None, train_table, test_table, seed=args.seed, device="cpu", **options)
    elapsed = time.perf_counter() - start
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\nrepresentation table ({elapsed:.1f} s; accuracies in %, mean ± sd over "
              f"{df.attrs['settings']['seeds']} seed(s); n_train {df.attrs['settings']['n_train']}, n_test "
              f"{df.attrs['settings']['n_test']})")
        print(format_representation_table(df).to_string())
    for note in df.attrs["notes"]:
        print("note:", note)
    mi = df.attrs["mutual_information"]
    if mi is not None:
        print("MI flags:", ", ".join(mi.flags))
    probes = df.attrs["probes"]["MAP (posterior mean)"]
    for name, res in probes.items():
        chosen = [s.get("C", s.get("best_epoch")) for s in res.per_seed_settings]
        print(f"{name} probe on MAP: per seed {[round(100 * a, 2) for a in res.per_seed]}, "
              f"{'C' if name == 'linear' else 'best epoch'} per seed {chosen}")

    if args.out is not None:
        from latentdiag.plots.representation import plot_eigenspectrum, plot_sample_efficiency

        args.out.mkdir(parents=True, exist_ok=True)
        intrinsic = df.attrs["intrinsic"]
        fig = plot_eigenspectrum({"MAP": intrinsic["MAP (posterior mean)"],
                                  "embedding": intrinsic["distribution embedding"],
                                  "sample": intrinsic[next(k for k in intrinsic if k.startswith("sample"))]})
        fig.savefig(args.out / "eigenspectrum.png", dpi=120)
        tr = extract_representations(train_table, kind="map")
        te = extract_representations(test_table, kind="map")
        start = time.perf_counter()
        curve = sample_efficiency(tr, None, te, None, probe="linear", seeds=1 if args.quick else args.seeds,
                                  sizes=(10, 100, 1000, None), seed=args.seed)
        print(f"\n{curve} ({time.perf_counter() - start:.1f} s)")
        plot_sample_efficiency({"linear probe, MAP": curve}).savefig(args.out / "sample_efficiency.png", dpi=120)
        print(f"wrote {args.out / 'eigenspectrum.png'} and {args.out / 'sample_efficiency.png'}")


if __name__ == "__main__":
    main()
