"""HDM in pure PyTorch: the XUT + TREAD denoiser, flow matching, sampler, text/VAE wrappers, weight import.

This package imports no Ray, MLflow or pydantic.
"""

from .compile import compile_denoiser, compile_text_encoder, resolve_compile
from .config import OFFICIAL_XUT_BASE_ARCH, PRESETS, XUTConfig
from .denoiser import XUTDenoiser, build_denoiser, count_parameters
from .flow import SamplerConfig, flow_matching_loss, interpolate, sample, sample_timesteps, velocity_target
from .official import load_official_hdm, official_key_map, ours_to_official
from .optim import build_optimizer, mup_param_groups, warmup_cosine_schedule
from .pipeline import HDMPipeline, make_grid, read_parameters, save_png
from .release import save_official_hdm
from .positions import Camera, crop_latent, make_axial_pos
from .text_encoder import TextEncoder
from .vae import LatentVAE

__all__ = [
    "OFFICIAL_XUT_BASE_ARCH", "PRESETS", "XUTConfig", "XUTDenoiser", "build_denoiser", "count_parameters",
    "SamplerConfig", "flow_matching_loss", "interpolate", "sample", "sample_timesteps", "velocity_target",
    "load_official_hdm", "official_key_map", "ours_to_official", "build_optimizer", "mup_param_groups",
    "warmup_cosine_schedule", "Camera", "crop_latent", "make_axial_pos", "TextEncoder", "LatentVAE",
    "HDMPipeline", "make_grid", "read_parameters", "save_png", "save_official_hdm", "compile_denoiser",
    "compile_text_encoder", "resolve_compile",
]
