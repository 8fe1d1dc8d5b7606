"""The cache folder, and an on-disk cache of partitioned datasets keyed by dataset, arguments and seed.

The folder is `$FEDSPA_JAX_CACHE` when set, else `~/.cache/fedspa_jax`. Downloaded source files go in
`<cache>/<dataset>/`, partitions in `<cache>/partitions/` as uncompressed `.npz` files (one per key), so a hit
loads the exact arrays that were saved, without reading or partitioning the source again.

An entry also records the source files it was built from (`source_stamp`: path, size and modification time of
each). When the source is on disk and its stamp differs (another data folder, rewritten files), the entry is stale:
it is not read, and the new partition replaces it. When the source is not on disk at all, the entry is used as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from fedspa_jax.data.federated import ClientSplit, FederatedData

ENV_VAR = "FEDSPA_JAX_CACHE"
# Bump when the partitioners or the file layout change, so stale entries are never read.
FORMAT_VERSION = 2  # 2: flat splits (x [N_total, ...], offset, count)


def cache_dir() -> pathlib.Path:
  """The cache folder: `$FEDSPA_JAX_CACHE`, else `~/.cache/fedspa_jax` (not created here)."""
  env = os.environ.get(ENV_VAR)
  return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "fedspa_jax"


def partition_key(dataset: str, args: Mapping[str, Any]) -> str:
  """A stable hex key for one partition of `dataset` with `args` (JSON-serialisable, seed included)."""
  blob = json.dumps({"dataset": dataset, "format": FORMAT_VERSION, **args}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def partition_path(dataset: str, args: Mapping[str, Any]) -> pathlib.Path:
  """Where the partition of `dataset` with `args` is cached: `<cache>/partitions/<dataset>-<key>.npz`."""
  safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
  return cache_dir() / "partitions" / f"{safe}-{partition_key(dataset, args)}.npz"


def source_stamp(files: Sequence[str | os.PathLike] | None) -> list | None:
  """`[[resolved path, size, mtime_ns], ...]` of `files` (sorted), or None when there are none (no source on disk)."""
  if not files:
    return None
  stamp = []
  for f in sorted(pathlib.Path(f).resolve() for f in files):
    st = f.stat()
    stamp.append([str(f), st.st_size, st.st_mtime_ns])
  return stamp


def save_partition(path: pathlib.Path, data: FederatedData, source: list | None = None) -> None:
  """Writes `data` to `path` atomically (a temporary file in the same folder, then a rename), with the `source_stamp`
  of the files it was built from."""
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {"num_classes": data.num_classes, "name": data.name, "mean": data.mean, "std": data.std, "source": source}
  arrays = {
      f"{split}_{field}": np.asarray(getattr(getattr(data, split), field))
      for split in ("train", "test")
      for field in ("x", "y", "offset", "count")
  }
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like any other file
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load_partition(path: pathlib.Path, source: list | None = None) -> FederatedData | None:
  """Reads a partition written by `save_partition`; None when `path` does not exist, or when `source` (the source's
  `source_stamp` now; None: not on disk) differs from the stamp the entry was saved with (a stale entry)."""
  if not path.exists():
    return None
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(str(f["meta"]))
    if source is not None and meta.get("source") != source:
      return None
    splits = {
        s: ClientSplit(
            x=f[f"{s}_x"], y=f[f"{s}_y"], offset=f[f"{s}_offset"], count=f[f"{s}_count"],
            max_count=int(f[f"{s}_count"].max()),
        )
        for s in ("train", "test")
    }
  as_tuple = lambda v: None if v is None else tuple(v)
  return FederatedData(
      train=splits["train"],
      test=splits["test"],
      num_classes=int(meta["num_classes"]),
      name=meta["name"],
      mean=as_tuple(meta["mean"]),
      std=as_tuple(meta["std"]),
  )
