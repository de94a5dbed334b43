"""Values (task arguments, results) as they travel: an opaque msgpack blob plus its own array frames.

numpy arrays become frames of their own, referenced from the blob by an extension
(``ARRAY_EXT``); the broker never decodes a blob, it forwards blob and frames as they
are. Nothing is pickled. ``broker.protocol`` re-exports this module's names, so the
wire's vocabulary is imported from one place. It imports nothing of gridq.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Sequence

import msgpack
import numpy as np

#: msgpack extension code of an array reference inside a value blob.
ARRAY_EXT = 1


class ProtocolError(ValueError):
    """A peer sent frames that do not form a valid gridq message."""


class EncodeError(TypeError):
    """A value cannot travel: it is not msgpack-encodable nor a numeric array."""


def frame_buffer(frame):
    """A frame's memory without a copy."""
    return frame if isinstance(frame, (bytes, bytearray, memoryview)) else frame.buffer


def pack_value(value: Any) -> tuple[bytes, list]:
    """Pack a value into a msgpack blob and the array frames it references.

    numpy arrays become separate frames (zero-copy for contiguous arrays); numpy
    scalars become Python numbers; tuples become lists. Raises EncodeError.
    """
    try:  # the usual value, of plain msgpack types: a packer of this thread's, reused, and no hook
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer().pack
    try:
        return pack(value), []
    except (TypeError, ValueError, OverflowError):
        pass  # arrays or numpy scalars (or what cannot travel, which the hook below names)
    frames: list = []

    def default(obj):
        if isinstance(obj, np.ndarray):
            return _array_ext(obj, frames)
        if isinstance(obj, np.generic):
            if obj.dtype.kind in "biuf":
                return obj.item()
            if obj.dtype.kind == "c":
                return _array_ext(np.asarray(obj), frames)
        if _is_cupy_array(obj):
            return _array_ext(obj.get(), frames)
        raise EncodeError(f"cannot encode value of type {type(obj).__name__}: use msgpack types or numeric numpy arrays")

    try:
        blob = msgpack.packb(value, default=default)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode value: {exc}") from None
    return blob, frames


def _array_ext(array: np.ndarray, frames: list) -> msgpack.ExtType:
    if array.dtype.kind not in "biufc":
        raise EncodeError(f"cannot encode array of dtype {array.dtype}: only numeric dtypes travel")
    fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
    if not (array.flags.c_contiguous or fortran):
        array = np.ascontiguousarray(array)
    raw = array.T if fortran else array
    frames.append(memoryview(raw.reshape(-1).view(np.uint8)) if raw.size else b"")
    ref = msgpack.packb((len(frames) - 1, array.dtype.str, array.shape, fortran))
    return msgpack.ExtType(ARRAY_EXT, ref)


def _is_cupy_array(obj) -> bool:
    return type(obj).__module__.startswith("cupy") and hasattr(obj, "get")


def unpack_value(blob, frames: Sequence = ()) -> Any:
    """Inverse of pack_value. Arrays are read-only views on the received frames."""
    try:  # without frames (the usual value) no hook need be made: an array in it is an error
        return msgpack.unpackb(blob, ext_hook=partial(_array_at, frames) if frames else _no_array,
                               strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"bad value blob: {exc}") from None


def _array_at(frames: Sequence, code: int, data: bytes) -> np.ndarray:
    """The array an extension of a value blob refers to: a read-only view on its frame."""
    if code != ARRAY_EXT:
        raise ProtocolError(f"unknown msgpack extension {code}")
    index, dtype_str, shape, fortran = msgpack.unpackb(data)
    if not 0 <= index < len(frames):
        raise ProtocolError(f"array frame {index} missing: message has {len(frames)}")
    dtype = np.dtype(dtype_str)
    if dtype.kind not in "biufc":
        raise ProtocolError(f"array dtype {dtype} not allowed")
    flat = np.frombuffer(frame_buffer(frames[index]), dtype=dtype)
    shape = tuple(shape)
    if flat.size != int(np.prod(shape, dtype=np.int64)):
        raise ProtocolError(f"array frame of {flat.size} items does not fit shape {shape}")
    return flat.reshape(shape, order="F" if fortran else "C")


_no_array = partial(_array_at, ())
#: pack_value's msgpack packers, one per thread (a packer is not to be shared)
_packers = threading.local()
