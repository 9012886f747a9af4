"""Frozen: immutable records for the agent, which cannot afford dataclasses (importing inspect)."""

from __future__ import annotations


class Frozen:
    """An immutable record like a frozen dataclass: equality, hash and repr by ``_fields``, in
    order (less ``_hidden`` in the repr); assigning a field raises AttributeError."""

    __slots__: tuple[str, ...] = ()
    _fields: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()

    def _init(self, **values: object) -> None:
        for name, value in values.items():
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
