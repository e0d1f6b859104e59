"""Layer 1, config: what the user sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from macopt.config import MethodConfig


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    """Exact attention over each row's last ``window`` keys (0: every key: exact)."""

    method: ClassVar[str] = "toy"

    window: int = 0
