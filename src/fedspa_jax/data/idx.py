"""The IDX file format of MNIST and Fashion-MNIST (LeCun et al., http://yann.lecun.com/exdb/mnist/).

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order, big-endian. Files ending in `.gz` are gzip-compressed.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

# IDX dtype codes -> big-endian numpy dtypes.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}


def parse_idx(raw: bytes) -> np.ndarray:
  """Decodes the bytes of an (uncompressed) IDX file.

  Args:
    raw: the file's bytes.

  Returns:
    An array with the file's shape, in native byte order (uint8 for images and labels).

  Raises:
    ValueError: the bytes are not a well-formed IDX file.
  """
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(f"not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"IDX header claims {ndim} dimensions but the file has only {len(raw)} bytes")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(_DTYPES[raw[2]])
  expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
  if len(raw) != expected:
    raise ValueError(f"IDX file of shape {shape} and dtype {dtype} should have {expected} bytes, has {len(raw)}")
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def encode_idx(array: np.ndarray) -> bytes:
  """Encodes an array as the bytes of an (uncompressed) IDX file.

  Args:
    array: any shape (at most 255 dimensions), dtype uint8, int8, int16, int32, float32 or float64.

  Returns:
    The IDX bytes; `parse_idx(encode_idx(a))` equals `a`.
  """
  array = np.asarray(array)
  code = _CODES.get(array.dtype.newbyteorder("="))
  if code is None:
    raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of {sorted(str(d) for d in _CODES)}")
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()


def read_idx_bytes(path: str | os.PathLike) -> bytes:
  """The uncompressed bytes of an IDX file (gunzipped when the name ends in `.gz`)."""
  opener = gzip.open if os.fspath(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (`.gz` or uncompressed) into a numpy array; see `parse_idx`."""
  return parse_idx(read_idx_bytes(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes `array` as an IDX file, gzip-compressed when `path` ends in `.gz`."""
  opener = gzip.open if os.fspath(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(encode_idx(array))
