"""Argument checks shared by the library and its application: one wording
for every invalid argument, naming it, what was expected and what came in:

    Received an invalid value for `rank`, expected a positive integer no
    larger than `units` (16). Received: rank=0
"""

import numbers
import re


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


# No ".": torch refuses it in a variable's name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


#: Names that mean something else where an adapter is chosen: `"base"`
#: is the model without any adapter, `"all"` every adapter of a file.
RESERVED_NAMES = ("base", "all")


def check_adapter_name(name):
    """`name`, or a `ValueError`: letters, digits, `_`, `-` (at most 64,
    not starting with a separator), not one of `RESERVED_NAMES`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
        raise ValueError(
            "Received an invalid value for `name`, expected 1-64 letters, "
            "digits, '_' or '-' (starting with a letter or digit, no "
            f"'__'). Received: name={name!r}"
        )
    if name in RESERVED_NAMES:
        raise ValueError(
            f"Received an invalid value for `name`: {name!r} is reserved "
            "('base' chooses the model without adapters, 'all' every "
            "adapter). Choose another name."
        )
    return name
