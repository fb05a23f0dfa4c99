"""Argument checks shared by the library and its application: one wording
for every invalid argument, naming it, what was expected and what came in:

    Received an invalid value for `rank`, expected a positive integer no
    larger than `units` (16). Received: rank=0
"""

import numbers


def invalid(argument, expected, value):
    """The `ValueError` for an invalid `argument`."""
    return ValueError(
        f"Received an invalid value for `{argument}`, expected {expected}. "
        f"Received: {argument}={value!r}"
    )


def is_int(value):
    """An integer, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    """A real number, and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(argument, value):
    """Raises `ValueError` naming `argument` unless `value` is an integer
    >= 1."""
    if not is_int(value) or value < 1:
        raise invalid(argument, "a positive integer", value)
    return int(value)
