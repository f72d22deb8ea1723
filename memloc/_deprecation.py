"""Renamed keyword arguments and reordered positional ones: the old form keeps working, with a DeprecationWarning."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """Decorator: accept each ``old=`` keyword as ``renames[old]=``, warning that it is deprecated.

    Passing both the old and the new name is a ValueError.  ``inspect.signature`` of the wrapper
    shows the function's (new) signature.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ValueError(f"{fn.__name__}: pass {new}= only ({old}= is its deprecated name)")
                    warnings.warn(f"{fn.__name__}({old}=...) is deprecated; use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.__deprecated_kwargs__ = dict(renames)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def reordered_args(old_order: tuple[str, ...], *, is_old: Callable[[tuple], bool]) -> Callable[[F], F]:
    """Decorator: a call that passes the leading parameters positionally in their former order
    ``old_order`` (the same names as the function's first ``len(old_order)`` parameters, in
    another order) still works, with a DeprecationWarning.

    ``is_old(args)`` tells such a call apart from one in the new order by the positional
    arguments (e.g. "an int where the new order has a token tensor").  The old-order arguments are
    then passed by name; naming one of them again as a keyword is a TypeError, as for any call.
    ``inspect.signature`` of the wrapper shows the function's (new) signature.
    """

    def decorate(fn: F) -> F:
        new_order = tuple(inspect.signature(fn).parameters)[:len(old_order)]
        if sorted(new_order) != sorted(old_order):
            raise ValueError(f"{fn.__name__}: old order {old_order} must name its first parameters {new_order}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not is_old(args):
                return fn(*args, **kwargs)
            moved = args[:len(old_order)]
            clash = sorted(set(old_order[:len(moved)]) & set(kwargs))
            if clash:
                raise TypeError(f"{fn.__name__}() got multiple values for argument {clash[0]!r}")
            warnings.warn(f"{fn.__name__}({', '.join(old_order)}, ...) is the deprecated argument order; use "
                          f"{fn.__name__}({', '.join(new_order)}, ...)", DeprecationWarning, stacklevel=2)
            kwargs.update(zip(old_order, moved))
            return fn(*args[len(old_order):], **kwargs)

        wrapper.__deprecated_order__ = tuple(old_order)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
