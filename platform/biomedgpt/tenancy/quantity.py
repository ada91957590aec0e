"""Kubernetes resource quantities (`12`, `500m`, `1536Gi`) as exact numbers, for quota arithmetic."""

from __future__ import annotations

import re
from fractions import Fraction

_SUFFIX = {
    "": Fraction(1), "m": Fraction(1, 1000),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12), "P": Fraction(10**15),
    "Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50),
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")


def parse_quantity(value: int | str) -> Fraction:
    """The exact value of a quantity (cores for CPU, bytes for memory). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {value!r} (e.g. 12, 500m, 64Gi)")
    return Fraction(m.group(1)) * _SUFFIX[m.group(2) or ""]


def format_quantity(value: Fraction, *, binary: bool = False) -> str:
    """A canonical quantity string: whole numbers plain, else milli-units; `binary` picks the largest
    exact Ki/Mi/Gi/Ti unit (for memory)."""
    if binary and value:
        for suffix in ("Ti", "Gi", "Mi", "Ki"):
            unit = _SUFFIX[suffix]
            if value % unit == 0:
                return f"{value // unit}{suffix}"
    if value.denominator == 1:
        return str(value.numerator)
    milli = value * 1000
    if milli.denominator != 1:
        raise ValueError(f"{float(value)} has no exact milli-unit quantity")
    return f"{milli.numerator}m"
