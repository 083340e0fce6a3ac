"""Reference models built on the protocol (the MLP VAE, the LPVAE / FPVAE family, the Transformer text VAE), a registry of named builders and the checkpoint format that
rebuilds them from a weights-only load."""

from latentdiag.models.checkpoint import (
    ReferenceCheckpoint,
    is_reference_checkpoint,
    load_reference_checkpoint,
    save_checkpoint,
)
from latentdiag.models.flow_prior import MADE, VLAEFlowPrior
from latentdiag.models.lpvae import PixelVAE, lpvae_cifar, lpvae_mnist, reference_config
from latentdiag.models.m2 import M2LPVAE, m2_lpvae
from latentdiag.models.mlp import GaussianMLPEncoder, MLPDecoder, mlp_vae
from latentdiag.models.transformer_vae import TransformerVAE, transformer_vae
from latentdiag.models.registry import build_model, model_config, register_model, registered_models

__all__ = ["GaussianMLPEncoder", "MLPDecoder", "ReferenceCheckpoint", "build_model", "is_reference_checkpoint",
           "load_reference_checkpoint", "mlp_vae", "model_config", "register_model", "registered_models",
           "save_checkpoint", "TransformerVAE", "transformer_vae", "MADE", "PixelVAE", "VLAEFlowPrior",
           "lpvae_cifar", "lpvae_mnist", "reference_config", "M2LPVAE", "m2_lpvae"]
