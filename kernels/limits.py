"""What macopt's decode kernels support: head dims, dtypes, GQA group.

The one source of these limits. The kernels are written for them; ``macopt.validation``
checks op inputs against them and the graph passes skip sites outside them (with the
reason), so the layers above import from here, never the other way round.

>>> from macopt.kernels.limits import SUPPORTED_HEAD_DIMS
>>> 128 in SUPPORTED_HEAD_DIMS
True
"""

from __future__ import annotations

import torch

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
MAX_GQA_GROUP = 16
