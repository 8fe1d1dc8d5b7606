"""LEAF's Shakespeare next-character model: embedding 8, two LSTM layers of 256, a dense layer to the vocabulary.

Caldas et al., "LEAF: A Benchmark for Federated Settings" (2018), whose reference model (and FedAvg's Shakespeare
LSTM, McMahan et al., 2017) is an 8-dimensional character embedding, two LSTM layers of 256 units and a softmax
over the characters. Here the model gives logits for the next character at every position: inputs are token ids
[B, L], logits [B, L, vocab]. Which positions are scored is the data's choice: the engine leaves every position
whose target is 0 out of the loss and the accuracy (`fedspa_jax.client.weighted_loss`), so LEAF's task (one next
character per sample, LEAF's model reading the last position's output) has targets only at the last position, and
TFF's and FedJAX's (every position) have targets everywhere but padding (`fedspa_jax.data.natural`).

Every weight matrix is a leaf with two dimensions, so FedSpa masks all of them (`fedspa_jax.masks.is_maskable`):
the embedding table `embed/embedding` [vocab, 8], each LSTM's input kernels `lstm*/cell/i{i,f,g,o}/kernel`
[in, hidden] and recurrent kernels `lstm*/cell/h{i,f,g,o}/kernel` [hidden, hidden], and `head/kernel`
[hidden, vocab]. The gate biases and the head's bias are 1-D and stay dense. The cell is flax's
`OptimizedLSTMCell` (one matmul for the four input kernels and one for the four recurrent kernels per step, with
`LSTMCell`'s parameter layout), run by `nn.RNN`, a `scan` over time: one compiled step per sequence length.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class CharLSTM(nn.Module):
  """embedding - LSTM x `layers` - head, applied at every position.

  Attributes:
    num_classes: the vocabulary size (tokens 0..num_classes-1, token 0 = padding); logits have this many entries.
    embed_dim: width of the character embedding (LEAF: 8).
    hidden: units of each LSTM layer (LEAF: 256).
    layers: number of stacked LSTM layers (LEAF: 2).
  """

  num_classes: int
  embed_dim: int = 8
  hidden: int = 256
  layers: int = 2

  @property
  def vocab_size(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits [B, L, vocab] for token ids x [B, L] (any numeric dtype: the engine hands float32 ids, exact < 2^24)."""
    if x.ndim != 2:
      raise ValueError(f"CharLSTM takes token ids [batch, length], got shape {x.shape}")
    tokens = x.astype(jnp.int32)
    h = nn.Embed(self.num_classes, self.embed_dim, name="embed")(tokens)
    for i in range(self.layers):
      h = nn.RNN(nn.OptimizedLSTMCell(self.hidden, parent=None), name=f"lstm{i + 1}")(h)
    return nn.Dense(self.num_classes, name="head")(h)
