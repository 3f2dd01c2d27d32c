"""Config names of torch dtypes ("fp32", "bf16", "fp16"), shared by every config that takes one."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
