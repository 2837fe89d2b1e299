"""The SAM-DiffSR network: RRDB encoder, UNet denoiser, diffusion, and weights I/O."""

from samdiffsr.models.diffusion import GaussianDiffusion, build_model
from samdiffsr.models.rrdb import RRDBNet
from samdiffsr.models.unet import Unet
from samdiffsr.models.weights import WeightsError, load_rrdb_weights, load_weights, save_weights

__all__ = ["GaussianDiffusion", "RRDBNet", "Unet", "WeightsError", "build_model", "load_rrdb_weights",
           "load_weights", "save_weights"]
