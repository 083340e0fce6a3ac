"""Training of reference models (a plain ELBO trainer until the LPVAE / FPVAE trainer lands)."""

from latentdiag.train.elbo import train_elbo
from latentdiag.train.text import train_text_vae

__all__ = ["train_elbo", "train_text_vae"]
