"""Config value checks whose messages name the field, the allowed values and the value received."""

from __future__ import annotations

from typing import Any


def check_choice(field_name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{field_name}={value!r} is not valid: choose one of {', '.join(map(str, allowed))}")


def check_positive(field_name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field_name}={value!r} is not valid: it must be {bound}")
