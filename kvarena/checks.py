"""Argument checks shared by every public entry point.

Each returns the normalised value or raises an exception whose message
names the argument, what was expected and what was given.
"""

import math
import numbers
import os

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
                    np.dtype(np.int8))
DTYPE_NAMES = "float16, float32, float64, int8"
MAX_THREADS = 2**31 - 1       # the kernel's thread count is a C int


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


def check_threads(num_threads):
    """``num_threads`` as an int in ``[1, MAX_THREADS]`` (the kernel takes a C int);
    None is every CPU this process may run on."""
    if num_threads is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(cpus or 1, MAX_THREADS))
    num_threads = check_int("num_threads", num_threads)
    if not 1 <= num_threads <= MAX_THREADS:
        raise ValueError(f"num_threads must be in [1, {MAX_THREADS}]; got {num_threads}")
    return num_threads


def check_bool(name, value):
    """``value`` as a bool; only True, False and NumPy's bools are accepted.

    A truthy string such as ``"no"`` is a TypeError rather than True.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {value!r} of type {type(value).__name__}")


def check_path(name, path):
    """``path`` (str, bytes or os.PathLike) as a non-empty str."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"{name} must be a str, bytes or os.PathLike; got {path!r} of type "
                        f"{type(path).__name__}") from None
    if not path:
        raise ValueError(f"{name} must name a file; got an empty path")
    if "\0" in path:
        raise ValueError(f"{name} must not contain a NUL character; got {path!r}")
    return path


def check_storage_dtype(dtype):
    """``dtype`` as a native-order float16, float32, float64 or int8 ``np.dtype``."""
    if dtype is None:  # np.dtype(None) would silently mean float64
        raise TypeError(f"dtype must be one of {DTYPE_NAMES}; got None")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be one of {DTYPE_NAMES}; got {dtype!r}") from exc
    if dt.newbyteorder("=") not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {DTYPE_NAMES}; got {dt}")
    return dt.newbyteorder("=")


def check_real(name, value, also=""):
    """``value``, any real number (a ``Fraction`` too; bools are not), as a
    float: inf for an int beyond float range, left to the caller's range
    check. ``also`` names what else the caller takes, for the message."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {also}a real number; got {value!r} "
                        f"of type {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def check_float_dtype(name, dtype):
    """``dtype`` as a native-order floating-point ``np.dtype`` (a model's weights).

    None is refused (``np.dtype(None)`` would silently mean float64), and so
    are integer dtypes, whose weights would be truncated to zeros, and
    longdouble, which no cache stores.
    """
    try:
        dt = check_storage_dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind != "f":
        raise TypeError(f"{name} must be a floating-point dtype (float16, float32, float64); "
                        f"got {dtype!r}")
    return dt


def as_ndarray(x, name):
    """The ndarray behind ``x``: an ndarray, a ``.data``-holding tensor, or array-like.

    Always a base-class ``np.ndarray``: a subclass is seen through a plain
    view of its buffer, so that the shape, strides and dtype checked are the
    ones any copy of it will use (a subclass may report any ``shape`` it
    likes). Masked arrays are refused: which value a masked position should
    store is the caller's decision.
    """
    if not isinstance(x, np.ndarray):
        data = getattr(x, "data", None)
        if isinstance(data, np.ndarray):
            x = data
        else:
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{name} must be array-like; got {type(x).__name__}") from exc
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} must not be a masked array: the cache stores every position; "
                        f"pass {name}.filled(fill_value) or {name}.data")
    if type(x) is not np.ndarray:
        x = np.ndarray.view(x, np.ndarray)    # the base class's view, not an override
    return x
