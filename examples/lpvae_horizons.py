"""Short CPU runs of the LPVAE family on the bundled MNIST-5k: h = 0, 1, 2 and full (FPVAE).

Reproduces, in miniature, Table 2 of Zhang et al., "Improving VAE-based Representation Learning" (2022): for each
decoder horizon it trains a small LPVAE (256-way categorical on grey levels) with latentdiag's trainer, then
prints test bits/dim, rate, index-code MI, PCA intrinsic dimension of the posterior means and a linear-probe
accuracy. The paper's trends: BPD and MI fall as h grows, the linear probe rises.

    python examples/lpvae_horizons.py                    # 3 epochs each: ~11 min on 2 shared CPU cores
    python examples/lpvae_horizons.py --epochs 6         # ~15-25 min; clearer trends
    python examples/lpvae_horizons.py --epochs 2 --horizons 0 full   # quicker

Sizes are reduced for the CPU (see SMALL below; the paper uses 500-unit layers, 32 conditioning channels, a
256-channel PixelCNN with 5 residual blocks and 100 epochs). MI is the full-test-set index-code MI, bounded by
log N = 6.91 nats for N = 1000 (the paper's "Mutual Info" row is the rate, an upper bound).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from latentdiag.data import mnist5k
from latentdiag.estimators.encoded import encode
from latentdiag.estimators.likelihood import iw_nll
from latentdiag.models.lpvae import reference_config
from latentdiag.train.trainer import train

SMALL = {"latent_dim": 32, "hidden": 256, "cond_channels": 8, "channels": 32, "res_blocks": 2}


def linear_probe(train_table, test_table, seed: int = 0) -> tuple[float, str]:
    """Test accuracy of a linear SVM on posterior means with a validation-chosen C.

    Uses latentdiag.estimators.probes.linear_probe (3 seeds) when it exists; otherwise scikit-learn's LinearSVC on
    standardised features with C chosen on a held-out fifth of the training set. Returns (accuracy, which)."""
    try:
        from latentdiag.estimators.probes import linear_probe as library_probe
    except ImportError:
        library_probe = None
    if library_probe is not None:
        res = library_probe(train_table.means, train_table.labels, test_table.means, test_table.labels, seed=seed)
        return float(res.mean), f"latentdiag linear_probe, {len(res.per_seed)} seeds"
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    xtr, ytr = train_table.means.numpy(), train_table.labels.numpy()
    xte, yte = test_table.means.numpy(), test_table.labels.numpy()
    order = np.random.default_rng(seed).permutation(len(ytr))
    val, fit = order[: len(order) // 5], order[len(order) // 5:]

    def svm(c: float):
        return make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=5000, random_state=seed))

    best = max((0.01, 0.1, 1.0, 10.0), key=lambda c: svm(c).fit(xtr[fit], ytr[fit]).score(xtr[val], ytr[val]))
    return float(svm(best).fit(xtr, ytr).score(xte, yte)), f"sklearn LinearSVC, C = {best}"


def intrinsic_dim(test_table) -> float:
    try:
        from latentdiag.estimators.representation import intrinsic_dimension
    except ImportError:
        return math.nan
    return float(intrinsic_dimension(test_table.means.numpy(), bootstrap=0).dimension)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--likelihood", choices=["categorical", "bernoulli"], default="categorical",
                        help="256-way categorical on grey levels (the paper's), or Bernoulli on binarised digits")
    parser.add_argument("--horizons", nargs="+", default=["0", "1", "2", "full"])
    parser.add_argument("--iw-samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = "levels" if args.likelihood == "categorical" else "binary"
    train_split, test_split = mnist5k("train", format=fmt), mnist5k("test", format=fmt)
    rows = []
    for h in args.horizons:
        horizon = h if h == "full" else int(h)
        config = reference_config("lpvae_mnist", horizon=horizon, likelihood=args.likelihood, **SMALL)
        t0 = time.perf_counter()
        res = train(config, train_split, test_data=test_split, epochs=args.epochs, batch_size=100, lr=args.lr,
                    seed=args.seed, device="cpu",
                    callback=lambda r, h=h: print(f"  h={h} epoch {r['epoch']}: train -ELBO {r['train_neg_elbo']:.1f}"
                                                  f"  test bpd {r['test_bpd']:.4f}  rate {r['test_rate']:.2f}  "
                                                  f"MI {r['test_mi']:.2f}  ({r['seconds']:.0f} s)", flush=True))
        model = res.model
        nll = iw_nll(model, test_split, k=args.iw_samples, seed=args.seed)
        tr, te = encode(model, train_split, seed=args.seed), encode(model, test_split, seed=args.seed)
        acc, probe = linear_probe(tr, te, seed=args.seed)
        last = res.last
        rows.append({"h": h, "bpd_iw": nll.extra["bits_per_dim"], "bpd_elbo": last["test_neg_elbo_bpd"],
                     "rate": last["test_rate"], "mi": last["test_mi"], "mi_sat": last["test_mi_saturated"],
                     "id": intrinsic_dim(te), "probe": acc, "probe_how": probe,
                     "minutes": (time.perf_counter() - t0) / 60})
    print(f"\nMNIST-5k test set (N = {len(test_split)}, {fmt}, {args.likelihood}), {args.epochs} epochs each, "
          f"lr {args.lr}, sizes {SMALL}")
    print(f"{'model':<14}{'BPD (IW k=' + str(args.iw_samples) + ')':>16}{'BPD (-ELBO)':>13}{'rate':>8}{'MI':>8}"
          f"{'ID':>5}{'lin. probe':>12}{'min':>6}")
    for r in rows:
        name = "VAE (h=0)" if r["h"] == "0" else ("FPVAE" if r["h"] == "full" else f"LPVAE (h={r['h']})")
        mi = f"{r['mi']:.2f}" + ("*" if r["mi_sat"] else "")
        print(f"{name:<14}{r['bpd_iw']:>16.4f}{r['bpd_elbo']:>13.4f}{r['rate']:>8.2f}{mi:>8}{r['id']:>5.0f}"
              f"{100 * r['probe']:>11.1f}%{r['minutes']:>6.1f}")
    print("MI: index-code MI over the test set (bounded by log N = %.2f; * = saturated); ID: PCA intrinsic "
          "dimension of the test posterior means; probe: %s" % (math.log(len(test_split)), rows[-1]["probe_how"]))


if __name__ == "__main__":
    main()
