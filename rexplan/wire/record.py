"""Frozen: immutable records for the agent, which cannot afford dataclasses (importing inspect)."""

from __future__ import annotations

TYPE_CHECKING = False  # typing only for the type checker: the agent imports this on every run
if TYPE_CHECKING:
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_: object) -> object:
        return lambda cls: cls


_MISSING = object()


@dataclass_transform(frozen_default=True)
class _Fields(type):
    """Makes each annotated name of a Frozen class body a field, in order, as a frozen
    dataclass would: ``_fields`` and ``__slots__`` list them; a value in the body is the
    field's default (kept in ``_defaults``)."""

    def __new__(
        mcs, name: str, bases: tuple[type, ...], body: dict[str, Any], **kw: Any
    ) -> _Fields:
        fields = tuple(n for n in body.get("__annotations__", {}) if not n.startswith("_"))
        body["_defaults"] = {n: body.pop(n) for n in fields if n in body}
        body["_fields"] = fields
        body["__slots__"] = fields
        return super().__new__(mcs, name, bases, body, **kw)


class Frozen(metaclass=_Fields):
    """An immutable record like a frozen dataclass: built from its fields by position or name,
    equality, hash and repr by ``_fields``, in order (less ``_hidden`` in the repr); assigning
    a field raises AttributeError."""

    _fields: ClassVar[tuple[str, ...]]
    _defaults: ClassVar[dict[str, object]]
    _hidden: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: object, **kwargs: object) -> None:
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes {len(self._fields)} fields")
        values = {self._fields[i]: arg for i, arg in enumerate(args)}
        for name, value in kwargs.items():
            if name not in self._fields or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {name!r}")
            values[name] = value
        for name in self._fields:
            value = values.get(name, self._defaults.get(name, _MISSING))
            if value is _MISSING:
                raise TypeError(f"{type(self).__name__}: field {name!r} missing")
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Frozen)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = (f"{n}={getattr(self, n)!r}" for n in self._fields if n not in self._hidden)
        return f"{type(self).__name__}({', '.join(shown)})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")
