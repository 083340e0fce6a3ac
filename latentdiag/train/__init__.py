"""Training of reference models (a plain ELBO trainer until the LPVAE / FPVAE trainer lands)."""

from latentdiag.train.elbo import train_elbo

__all__ = ["train_elbo"]
