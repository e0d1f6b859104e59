"""Method configurations: frozen dataclasses, one per attention method (torchao style).

A config names its method (``method``) and what the passes must find for it
(``needs_pre_rope_query``). The graph passes look the method name up in their registry of
decode rewrites (:data:`macopt.passes.decode_rewrite.DECODE_REWRITES`), so a new method plugs
in by adding a config class here and registering its rewrite there; nothing branches on names.

>>> ExactConfig().method
'exact'
>>> MethodConfig.from_dict({"method": "exact"})
ExactConfig()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

_CONFIG_CLASSES: dict[str, type[MethodConfig]] = {}


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses set ``method`` and stay frozen and hashable."""

    method: ClassVar[str] = ""
    needs_pre_rope_query: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only the first class to claim a name is registered (test subclasses may reuse it).
        if cls.method:
            _CONFIG_CLASSES.setdefault(cls.method, cls)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able data, with its method name.

        >>> ExactConfig().to_dict()
        {'method': 'exact'}
        """
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> MethodConfig:
        """Rebuild a config written by :meth:`to_dict`."""
        fields = dict(data)
        name = fields.pop("method", None)
        if name not in _CONFIG_CLASSES:
            raise ValueError(f"unknown method {name!r}; known: {sorted(_CONFIG_CLASSES)}")
        return _CONFIG_CLASSES[name](**fields)

    def cache_key(self) -> str:
        """A stable string for compile-cache keys (class, method and every field)."""
        name = type(self).__qualname__
        return f"{name}:{self.method}:{self.needs_pre_rope_query}:{self.to_dict()}"


@dataclass(frozen=True)
class ExactConfig(MethodConfig):
    """Exact decode attention through macopt's split-KV kernel: the same keys, the same math.

    >>> import macopt
    >>> macopt.ExactConfig()
    ExactConfig()
    """

    method: ClassVar[str] = "exact"
    needs_pre_rope_query: ClassVar[bool] = False
