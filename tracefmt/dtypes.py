"""Tensor element types defined by SPEC.md and their numpy containers.

``bfloat16`` has no numpy dtype: its values travel as ``uint16`` bit patterns and are widened
exactly to ``float32`` on request. Arrays of ``ml_dtypes.bfloat16`` (as produced by JAX or
``torch.Tensor.numpy()`` via ml_dtypes) are recognised by name.
"""

from __future__ import annotations

import numpy as np

from .errors import UnsupportedDtypeError

#: dtype name -> (little-endian numpy container dtype, kind: f float, i int, u unsigned, b bool)
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "float64": (np.dtype("<f8"), "f"),
    "float32": (np.dtype("<f4"), "f"),
    "float16": (np.dtype("<f2"), "f"),
    "bfloat16": (np.dtype("<u2"), "f"),
    "int64": (np.dtype("<i8"), "i"),
    "int32": (np.dtype("<i4"), "i"),
    "int16": (np.dtype("<i2"), "i"),
    "int8": (np.dtype("i1"), "i"),
    "uint64": (np.dtype("<u8"), "u"),
    "uint32": (np.dtype("<u4"), "u"),
    "uint16": (np.dtype("<u2"), "u"),
    "uint8": (np.dtype("u1"), "u"),
    "bool": (np.dtype("?"), "b"),
}

#: numpy dtype -> SPEC.md name for the native-order dtypes (``dtype.name`` is computed in Python
#: at each access, ~2.5 us: too slow for every tensor a recorder writes).
_BY_DTYPE = {np.dtype(n): n for n in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                      "uint64", "uint32", "uint16", "uint8", "bool")}
FLOAT_DTYPES = frozenset(n for n, (_, k) in DTYPES.items() if k == "f")


def dtype_name(array: np.ndarray, override: str | None = None) -> str:
    """Return the SPEC.md dtype name of ``array``.

    Args:
        array: the numpy array to classify.
        override: a SPEC.md name to use instead (e.g. ``"bfloat16"`` for a ``uint16`` array
            that holds bfloat16 bit patterns).

    Returns:
        One of the keys of :data:`DTYPES`.

    Raises:
        UnsupportedDtypeError: the dtype (or the override) is not one SPEC.md defines, or the
            override's item size does not match the array's.
    """
    if override is not None:
        if override not in DTYPES:
            raise UnsupportedDtypeError(
                f"dtype {override!r} is not a steptrace dtype; use one of {', '.join(DTYPES)}"
            )
        if DTYPES[override][0].itemsize != array.dtype.itemsize:
            raise UnsupportedDtypeError(
                f"dtype {override!r} needs {DTYPES[override][0].itemsize}-byte items but the array "
                f"holds {array.dtype} ({array.dtype.itemsize} bytes)"
            )
        return override
    known = _BY_DTYPE.get(array.dtype)
    if known is not None:
        return known
    name = array.dtype.name
    if name == "bfloat16":
        return "bfloat16"
    if name in DTYPES and name != "bfloat16":
        return name
    raise UnsupportedDtypeError(
        f"tensors of dtype {array.dtype} cannot be recorded; steptrace records "
        f"{', '.join(DTYPES)} (cast complex values to two float channels first)"
    )


def container(name: str) -> np.dtype:
    """Return the little-endian numpy dtype that holds values of SPEC.md dtype ``name``.

    Raises:
        UnsupportedDtypeError: ``name`` is not a SPEC.md dtype.
    """
    try:
        return DTYPES[name][0]
    except KeyError:
        raise UnsupportedDtypeError(
            f"unknown dtype {name!r} in trace; this steptrace reads {', '.join(DTYPES)}"
        ) from None


def canonical(array: np.ndarray, name: str) -> np.ndarray:
    """Return ``array`` as a C-ordered, little-endian array of the container dtype of ``name``.

    The result shares memory with ``array`` when no conversion is needed.
    """
    target = container(name)
    a = array
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype != target:
        a = a.view(target)  # same item size: checked by dtype_name; bfloat16 -> its bits
    return a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """Return float32 values of bfloat16 ``bits`` (uint16); exact, NaN payloads kept."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


_F16_SCALE = np.float32(2.0**112)  # float32 exponent bias 127 minus float16 bias 15, as a power of 2
_F16_BODY = np.int32(0x8FFFE000 - (1 << 32))  # the sign bit and the 15 bits of exponent and mantissa
#: Magnitude from which a float16 widened with ``specials=False`` was ±inf or NaN.
F16_SPECIAL_MAGNITUDE = 65536.0


def widen_float16(h: np.ndarray, out: np.ndarray | None = None, *, specials: bool = True) -> np.ndarray:
    """Return float32 values of float16 ``h``: exact for every number (subnormals, ±0, ±inf);
    NaN stays NaN (its payload may change). Several times faster than numpy's float16 cast,
    which is not vectorised on x86.

    The sign-extended bits shifted left by 13 put the sign, exponent and mantissa where a float32
    keeps them; multiplying by 2**112 rebases the exponent (float16 subnormals land on float32
    subnormals and come out exact); exponent 31 (inf/NaN) is set to float32's 255 first.

    Args:
        h: a float16 (or uint16 bits) array, any shape.
        out: a C-contiguous int32 (or float32) array of ``h.size`` elements to fill, reused by
            callers in loops (fresh memory is slow to touch); None allocates one.
        specials: set exponent 31 to float32's 255 (±inf, NaN). False leaves out that pass
            (about half the work): ±inf and NaN then come out as *finite* values of magnitude
            2**16 or more, which no float16 number reaches (the largest is 65504), so a caller
            that looks at the range anyway can tell that it must widen again with specials.

    Returns:
        ``out`` viewed as float32, shaped like ``h``.
    """
    o = np.empty(h.size, np.int32) if out is None else out.reshape(-1).view(np.int32)
    bits = np.ascontiguousarray(h).reshape(-1).view(np.int16)
    np.copyto(o, bits)  # sign-extended
    np.left_shift(o, 13, out=o)
    np.bitwise_and(o, _F16_BODY, out=o)
    if specials:
        special = (bits & np.int16(0x7C00)) == 0x7C00
        if special.any():
            np.bitwise_or(o, np.int32(0x7F800000), out=o, where=special)
    f = o.view(np.float32)
    with np.errstate(invalid="ignore"):
        np.multiply(f, _F16_SCALE, out=f)
    return f.reshape(h.shape)
