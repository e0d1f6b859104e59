"""Per-site constants as one typed object, and the custom ops that take them.

A method's rewrite builds a frozen :class:`SiteParams` from its config (``from_config``: the
one place a config becomes op and kernel parameters) and its op rebuilds the same object.
Custom-op schemas take flat arguments only, so :func:`site_op` declares an op whose Python
function takes the params object last and whose schema lists the object's fields flat, in
field order; :meth:`SiteParams.op_args` gives them in that order. No one lines positions up by
hand, and the schema stays what it was (callers that pass flat arguments keep working).

>>> @dataclasses.dataclass(frozen=True)
... class Toy(SiteParams):
...     width: int
...     gain: float = 1.0
>>> Toy(4).op_args()
(4, 1.0)
>>> Toy.from_op_args((4, 2.0))
Toy(width=4, gain=2.0)
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

P = TypeVar("P", bound="SiteParams")


@dataclasses.dataclass(frozen=True)
class SiteParams:
    """Base of a method's per-site constants (subclasses: frozen dataclasses whose field types
    are custom-op argument types: int, float, bool, str, list[bool])."""

    def op_args(self) -> tuple:
        """The fields, in order: the op's trailing arguments."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))

    @classmethod
    def from_op_args(cls: type[P], args: Sequence[Any]) -> P:
        return cls(*args)


class SiteOp:
    """A custom op ``macopt::<name>`` whose last Python parameter is a :class:`SiteParams`.

    Calling it (or ``torch.ops.macopt.<name>``) takes the params' fields flat; ``overload``
    is the ``OpOverload`` a graph rewrite inserts."""

    def __init__(self, name: str, params: type[SiteParams], fn: Callable[..., Any]):
        self.params = params
        self.signature, self.n_leading = _flat_signature(fn, params)
        self.op = torch.library.custom_op(name, self._unflattened(fn), mutates_args=())
        namespace, op_name = name.split("::")
        self.overload = getattr(getattr(torch.ops, namespace), op_name).default
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.op(*args, **kwargs)

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register ``fn`` (leading arguments, then the params object) as the fake impl."""
        self.op.register_fake(self._unflattened(fn))
        return fn

    def _unflattened(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        signature, n_leading, params = self.signature, self.n_leading, self.params

        def flat(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = list(bound.arguments.values())
            return fn(*values[:n_leading], params.from_op_args(values[n_leading:]))

        flat.__signature__ = signature
        flat.__name__, flat.__qualname__, flat.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        flat.__module__ = fn.__module__
        return flat


def site_op(name: str, params: type[SiteParams]) -> Callable[[Callable[..., Any]], SiteOp]:
    """Declare ``fn(leading..., params: <params>)`` as the custom op ``name`` (functional:
    per-site state is not a graph value, see :mod:`macopt.state`)."""

    def declare(fn: Callable[..., Any]) -> SiteOp:
        return SiteOp(name, params, fn)

    return declare


def _flat_signature(fn: Callable[..., Any], params: type[SiteParams]
                    ) -> tuple[inspect.Signature, int]:
    """``fn``'s signature with its last parameter replaced by ``params``' fields."""
    hints = typing.get_type_hints(fn)
    *leading, _ = inspect.signature(fn).parameters.values()
    flat = [p.replace(annotation=hints[p.name]) for p in leading]
    field_hints = typing.get_type_hints(params)
    for field in dataclasses.fields(params):
        default = inspect.Parameter.empty
        if field.default is not dataclasses.MISSING:
            default = field.default
        flat.append(inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      annotation=field_hints[field.name], default=default))
    return inspect.Signature(flat, return_annotation=hints["return"]), len(leading)
