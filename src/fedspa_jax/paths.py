"""Paths of run folders on a local disk or in Google Cloud Storage (gs://), through one abstraction: `etils.epath`.

Every file a run writes or reads on resume goes through here, so `--out runs/x` and `--out gs://bucket/x` behave the
same; a multi-host job needs the second, since its hosts share no disk. epath reaches gs:// through fsspec's gcsfs
(the `gcs` extra: `pip install 'fedspa-jax[gcs]'`); orbax writes checkpoints there with tensorstore's own GCS
client. Both honour an emulator: gcsfs `STORAGE_EMULATOR_HOST`, tensorstore `TENSORSTORE_GCS_HTTP_URL`.

Object stores have no folders and cannot append or rename atomically, so files are written whole (`write_text`,
`write_bytes`: one upload, or a temporary file renamed on a local disk), folders are made only on local disks
(gcsfs would create a missing bucket), and `check_writable` proves a cloud folder usable before a run starts.

    folder = paths.as_path("gs://bucket/run")     # ConfigError without gcsfs: names the extra to install
    paths.check_writable(folder)                  # ConfigError: endpoint unreachable, bucket missing, no access
    paths.write_text(folder / "config.json", text)
"""

from __future__ import annotations

import io
import os
import socket
import urllib.parse
import uuid
from typing import Union

import numpy as np
from etils import epath

from fedspa_jax.config import ConfigError

Path = epath.Path
PathLike = Union[str, os.PathLike]

GCS_EXTRA = "pip install 'fedspa-jax[gcs]'"
_CLOUD = ("gs://",)
_UNSUPPORTED = ("s3://", "az://", "hf://")
_CONNECT_TIMEOUT_S = 10.0


def is_cloud(path: PathLike) -> bool:
  """Whether `path` is in an object store (gs://) rather than on a local disk."""
  return os.fspath(path).startswith(_CLOUD)


def as_path(path: PathLike) -> epath.Path:
  """`path` (a str, a pathlib.Path or an epath.Path) as an epath.Path.

  Raises:
    ConfigError: a gs:// path without gcsfs installed (the message names the extra), or another URL scheme.
  """
  text = os.fspath(path)
  if text.startswith(_UNSUPPORTED):
    raise ConfigError(f"{text}: only local paths and gs:// are supported for run folders")
  if text.startswith(_CLOUD):
    try:
      import gcsfs  # noqa: F401  (what epath reaches gs:// with; imported here to fail early and clearly)
    except ImportError:
      raise ConfigError(f"{text} is in Google Cloud Storage, which needs gcsfs: {GCS_EXTRA}") from None
  return epath.Path(text)


def absolute(path: PathLike) -> epath.Path:
  """`path` made absolute on a local disk (cloud paths already are)."""
  path = as_path(path)
  return path if is_cloud(path) else path.absolute()


def make_dirs(path: PathLike) -> None:
  """Creates a local folder and its parents; nothing in an object store (prefixes need no creating, and gcsfs's
  mkdir would create a missing bucket)."""
  path = as_path(path)
  if not is_cloud(path):
    path.mkdir(parents=True, exist_ok=True)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes a whole file so that readers see the old or the new file, never a part: a cloud object is replaced by
  one upload; a local file by a temporary `<name>.tmp` renamed over it."""
  path = as_path(path)
  if is_cloud(path):
    path.write_bytes(data)
    return
  make_dirs(path.parent)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text(path: PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode("utf-8"))


def can_append(path: PathLike) -> bool:
  """Whether a file at `path` can be appended to (local disks; object stores rewrite whole objects)."""
  return not is_cloud(path)


def remove(path: PathLike) -> None:
  """Removes a file or a whole folder (every object under a cloud prefix), if there."""
  path = as_path(path)
  if path.is_dir():
    path.rmtree()
  elif path.exists():
    path.unlink()


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
  """`np.savez` to any path."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """The arrays of an .npz file at any path."""
  with np.load(io.BytesIO(as_path(path).read_bytes())) as npz:
    return dict(npz)


def gcs_endpoint() -> str:
  """The Cloud Storage endpoint gcsfs talks to: `STORAGE_EMULATOR_HOST` when set, else Google's."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator not in ("", "default"):
    return emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"
  return f"https://storage.{os.environ.get('GOOGLE_CLOUD_UNIVERSE_DOMAIN', 'googleapis.com')}"


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def check_writable(folder: PathLike) -> None:
  """For a cloud folder: the endpoint answers, the bucket exists, and a probe object can be written, read back and
  deleted there. Nothing to check on a local disk (the folder is made when the run starts).

  Run before anything else touches the folder, so a bad `--out` fails in seconds, not after gcsfs's retries
  (about 30 s per call) or after training.

  Raises:
    ConfigError: one line that says what is wrong.
  """
  folder = as_path(folder)
  if not is_cloud(folder):
    return
  endpoint = gcs_endpoint()
  url = urllib.parse.urlsplit(endpoint)
  source = " (STORAGE_EMULATOR_HOST)" if "STORAGE_EMULATOR_HOST" in os.environ else ""
  try:
    socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                             timeout=_CONNECT_TIMEOUT_S).close()
  except OSError as e:
    raise ConfigError(f"cannot reach the Cloud Storage endpoint {endpoint}{source} for {folder}: "
                      f"{e.strerror or _first_line(e)}") from None
  bucket = os.fspath(folder)[len("gs://"):].split("/", 1)[0]
  probe = folder / f".fedspa-jax-probe-{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"fedspa-jax")
    if probe.read_bytes() != b"fedspa-jax":
      raise OSError("a probe object read back differs from what was written")
    probe.unlink()
  except FileNotFoundError:
    raise ConfigError(f"cannot write to {folder}: bucket {bucket!r} does not exist at {endpoint} "
                      "(or these credentials cannot see it)") from None
  except Exception as e:  # gcsfs raises HttpError, OSError("Forbidden ..."), ValueError, aiohttp errors
    raise ConfigError(f"cannot write to {folder}: {_first_line(e)}") from None
