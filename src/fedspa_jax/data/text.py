"""The character vocabulary of the text datasets (Shakespeare), and text -> token ids.

Token 0 is padding (positions that count in neither loss nor accuracy), tokens 1..80 are LEAF's Shakespeare
characters in LEAF's order (`models/utils/language_utils.py`, `ALL_LETTERS`), and token 81 stands for every other
character (out of vocabulary). A text dataset stores `x` int32 [N, SEQUENCE_LENGTH] token ids and `y` int32
[N, SEQUENCE_LENGTH] the next token at every position (`x` shifted by one), with `num_classes = VOCAB_SIZE`.
"""

from __future__ import annotations

import numpy as np

PAD = 0
# LEAF's Shakespeare character set (80 characters), in LEAF's order.
CHARACTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
OOV = len(CHARACTERS) + 1
VOCAB_SIZE = len(CHARACTERS) + 2
SEQUENCE_LENGTH = 80

_TABLE = np.full(128, OOV, np.uint8)  # every vocabulary character is ASCII
for _i, _c in enumerate(CHARACTERS):
  _TABLE[ord(_c)] = _i + 1


def encode(text: str) -> np.ndarray:
  """Token ids of `text`, one per character: [len(text)] uint8 (1..80 the vocabulary, OOV for anything else)."""
  codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  return np.where(codes < 128, _TABLE[np.minimum(codes, 127)], OOV).astype(np.uint8)


def decode(ids: np.ndarray) -> str:
  """The text of token ids: padding dropped, OOV as U+FFFD."""
  chars = {i + 1: c for i, c in enumerate(CHARACTERS)}
  return "".join(chars.get(int(i), "\ufffd") for i in np.ravel(ids) if int(i) != PAD)


def chunk(ids: np.ndarray, length: int = SEQUENCE_LENGTH) -> np.ndarray:
  """A text's token ids cut into consecutive chunks of `length + 1` (TFF's Shakespeare preprocessing).

  The last chunk is padded with `PAD`; a last chunk of one token (nothing to predict) is dropped. Row i holds the
  input `row[:-1]` and the next-token targets `row[1:]`.

  Args:
    ids: [n] token ids of one snippet.
    length: sequence length L.

  Returns:
    [ceil(n / (L + 1)) or one fewer, L + 1] uint8.
  """
  ids = np.asarray(ids, np.uint8)
  rows = -(-len(ids) // (length + 1))
  if rows and len(ids) - (rows - 1) * (length + 1) < 2:
    rows -= 1
    ids = ids[: rows * (length + 1)]
  out = np.zeros(rows * (length + 1), np.uint8)
  out[: len(ids)] = ids
  return out.reshape(rows, length + 1)
