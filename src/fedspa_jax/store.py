"""The client store: every client's persistent state at rest, [K, ...] leaves, bool leaves packed 32 per uint32.

Between rounds a client's state lives in the store in its encoded form: a bool leaf (a mask) of shape `s` becomes
uint32 words [ceil(prod(s) / 32)] (1 bit per weight per client); other leaves (Ditto's personal models, FedRep's
heads) are kept as they are. The round decodes only its cohort's rows and encodes them back; checkpoints hold the
encoded form. A `StoreLayout` is built from one client's state template, so algorithms write and read their state in
its natural (unpacked) form and never see the words.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedspa_jax.masks import pack_words, unpack_words

# Initial states are drawn this many bytes of unpacked state at a time (bounded temporaries for any K).
INIT_CHUNK_BYTES = 2**22


@dataclasses.dataclass(frozen=True)
class StoreLayout:
  """How one client's state is stored.

  Attributes:
    template: pytree of `jax.ShapeDtypeStruct`, one client's (decoded) state.
  """

  template: Any

  def encode(self, rows: Any) -> Any:
    """Decoded rows (leaves [..., *shape]) -> stored rows (bool leaves as uint32 words [..., W])."""
    return jax.tree.map(lambda r, t: pack_words(r, t.shape) if t.dtype == jnp.bool_ else r, rows, self.template)

  def decode(self, stored: Any) -> Any:
    """Inverse of `encode`."""
    return jax.tree.map(lambda s, t: unpack_words(s, t.shape) if t.dtype == jnp.bool_ else s, stored, self.template)

  def stored_template(self, num_clients: int) -> Any:
    """ShapeDtypeStructs of the whole [K, ...] store."""

    def one(t):
      if t.dtype == jnp.bool_:
        return jax.ShapeDtypeStruct((num_clients, -(-math.prod(t.shape) // 32)), jnp.uint32)
      return jax.ShapeDtypeStruct((num_clients, *t.shape), t.dtype)

    return jax.tree.map(one, self.template)

  def gather(self, store: Any, ids: jax.Array) -> Any:
    """The decoded state of clients `ids` [S] (ids past K - 1 are clipped; they only occur for weight-0 padding)."""
    return self.decode(jax.tree.map(lambda a: jnp.take(a, ids, axis=0, mode="clip"), store))

  def scatter(self, store: Any, ids: jax.Array, rows: Any) -> Any:
    """Writes decoded `rows` [S, ...] into rows `ids` of the store; ids past K - 1 are dropped."""
    encoded = self.encode(rows)
    return jax.tree.map(lambda a, r: a.at[ids].set(r.astype(a.dtype), mode="drop"), store, encoded)

  def bytes_per_client(self) -> int:
    """Stored bytes of one client's state."""
    leaves = jax.tree.leaves(self.stored_template(1))
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)


def make_layout(init_clients: Callable[[jax.Array, Any, jax.Array], Any], params: Any) -> StoreLayout:
  """The layout of the state `init_clients(key, params, ids)` returns (shapes only, nothing is computed)."""
  rows = jax.eval_shape(lambda key, p: init_clients(key, p, jnp.zeros((1,), jnp.int32)),
                        jax.eval_shape(jax.random.key, 0), params)
  return StoreLayout(jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape[1:], r.dtype), rows))


def init_store(
    init_clients: Callable[[jax.Array, Any, jax.Array], Any],
    layout: StoreLayout,
    key: jax.Array,
    params: Any,
    num_clients: int,
    *,
    first: jax.Array | int = 0,
    chunk_bytes: int = INIT_CHUNK_BYTES,
) -> Any:
  """The encoded [K, ...] store, drawn in chunks of clients so temporaries stay O(chunk * P), not O(K * P).

  Args:
    init_clients: (key, params, ids [C]) -> decoded state rows [C, ...].
    layout: the store layout.
    key: PRNG key (client k's state depends on k, not on the chunking).
    params: the initial params.
    num_clients: K, or the number of clients of a block (with `first`).
    first: the id of the first client (a device's block of a sharded population starts at d * B).
    chunk_bytes: decoded bytes drawn at once.

  Returns:
    The store, leaves [num_clients, ...] (clients first, first + 1, ...).
  """
  per_client = max(1, sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in jax.tree.leaves(layout.template)))
  chunk = int(min(num_clients, max(1, chunk_bytes // per_client)))
  num_chunks = -(-num_clients // chunk)

  @jax.jit
  def draw(key, params, first):
    def one(c):
      ids = first + jnp.minimum(c * chunk + jnp.arange(chunk, dtype=jnp.int32), num_clients - 1)
      return layout.encode(init_clients(key, params, ids))

    chunks = jax.lax.map(one, jnp.arange(num_chunks, dtype=jnp.int32))
    return jax.tree.map(lambda a: a.reshape((num_chunks * chunk,) + a.shape[2:])[:num_clients], chunks)

  return draw(key, params, jnp.asarray(first, jnp.int32))


def check_store(store: Any, layout: StoreLayout, num_clients: int) -> None:
  """Raises ValueError unless `store` has exactly the layout's structure, shapes and dtypes for K clients."""
  want = layout.stored_template(num_clients)
  want_leaves, want_def = jax.tree.flatten(want)
  got_leaves, got_def = jax.tree.flatten(store)
  if want_def != got_def:
    raise ValueError(f"the client store has structure {got_def}, expected {want_def} for this algorithm and model")
  for path_leaf, g, w in zip(jax.tree_util.tree_flatten_with_path(want)[0], got_leaves, want_leaves):
    if tuple(g.shape) != tuple(w.shape) or jnp.dtype(g.dtype) != jnp.dtype(w.dtype):
      raise ValueError(
          f"client store leaf {jax.tree_util.keystr(path_leaf[0])} has shape {tuple(g.shape)} and dtype {g.dtype}, "
          f"expected {tuple(w.shape)} {jnp.dtype(w.dtype)} (K={num_clients}; masks are stored as uint32 bit words): "
          "a state or checkpoint from another algorithm, model, dataset or layout"
      )
