"""The horizon study (Zhang et al. 2022, Table 2) from Python: the same run as ``latentdiag study horizons``.

    python examples/lpvae_horizons.py                 # the CPU-scale run of docs/studies/horizons.md
    python examples/lpvae_horizons.py --quick         # the pipeline check (seconds)
    python examples/lpvae_horizons.py --data mnist:/path/to/mnist --scale paper --epochs 100 --device cuda

Rerunning with the same --out resumes: finished models are reused, an interrupted one continues from its last
epoch.
"""

from __future__ import annotations

import argparse

from latentdiag.studies import run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--scale", choices=["cpu", "paper"], default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="latentdiag-study-horizons")
    args = parser.parse_args()
    result = run_study("horizons", quick=args.quick, data=args.data, epochs=args.epochs, seeds=args.seeds,
                       scale=args.scale, device=args.device, out=args.out)
    print(open(result.files[1], encoding="utf-8").read())


if __name__ == "__main__":
    main()
