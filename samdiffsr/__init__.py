"""samdiffsr: SAM-DiffSR (structure-modulated diffusion for 4x super-resolution) at cluster scale.

The stable Python API (documented in README.md, "Python API"):

    from samdiffsr import SuperResolver
    sr = SuperResolver.from_pretrained("runs/x/weights/latest.pt")   # or the authors' .ckpt (+ config=...)
    out = sr.upscale(image)          # PIL image or H x W x 3 uint8 array -> (4H) x (4W) x 3 uint8 array

    from samdiffsr import load_config, build_model, load_weights
    cfg = load_config("configs/samdiffsr_df2k4x.yaml", ["model.lr_up_divisor=256"])
    model = build_model(cfg.model)
    load_weights(model, "model_ckpt_steps_400000.ckpt")        # ours or the authors' layout
    loss = model.training_loss(img_hr, img_lr, img_lr_up, mask, t=None, noise=None)
    sr = model.sample(img_lr, img_lr_up, generator=torch.Generator().manual_seed(0))
    m = spe_map(masks)                                            # K x H x W bool -> H x W float32
    lr = imresize(hr, 1 / 4)                                      # MATLAB bicubic (numpy)
    for s in read_samples("shards/demo/train/train-{000000..000001}.tar"): ...
"""

from samdiffsr.config import Config, ConfigError, load_config
from samdiffsr.data.reader import read_samples
from samdiffsr.evaluation.inference import InferenceError, SamplerSettings, SuperResolver
from samdiffsr.imresize import imresize, imresize_torch
from samdiffsr.masks.spe import spe_label_map, spe_map
from samdiffsr.models import GaussianDiffusion, WeightsError, build_model, load_rrdb_weights, load_weights, save_weights
from samdiffsr.models.loading import LoadedModel, load_model

__all__ = [
    "Config",
    "ConfigError",
    "GaussianDiffusion",
    "InferenceError",
    "LoadedModel",
    "SamplerSettings",
    "SuperResolver",
    "WeightsError",
    "build_model",
    "imresize",
    "imresize_torch",
    "load_config",
    "load_model",
    "load_rrdb_weights",
    "load_weights",
    "read_samples",
    "save_weights",
    "spe_label_map",
    "spe_map",
]
