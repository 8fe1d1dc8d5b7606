"""The character vocabularies of Shakespeare (LEAF's and TFF's), and text -> token ids.

LEAF's: token 0 is padding (positions that count in neither loss nor accuracy), tokens 1..80 are LEAF's Shakespeare
characters in LEAF's order (`models/utils/language_utils.py`, `ALL_LETTERS`), and token 81 stands for every other
character (out of vocabulary): `VOCAB_SIZE = 82`.

TFF's (`tff.simulation.baselines.shakespeare`, `char_prediction_preprocessing.py`): token 0 is padding, tokens
1..86 are `TFF_CHARACTERS` in TFF's order, 87 out of vocabulary, 88 beginning and 89 end of snippet:
`TFF_VOCAB_SIZE = 90`. TFF splits a snippet into bytes (`tf.strings.bytes_split`), so a character outside ASCII is
one out-of-vocabulary token per UTF-8 byte; `tff_rows` wraps a snippet in BOS/EOS and pads it to whole rows.

A text dataset stores `x` int32 [N, SEQUENCE_LENGTH] token ids and `y` int32 [N, SEQUENCE_LENGTH] next-token
targets, 0 where a position is not scored, with `num_classes` the vocabulary's size.
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


# TFF's Shakespeare characters, in TFF's order (`CHAR_VOCAB`; every one ASCII).
TFF_CHARACTERS = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r")
TFF_OOV = len(TFF_CHARACTERS) + 1
TFF_BOS = len(TFF_CHARACTERS) + 2
TFF_EOS = len(TFF_CHARACTERS) + 3
TFF_VOCAB_SIZE = len(TFF_CHARACTERS) + 4

_TFF_TABLE = np.full(256, TFF_OOV, np.uint8)  # one token per byte
for _i, _c in enumerate(TFF_CHARACTERS):
  _TFF_TABLE[ord(_c)] = _i + 1


def encode_tff(snippet: str | bytes) -> np.ndarray:
  """TFF's token ids of a snippet, one per UTF-8 byte: [n_bytes] uint8 (1..86 the vocabulary, `TFF_OOV` else)."""
  raw = snippet.encode("utf-8") if isinstance(snippet, str) else bytes(snippet)
  return _TFF_TABLE[np.frombuffer(raw, np.uint8)]


def tff_rows(snippet: str | bytes, length: int = SEQUENCE_LENGTH) -> np.ndarray:
  """One snippet as TFF's preprocessing makes it: BOS, its tokens, EOS, padded with `PAD` to a multiple of
  `length + 1` and cut into rows; row i holds the input `row[:-1]` and the targets `row[1:]`.

  Returns:
    [ceil((n_bytes + 2) / (length + 1)), length + 1] uint8. Rows whose targets are all padding are kept, as TFF
    keeps them (they score nothing).
  """
  ids = encode_tff(snippet)
  rows = -(-(len(ids) + 2) // (length + 1))
  out = np.zeros(rows * (length + 1), np.uint8)
  out[0] = TFF_BOS
  out[1 : len(ids) + 1] = ids
  out[len(ids) + 1] = TFF_EOS
  return out.reshape(rows, length + 1)
