"""The SAM-DiffSR network: RRDB encoder, UNet denoiser, diffusion, and weights I/O."""

from .diffusion import GaussianDiffusion, build_model
from .rrdb import RRDBNet
from .unet import Unet
from .weights import WeightsError, load_rrdb_weights, load_weights, save_weights

__all__ = ["GaussianDiffusion", "RRDBNet", "Unet", "WeightsError", "build_model", "load_rrdb_weights",
           "load_weights", "save_weights"]
