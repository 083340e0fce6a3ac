"""Reference models built on the protocol (the LPVAE / FPVAE family arrives with the trainer)."""

from latentdiag.models.mlp import GaussianMLPEncoder, MLPDecoder, mlp_vae

__all__ = ["GaussianMLPEncoder", "MLPDecoder", "mlp_vae"]
