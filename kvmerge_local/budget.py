"""The compression budget, parsed once where a user gives it (CLI, UI, Python API) and carried as a value.

    b = Budget.parse("0.5")       # or 0.5, 512, "512", an existing Budget
    b.cells(1000)                 # -> 500 cells to keep of 1000
    Budget.parse(1.5)             # ValueError: a fractional budget must be in (0, 1], got 1.5

A budget is a fraction in ``(0, 1]`` of the document's tokens (a float) or an absolute cell count ``>= 1``
(an int; a string such as ``"512"`` that names a whole number above 1 is a count).  The methods' low-level
:func:`~kvmerge_local.methods.base.resolve_budget` is ``Budget(b).cells(n)``.  Importing this module loads
nothing but the standard library.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """A checked budget: ``value`` is a float fraction in (0, 1] or an int cell count >= 1 (ValueError else)."""

    value: float | int

    def __post_init__(self) -> None:
        b = self.value
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise ValueError(f"budget must be a fraction in (0, 1] or a positive int cell count, got {b!r}")
        if isinstance(b, numbers.Integral):
            if b < 1:
                raise ValueError(f"an absolute budget must be >= 1 cell, got {b}")
            object.__setattr__(self, "value", int(b))
        elif not 0.0 < float(b) <= 1.0:
            raise ValueError(f"a fractional budget must be in (0, 1], got {b}")
        else:
            object.__setattr__(self, "value", float(b))

    @classmethod
    def parse(cls, value: Budget | float | int | str) -> Budget:
        """A Budget from a number, a string (command line, form field) or a Budget; ValueError with the
        message users see when the value is not a number or out of range."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"budget must be a fraction in (0, 1] or a cell count, got {value!r}") from None
            value = int(v) if v.is_integer() and v > 1 else v
        return cls(value)

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.value, float)

    def cells(self, n: int) -> int:
        """Cells to keep of ``n >= 1`` (a fraction of it rounded, at least 1; a count capped at ``n``)."""
        n = int(n)
        if n < 1:
            raise ValueError(f"cannot compress {n} cells")
        if isinstance(self.value, int):
            return min(self.value, n)
        return max(1, min(n, int(round(self.value * n))))

    def __str__(self) -> str:
        return str(self.value)
