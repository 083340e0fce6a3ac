"""Training of reference models: the LPVAE / FPVAE trainer with its objectives, a plain ELBO trainer, and the
text VAE trainer."""

from latentdiag.train.elbo import train_elbo
from latentdiag.train.objectives import OBJECTIVES, Objective, make_objective, objective_from_config
from latentdiag.train.text import train_text_vae
from latentdiag.train.trainer import TrainResult, evaluate, train, train_reference

__all__ = ["OBJECTIVES", "Objective", "TrainResult", "evaluate", "make_objective", "objective_from_config", "train",
           "train_elbo", "train_reference", "train_text_vae"]
