"""Single-file models over the vqkernels ops: the VQGAN first stage (taming-compatible), its PatchGAN
discriminator, the perceptual + adversarial loss it trains with, the GPT over its code indices and the two-stage
model (taming's Net2NetTransformer)."""
from .discriminator import ActNorm, NLayerDiscriminator, weights_init
from .losses import VQGANLoss, adopt_weight, hinge_d_loss, vanilla_d_loss
from .lpips import LPIPS
from .gpt import GPT, LLAMAGEN_MODELS, GenerateStats, GPTConfig, generate_reference, llamagen_config
from .two_stage import VQGANTransformer, VQGANTransformerConfig
from .vqgan import VQGANConfig, VQModel

__all__ = ["VQGANConfig", "VQModel", "NLayerDiscriminator", "ActNorm", "weights_init", "VQGANLoss", "adopt_weight",
           "hinge_d_loss", "vanilla_d_loss", "LPIPS", "GPT", "GPTConfig", "GenerateStats", "generate_reference",
           "llamagen_config", "LLAMAGEN_MODELS",
           "VQGANTransformer", "VQGANTransformerConfig"]
