"""Argument checks shared by every public entry point.

Each returns the normalised value or raises an exception whose message
names the argument, what was expected and what was given.
"""

import numbers

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def check_int(name, value):
    """``value`` as an int; bools, floats and other non-integers are TypeErrors."""
    if type(value) is int:  # the common case, checked first: this runs per token
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r} of type {type(value).__name__}")
    return int(value)


def check_positive(name, value):
    """``value`` as an int >= 1."""
    value = check_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return value


def check_storage_dtype(dtype):
    """``dtype`` as a native-order float16, float32 or float64 ``np.dtype``."""
    if dtype is None:  # np.dtype(None) would silently mean float64
        raise TypeError("dtype must be one of float16, float32, float64; got None")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be one of float16, float32, float64; got {dtype!r}") from exc
    if dt.newbyteorder("=") not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of float16, float32, float64; got {dt}")
    return dt.newbyteorder("=")


def as_ndarray(x, name):
    """The ndarray behind ``x``: an ndarray, a ``.data``-holding tensor, or array-like."""
    if isinstance(x, np.ndarray):
        return x
    data = getattr(x, "data", None)
    if isinstance(data, np.ndarray):
        return data
    try:
        return np.asarray(x)
    except Exception as exc:
        raise TypeError(f"{name} must be array-like; got {type(x).__name__}") from exc
