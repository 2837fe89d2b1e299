"""What goes into the model: the numeric precision names and their dtypes (LR -> model inputs to follow)."""

from __future__ import annotations

import torch

# config's train.precision and the CLIs' --precision; fp32 means no autocast.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
