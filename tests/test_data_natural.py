"""FEMNIST, Shakespeare and CIFAR-100 from files written exactly as LEAF and TFF write them, checked client by client.

LEAF: `all_data` files (users in shuffled order, as `data/utils/sample.py` leaves them) split the way
`data/utils/split_data.py -t sample` splits them (users with fewer than 2 samples dropped; FEMNIST's training samples
drawn at random; Shakespeare's first `n_train` samples for training and those from `n_train + 79` on for testing,
with `num_samples_test = n - n_train` written, and users left without test samples dropped), `json.dump`ed under
`data/train/` and `data/test/` with split_data.py's file names. TFF: HDF5 files with `examples/<client_id>/<feature>`
(TFF before 0.19), and SQLite databases in `sql_client_data`'s schema (`examples`, `client_metadata`), one serialized
`tf.train.Example` per row built with the proto TFDS ships, features as TFF's `_build_serializer` writes them, plain
and `.lzma`-compressed. The expected samples are computed here from the written values by plain Python,
independently of the loader; TFF's vocabulary is copied from TFF's `char_prediction_preprocessing.py`.
"""

import contextlib
import io
import json
import logging
import lzma
import os
import pathlib
import random
import shutil
import sqlite3

import h5py
import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2

import fedspa_jax as fj
from fedspa_jax import cli
from fedspa_jax import client as client_lib
from fedspa_jax.data import natural, text, tff_sqlite
from fedspa_jax.data.natural_formats import DataFormatError

L = text.SEQUENCE_LENGTH
VOCAB = text.CHARACTERS
ALPHABET = VOCAB + "@#\u00e9"  # three characters outside LEAF's set: out of vocabulary
# TFF's CHAR_VOCAB (tensorflow_federated/python/simulation/baselines/shakespeare/char_prediction_preprocessing.py);
# token = index + 1, pad 0, oov 87, bos 88, eos 89.
TFF_VOCAB = list('dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r')
TFF_PAD, TFF_OOV, TFF_BOS, TFF_EOS = 0, len(TFF_VOCAB) + 1, len(TFF_VOCAB) + 2, len(TFF_VOCAB) + 3


def token(c: str) -> int:
  return VOCAB.index(c) + 1 if c in VOCAB else text.OOV


# --- writers: the formats as LEAF and TFF lay them out -----------------------------------------------------------


def femnist_user(rng, n):
  """n samples as LEAF's FEMNIST JSON holds them: 784 floats in [0, 1] (1.0 = background), labels 0..61."""
  x = np.ones((n, 784))
  x[:, rng.integers(0, 784, 60)] = rng.integers(0, 256, (n, 60)) / 255.0  # some ink
  return {"x": x.round(6).tolist(), "y": rng.integers(0, 62, n).tolist()}


def shakespeare_user(rng, n):
  """n LEAF Shakespeare samples: consecutive 80-character windows of one role's text and the next character."""
  line = "".join(rng.choice(list(ALPHABET), n + L))
  return {"x": [line[i : i + L] for i in range(n)], "y": [line[i + L] for i in range(n)]}


def write_leaf(root: pathlib.Path, split: str, files: list[dict[str, dict]]) -> None:
  """One JSON file per dict {user: {"x", "y"}}, with LEAF's keys; for hand-made cases (`leaf_split` for real ones)."""
  folder = root / "data" / split
  folder.mkdir(parents=True, exist_ok=True)
  for i, users in enumerate(files):
    doc = {"users": list(users), "num_samples": [len(d["y"]) for d in users.values()], "user_data": dict(users)}
    name = f"all_data_{i}_niid_05_keep_0_{split}_9.json" if split in ("train", "test") else f"all_data_{i}.json"
    with open(folder / name, "w") as f:
      json.dump(doc, f)


def leaf_split(root: pathlib.Path, all_data: dict[str, dict[str, dict]], name: str, frac: float, seed: int = 0):
  """LEAF's `split_data.py --by_sample` (`-t sample`) on `all_data` ({file name: {user: {"x", "y"}}}, users in the
  files' order): writes `data/train/<file>_train_<frac>.json` and `data/test/<file>_test_<frac>.json` as it does.

  Returns:
    {user: (train {"x", "y"}, test {"x", "y"})} of the users it kept.
  """
  rng = random.Random(seed)
  label = str(frac)[2:]
  kept = {}
  for file_name, users in all_data.items():
    train_doc = {"users": [], "num_samples": [], "user_data": {}}
    test_doc = {"users": [], "num_samples": [], "user_data": {}}
    for u, d in users.items():
      n = len(d["y"])
      if n < 2:
        continue
      n_train = 1 if n == 2 else max(1, int(frac * n))
      if name == "shakespeare":
        train_idx, test_idx = list(range(n_train)), list(range(n_train + 80 - 1, n))
      else:
        train_idx = rng.sample(range(n), n_train)
        test_idx = [j for j in range(n) if j not in train_idx]
      if not train_idx or not test_idx:
        continue
      pick = lambda idx: {"x": [d["x"][j] for j in sorted(idx)], "y": [d["y"][j] for j in sorted(idx)]}
      kept[u] = (pick(train_idx), pick(test_idx))
      for doc, count, part in ((train_doc, n_train, kept[u][0]), (test_doc, n - n_train, kept[u][1])):
        doc["users"].append(u)
        doc["num_samples"].append(count)  # the test entry: n - n_train, whatever was kept
        doc["user_data"][u] = part
    for split, doc in (("train", train_doc), ("test", test_doc)):
      folder = root / "data" / split
      folder.mkdir(parents=True, exist_ok=True)
      with open(folder / f"{file_name[:-5]}_{split}_{label}.json", "w") as f:
        json.dump(doc, f)
  return kept


def write_tff_images(path: pathlib.Path, clients: dict[str, dict]) -> None:
  with h5py.File(path, "w") as f:
    for cid, d in clients.items():
      group = f.create_group(f"examples/{cid}")
      group.create_dataset("label", data=np.asarray(d["y"], np.int32))
      group.create_dataset("pixels", data=np.asarray(d["x"], np.float32).reshape(-1, 28, 28))


def write_tff_snippets(path: pathlib.Path, clients: dict[str, list[str]], fixed_length=()) -> None:
  with h5py.File(path, "w") as f:
    for cid, snippets in clients.items():
      group = f.create_group(f"examples/{cid}")
      if cid in fixed_length:  # fixed-length byte strings, the other string layout h5py writes
        group.create_dataset("snippets", data=np.array([s.encode() for s in snippets], dtype="S"))
      else:
        group.create_dataset("snippets", data=snippets, dtype=h5py.string_dtype())


def example(**features) -> bytes:
  """A serialized tf.train.Example as TFF's `_build_serializer` makes one: floats as float_list, integers as
  int64_list (flattened), strings as bytes_list."""
  ex = tf_example_pb2.Example()
  for key, value in features.items():
    feature = ex.features.feature[key]
    if isinstance(value, bytes):
      feature.bytes_list.value.append(value)
    elif np.asarray(value).dtype.kind == "f":
      feature.float_list.value.extend(np.ravel(value).tolist())
    else:
      feature.int64_list.value.extend(np.ravel(value).astype(np.int64).tolist())
  return ex.SerializeToString()


def write_tff_sqlite(path: pathlib.Path, splits: dict[str, dict[str, list[bytes]]], compress: bool = False):
  """TFF's SQLite ClientData (`sql_client_data_utils.save_to_sql_client_data`'s tables), a split's clients in the
  given order, each client's rows together; `compress`: also `<path>.lzma` (as TFF's download serves it), and the
  plain file removed."""
  with contextlib.closing(sqlite3.connect(path)) as con, con:
    con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                "serialized_example_proto BLOB NOT NULL);")
    con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                "num_examples INTEGER NOT NULL);")
    for split, clients in splits.items():
      for cid, rows in clients.items():
        for row in rows:
          con.execute("INSERT INTO examples (split_name, client_id, serialized_example_proto) VALUES (?, ?, ?);",
                      (split, cid, row))
        con.execute("INSERT INTO client_metadata (client_id, split_name, num_examples) VALUES (?, ?, ?);",
                    (cid, split, len(rows)))
  if compress:
    pathlib.Path(f"{path}.lzma").write_bytes(lzma.compress(pathlib.Path(path).read_bytes()))
    os.unlink(path)
    return pathlib.Path(f"{path}.lzma")
  return pathlib.Path(path)


# --- expected values, by plain Python ---------------------------------------------------------------------------


def expected_images(d):
  x = np.array([[round(255 * (1 - v)) for v in row] for row in d["x"]], np.uint8).reshape(-1, 28, 28, 1)
  return x, np.array(d["y"], np.int32)


def expected_windows(d):
  """LEAF's samples scored at every position (`per_position=True`): targets are the input shifted by one."""
  x = np.array([[token(c) for c in s] for s in d["x"]], np.int32).reshape(-1, L)
  y = np.array([[token(c) for c in s[1:] + nxt] for s, nxt in zip(d["x"], d["y"])], np.int32).reshape(-1, L)
  return x, y


def expected_next(d):
  """LEAF's task: the next character after each sample, one target per sample, at the last position."""
  x = np.array([[token(c) for c in s] for s in d["x"]], np.int32).reshape(-1, L)
  y = np.zeros_like(x)
  y[:, -1] = [token(c) for c in d["y"]]
  return x, y


def tff_tokens(snippet: str) -> list[int]:
  """TFF's `to_tokens_and_pad` before padding: BOS, one token per UTF-8 byte (`tf.strings.bytes_split`), EOS."""
  ids = [TFF_VOCAB.index(chr(b)) + 1 if chr(b) in TFF_VOCAB else TFF_OOV for b in snippet.encode("utf-8")]
  return [TFF_BOS, *ids, TFF_EOS]


def expected_tff_rows(snippets):
  """TFF's preprocessing: each snippet's tokens padded to a multiple of 81, cut into rows, x = row[:-1], y = row[1:]."""
  xs, ys = [], []
  for s in snippets:
    ids = tff_tokens(s)
    ids += [TFF_PAD] * (-len(ids) % (L + 1))
    for i in range(0, len(ids), L + 1):
      xs.append(ids[i : i + L])
      ys.append(ids[i + 1 : i + L + 1])
  return np.array(xs, np.int32).reshape(-1, L), np.array(ys, np.int32).reshape(-1, L)


def assert_client(split, k, x, y):
  got_x, got_y = split.client(k)
  np.testing.assert_array_equal(got_x, x)
  np.testing.assert_array_equal(got_y, y)


# --- fixtures: small datasets in every format ----------------------------------------------------------------------

# LEAF all_data: {file: {user: samples}}, users shuffled within files (sample.py's order); one user too small to split.
FEMNIST_ALL = {"all_data_0_niid_05.json": {"f0003_17": 4, "f0000_14": 7, "f0005_09": 1},
               "all_data_1_niid_05.json": {"f0004_22": 8, "f0002_03": 12, "f0001_41": 2}}
# Shakespeare (frac 0.8, LEAF's README): test samples exist only where n - n_train > 79; HENRY (60) and LUCIO (1) go.
SHAKESPEARE_ALL = {"all_data_niid_2.json": {"THE_TEMPEST_PROSPERO": 420, "HAMLET_HAMLET": 405,
                                            "MEASURE_LUCIO": 1, "KING_LEAR_FOOL": 450, "HENRY_V_BOY": 60}}


def leaf_fixture(root, rng, make_user, all_sizes, name, frac):
  all_data = {f: {u: make_user(rng, n) for u, n in users.items()} for f, users in all_sizes.items()}
  kept = leaf_split(root, all_data, name, frac)
  return {u: kept[u] for u in sorted(kept)}  # clients come in sorted id order


@pytest.fixture(scope="module")
def femnist_leaf(tmp_path_factory):
  root = tmp_path_factory.mktemp("femnist_leaf")
  return root, leaf_fixture(root, np.random.default_rng(0), femnist_user, FEMNIST_ALL, "femnist", 0.9)


@pytest.fixture(scope="module")
def shakespeare_leaf(tmp_path_factory):
  root = tmp_path_factory.mktemp("shakespeare_leaf")
  return root, leaf_fixture(root, np.random.default_rng(1), shakespeare_user, SHAKESPEARE_ALL, "shakespeare", 0.8)


def sizes_of(users):
  return {u: (len(a["y"]), len(b["y"])) for u, (a, b) in users.items()}


# TFF: (train, test) samples per client, written in this (unsorted) order.
FEMNIST_SIZES = {"f0002_03": (9, 3), "f0000_14": (5, 2), "f0004_22": (6, 2), "f0001_41": (1, 1), "f0003_17": (3, 1)}


@pytest.fixture(scope="module")
def emnist_tff(tmp_path_factory):
  root = tmp_path_factory.mktemp("emnist_tff")
  rng = np.random.default_rng(2)
  full = {u: (femnist_user(rng, a), femnist_user(rng, b)) for u, (a, b) in FEMNIST_SIZES.items()}
  digits = {u: tuple({"x": d["x"], "y": [v % 10 for v in d["y"]]} for d in pair) for u, pair in full.items()}
  for prefix, users in (("fed_emnist", full), ("fed_emnist_digitsonly", digits)):
    for split, i in (("train", 0), ("test", 1)):
      write_tff_images(root / f"{prefix}_{split}.h5", {u: users[u][i] for u in users})
  sort = lambda users: {u: users[u] for u in sorted(users)}
  return root, sort(full), sort(digits)


def snippets(rng, lengths, alphabet=ALPHABET):
  return ["".join(rng.choice(list(alphabet), n)) for n in lengths]


@pytest.fixture(scope="module")
def shakespeare_tff(tmp_path_factory):
  root = tmp_path_factory.mktemp("shakespeare_tff")
  rng = np.random.default_rng(3)
  # ASCII lengths around the row size (81 tokens with BOS and EOS): 79 (one full row), 80 (a second row of EOS and
  # padding, whose targets are all padding), 200; and 5, 1, 0 (an empty snippet is BOS, EOS).
  train = {"THE_TEMPEST_ARIEL": snippets(rng, [40, 300]), "ALLS_WELL_HELENA": snippets(rng, [79, 80, 200], VOCAB),
           "CORIOLANUS_MENENIUS": snippets(rng, [5, 1, 163, 0])}
  test = {u: snippets(rng, [30 + 20 * i]) for i, u in enumerate(train)}
  write_tff_snippets(root / "shakespeare_train.h5", train, fixed_length=("CORIOLANUS_MENENIUS",))
  write_tff_snippets(root / "shakespeare_test.h5", test)
  return root, train, test


def emnist_rows(users, i):
  return {u: [example(label=np.int32(y), pixels=np.asarray(x, np.float32).reshape(28, 28))
              for x, y in zip(pair[i]["x"], pair[i]["y"])] for u, pair in users.items()}


@pytest.fixture(scope="module")
def emnist_sqlite(tmp_path_factory):
  """`emnist_all.sqlite` with TFF's four splits, clients written unsorted; plain in one folder, .lzma in another."""
  rng = np.random.default_rng(12)
  full = {u: (femnist_user(rng, a), femnist_user(rng, b)) for u, (a, b) in FEMNIST_SIZES.items()}
  digits = {u: tuple({"x": d["x"], "y": [v % 10 for v in d["y"]]} for d in pair) for u, pair in full.items()
            if u != "f0003_17"}  # TFF's digits-only splits hold fewer writers (3,383 of 3,400)
  splits = {"digits_only_train": emnist_rows(digits, 0), "digits_only_test": emnist_rows(digits, 1),
            "all_train": emnist_rows(full, 0), "all_test": emnist_rows(full, 1)}
  plain, packed = tmp_path_factory.mktemp("tff_plain"), tmp_path_factory.mktemp("tff_lzma")
  write_tff_sqlite(plain / "emnist_all.sqlite", splits)
  write_tff_sqlite(packed / "emnist_all.sqlite", splits, compress=True)
  sort = lambda users: {u: users[u] for u in sorted(users)}
  return {"plain": plain, "lzma": packed}, sort(full), sort(digits)


# One snippet whose ids are written out by hand from TFF's CHAR_VOCAB: BOS, 'd' (index 0), 'H' (8), 'i' (65),
# '\n' (62), '\r' (85), 'é' (two UTF-8 bytes, two OOV), EOS.
KNOWN_SNIPPET = "dHi\n\r\u00e9"
KNOWN_IDS = [88, 1, 9, 66, 63, 86, 87, 87, 89]


@pytest.fixture(scope="module")
def shakespeare_sqlite(tmp_path_factory):
  rng = np.random.default_rng(13)
  train = {"THE_TEMPEST_ARIEL": snippets(rng, [40, 300]), "ALLS_WELL_HELENA": [KNOWN_SNIPPET, *snippets(rng, [79, 200])],
           "CORIOLANUS_MENENIUS": snippets(rng, [5, 80])}
  test = {u: snippets(rng, [30 + 20 * i]) for i, u in enumerate(train)}
  splits = {s: {u: [example(snippets=v.encode("utf-8")) for v in d[u]] for u in d}
            for s, d in (("train", train), ("test", test))}
  root = tmp_path_factory.mktemp("shakespeare_sqlite")
  write_tff_sqlite(root / "shakespeare.sqlite", splits, compress=True)
  return root, train, test


def cifar_client(rng, n):
  return {"x": rng.integers(0, 256, (n, 32, 32, 3)), "y": rng.integers(0, 100, n)}


def cifar_rows(clients):
  return {c: [example(coarse_label=np.int64(y // 5), image=x.astype(np.int64), label=np.int64(y))
              for x, y in zip(d["x"], d["y"])] for c, d in clients.items()}


@pytest.fixture(scope="module")
def cifar_sqlite(tmp_path_factory):
  """TFF's cifar100.sqlite: training clients "0".."N" (written in numeric order; sorted as strings they are not),
  test clients a separate population with ids from "0"."""
  rng = np.random.default_rng(14)
  train = {str(c): cifar_client(rng, n) for c, n in zip([0, 1, 2, 10, 11], [10, 6, 8, 12, 10])}
  test = {str(c): cifar_client(rng, 4) for c in (0, 1)}
  root = tmp_path_factory.mktemp("cifar_sqlite")
  write_tff_sqlite(root / "cifar100.sqlite", {"train": cifar_rows(train), "test": cifar_rows(test)})
  return root, {c: train[c] for c in sorted(train)}, test


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.tff or ~/.keras/datasets of the machine


# --- LEAF as split_data.py writes it --------------------------------------------------------------------------------


def test_leaf_femnist_round_trip(femnist_leaf):
  root, users = femnist_leaf
  assert list(users) == ["f0000_14", "f0001_41", "f0002_03", "f0003_17", "f0004_22"]  # f0005_09 (1 sample) dropped
  data = fj.data.load("femnist", data_dir=root, format="leaf")
  assert data.num_clients == len(users) and data.num_classes == 62 and data.name == "femnist"
  assert data.train.x.dtype == np.uint8 and data.sample_shape == (28, 28, 1) and data.train.y.dtype == np.int32
  for k, (train, test) in enumerate(users.values()):  # clients in sorted id order: each one's rows are its own
    assert_client(data.train, k, *expected_images(train))
    assert_client(data.test, k, *expected_images(test))
  sizes = sizes_of(users)
  assert sizes["f0002_03"] == (10, 2) and sizes["f0001_41"] == (1, 1)  # int(0.9 n), and 1 of 2
  assert data.train.total == sum(a for a, _ in sizes.values()) and data.test.total == sum(b for _, b in sizes.values())
  # MNIST's polarity: background 0, ink bright; mean/std of the training images as for every uint8 source.
  assert np.median(data.train.x) == 0 and data.train.x.max() > 200
  assert data.mean == fj.data.channel_stats(np.asarray(data.train.x))[0]


def test_leaf_femnist_user_ids_and_folder_layouts(femnist_leaf, emnist_tff, tmp_path):
  root, users = femnist_leaf
  data, ids = natural.load_natural("femnist", data_dir=root / "data", return_users=True)  # leaf/data/femnist/data
  assert ids == list(users) and data.num_clients == len(users)
  (tmp_path / "femnist").symlink_to(root)  # data_dir/<name>/data/train
  assert natural.load_natural("femnist", data_dir=tmp_path, return_users=True)[1] == list(users)
  keras = pathlib.Path.home() / ".keras" / "datasets"  # HOME is a temporary folder here
  keras.mkdir(parents=True)
  for split in ("train", "test"):
    (keras / f"fed_emnist_{split}.h5").write_bytes((emnist_tff[0] / f"fed_emnist_{split}.h5").read_bytes())
  assert fj.data.load("femnist").num_clients == len(emnist_tff[1])  # no data_dir: TFF's download folder
  both = tmp_path / "both"
  both.mkdir()
  (both / "data").symlink_to(root / "data")
  (both / "fed_emnist_train.h5").symlink_to(keras / "fed_emnist_train.h5")
  with pytest.raises(ValueError, match="found LEAF files .* and TFF files .*; pass format='leaf' or format='tff'"):
    fj.data.load("femnist", data_dir=both)
  assert fj.data.load("femnist", data_dir=both, format="tff").num_clients == len(emnist_tff[1])


def test_leaf_files_are_parsed_one_at_a_time_and_their_lists_dropped(femnist_leaf, monkeypatch):
  from fedspa_jax.data import natural_formats  # pylint: disable=g-import-not-at-top

  root, _ = femnist_leaf
  events, docs = [], []
  real_load = natural_formats.json.load

  def load(f):
    docs.append(real_load(f))
    events.append(("parse", len(docs)))
    return docs[-1]

  monkeypatch.setattr(natural_formats.json, "load", load)
  files = sorted((root / "data" / "train").glob("*.json"))
  for path in files:
    for user, _ in natural_formats.read_leaf_file(path, "image", 62):
      events.append(("user", user))
  file_order = [u for users in FEMNIST_ALL.values() for u in users if u != "f0005_09"]  # each file's own order
  assert events == [("parse", 1), *[("user", u) for u in file_order[:2]], ("parse", 2),
                    *[("user", u) for u in file_order[2:]]]
  assert all(doc["user_data"] == {} for doc in docs)  # each user's lists went once converted


def test_a_training_user_missing_from_the_test_files_gets_no_test_data(tmp_path):
  rng = np.random.default_rng(8)
  a, b, t = femnist_user(rng, 3), femnist_user(rng, 2), femnist_user(rng, 1)
  write_leaf(tmp_path, "train", [{"b": b, "a": a}])
  write_leaf(tmp_path, "test", [{"b": t}])
  data = fj.data.load("femnist", data_dir=tmp_path)
  assert data.test.count.tolist() == [0, 1]  # a, b: sorted
  assert_client(data.test, 1, *expected_images(t))


def test_leaf_shakespeare_is_read_as_split_data_writes_it_and_scored_as_leaf_scores_it(shakespeare_leaf, caplog):
  """Every test file of LEAF's split says num_samples_test = n - n_train, 79 more than it holds: read what it holds."""
  root, users = shakespeare_leaf
  assert sizes_of(users) == {"HAMLET_HAMLET": (324, 2), "KING_LEAR_FOOL": (360, 11), "THE_TEMPEST_PROSPERO": (336, 5)}
  [test_file] = (root / "data" / "test").glob("*.json")
  assert json.loads(test_file.read_text())["num_samples"] == [84, 81, 90]  # as LEAF writes them
  with caplog.at_level(logging.WARNING, logger="fedspa_jax.data.natural"):
    data = fj.data.load("shakespeare", data_dir=root, format="leaf")
  [record] = [r for r in caplog.records if "num_samples" in r.getMessage()]
  assert "3 of 3 users" in record.getMessage() and "\n" not in record.getMessage()
  assert data.num_classes == text.VOCAB_SIZE == 82 and data.mean is None
  assert data.train.x.dtype == np.int32 and data.train.y.shape == (data.train.x.shape[0], L)
  for k, (train, test) in enumerate(users.values()):
    assert_client(data.train, k, *expected_next(train))
    assert_client(data.test, k, *expected_next(test))
  x, y = data.train.client(0)
  assert (x > 0).all() and (x == text.OOV).any()  # LEAF's windows are full; characters outside LEAF's set are OOV
  assert ((y != 0).sum(axis=1) == 1).all()  # one scored position per sample
  # The engine scores exactly one position per sample: its label count is the number of samples.
  logits = np.zeros((len(y), L, data.num_classes), np.float32)
  _, correct, labels = client_lib.weighted_loss(lambda p, x: logits, None, None, y, np.ones(len(y), np.float32))
  assert float(labels) == len(y) and float(correct) == 0


def test_leaf_shakespeare_per_position_option(shakespeare_leaf):
  root, users = shakespeare_leaf
  data = fj.data.load("shakespeare", data_dir=root, format="leaf", per_position=True)
  for k, (train, test) in enumerate(users.values()):
    assert_client(data.train, k, *expected_windows(train))
    assert_client(data.test, k, *expected_windows(test))
  x, y = data.train.client(0)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one


# --- TFF's HDF5 files (before TFF 0.19) -------------------------------------------------------------------------------


@pytest.mark.parametrize("only_digits", [False, True])
def test_tff_emnist_round_trip(emnist_tff, only_digits):
  root, full, digits = emnist_tff
  users = digits if only_digits else full
  data = fj.data.load("femnist", data_dir=root, format="tff", only_digits=only_digits)
  assert data.num_classes == (10 if only_digits else 62) and data.num_clients == len(users)
  for k, (train, test) in enumerate(users.values()):
    assert_client(data.train, k, *expected_images(train))
    assert_client(data.test, k, *expected_images(test))


def test_tff_shakespeare_round_trip(shakespeare_tff):
  root, train, test = shakespeare_tff
  data, ids = natural.load_natural("shakespeare", data_dir=root, format="tff", return_users=True)
  assert ids == sorted(train) and data.num_classes == text.TFF_VOCAB_SIZE == 90
  for k, user in enumerate(ids):
    assert_client(data.train, k, *expected_tff_rows(train[user]))
    assert_client(data.test, k, *expected_tff_rows(test[user]))
  # Snippets of 79, 80 and 200 characters: 1, 2 and 3 rows (81 tokens per row with BOS and EOS).
  assert data.train.count[ids.index("ALLS_WELL_HELENA")] == 6
  x, y = data.train.client(ids.index("ALLS_WELL_HELENA"))
  assert x[0, 0] == TFF_BOS and y[0, -1] == TFF_EOS and x[1, 0] == TFF_BOS and x[2, 0] == TFF_EOS
  assert (y[2] == 0).all() and (x[2, 1:] == 0).all()  # kept, as TFF keeps it: it scores nothing


def test_summary_counts_sequences_and_target_tokens(shakespeare_tff):
  data = fj.data.load("shakespeare", data_dir=shakespeare_tff[0])
  s = fj.data.summarize(data)
  assert s["train"]["count"] == np.asarray(data.train.count).tolist()  # sequences per client
  for k in range(data.num_clients):
    _, y = data.train.client(k)
    assert s["train"]["label_counts"][k] == np.bincount(y[y > 0], minlength=text.TFF_VOCAB_SIZE).tolist()  # no pad
  assert "shakespeare: 3 clients" in fj.data.format_summary(s)


def test_vocabulary():
  assert text.PAD == 0 and text.OOV == 81 and text.VOCAB_SIZE == 82 and len(set(VOCAB)) == 80
  ids = text.encode("To be, or not@")
  assert ids.dtype == np.uint8 and ids[-1] == text.OOV and text.decode(ids) == "To be, or not\ufffd"
  assert text.decode(np.array([0, 0])) == "" and text.chunk(text.encode("a")).shape == (0, L + 1)
  assert list(text.TFF_CHARACTERS) == TFF_VOCAB and (text.TFF_OOV, text.TFF_BOS, text.TFF_EOS) == (87, 88, 89)
  assert text.tff_rows(KNOWN_SNIPPET)[0, : len(KNOWN_IDS)].tolist() == KNOWN_IDS
  assert text.tff_rows(b"").tolist() == [[TFF_BOS, TFF_EOS] + [0] * (L - 1)]


# --- TFF's SQLite files (TFF >= 0.19) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["plain", "lzma"])
@pytest.mark.parametrize("only_digits", [False, True])
def test_tff_sqlite_emnist_round_trip(emnist_sqlite, packing, only_digits, tmp_path):
  roots, full, digits = emnist_sqlite
  root = tmp_path / "tff"
  shutil.copytree(roots[packing], root)
  users = digits if only_digits else full
  data, ids = natural.load_natural("femnist", data_dir=root, only_digits=only_digits, return_users=True)
  assert ids == list(users) == sorted(users) and data.num_classes == (10 if only_digits else 62)
  for k, (train, test) in enumerate(users.values()):
    assert_client(data.train, k, *expected_images(train))
    assert_client(data.test, k, *expected_images(test))
  if packing == "lzma":  # decompressed once, next to the download, as TFF does
    assert (root / "emnist_all.sqlite").is_file()
    again = natural.load_natural("femnist", data_dir=root, only_digits=only_digits)
    np.testing.assert_array_equal(again.train.x, data.train.x)


def test_lzma_is_decompressed_once_or_into_the_cache(emnist_sqlite, tmp_path, monkeypatch):
  roots, full, _ = emnist_sqlite
  root = tmp_path / "tff"
  shutil.copytree(roots["lzma"], root)
  calls = []
  real = tff_sqlite.lzma.LZMADecompressor
  monkeypatch.setattr(tff_sqlite.lzma, "LZMADecompressor", lambda: calls.append(1) or real())
  fj.data.load("femnist", data_dir=root, cache=False)
  fj.data.load("femnist", data_dir=root, cache=False)
  assert len(calls) == 1 and (root / "emnist_all.sqlite").is_file()
  first = fj.data.load("femnist", data_dir=root)  # cached: a hit once the decompressed copy is there too
  with monkeypatch.context() as patch:
    patch.setattr(tff_sqlite, "read_splits", lambda *a, **k: pytest.fail("a cache hit must not read the file"))
    np.testing.assert_array_equal(fj.data.load("femnist", data_dir=root).train.x, first.train.x)
  # A folder that cannot be written: into the cache folder's tff/ (root ignores permissions, so ask os.access).
  other = tmp_path / "read_only"
  shutil.copytree(roots["lzma"], other)
  monkeypatch.setattr(tff_sqlite.os, "access", lambda path, mode: pathlib.Path(path) != other)
  data = fj.data.load("femnist", data_dir=other, cache=False)
  assert data.num_clients == len(full) and not (other / "emnist_all.sqlite").exists()
  assert (tmp_path / "cache" / "tff" / "emnist_all.sqlite").is_file() and len(calls) == 2


def test_tff_sqlite_shakespeare_is_tffs_task(shakespeare_sqlite):
  root, train, test = shakespeare_sqlite
  data, ids = natural.load_natural("shakespeare", data_dir=root, return_users=True)
  assert ids == sorted(train) and data.num_classes == 90
  for k, user in enumerate(ids):
    assert_client(data.train, k, *expected_tff_rows(train[user]))
    assert_client(data.test, k, *expected_tff_rows(test[user]))
  x, y = data.train.client(ids.index("ALLS_WELL_HELENA"))
  assert x[0, : len(KNOWN_IDS)].tolist() == KNOWN_IDS  # its first snippet, token by token as TFF's
  assert y[0, : len(KNOWN_IDS) - 1].tolist() == KNOWN_IDS[1:] and (y[0, len(KNOWN_IDS) - 1 :] == 0).all()
  # Accuracy masks the pad token only, as TFF's MaskedCategoricalAccuracy(masked_tokens=[pad]): EOS is scored.
  logits = np.zeros((1, L, 90), np.float32)
  logits[0, np.arange(L), y[0]] = 1.0  # right at every position, pads included
  _, correct, labels = client_lib.weighted_loss(lambda p, x: logits, None, None, y[:1], np.ones(1, np.float32))
  assert float(labels) == float(correct) == len(KNOWN_IDS) - 1
  with pytest.raises(ValueError, match="TFF's Shakespeare task scores every position"):
    fj.data.load("shakespeare", data_dir=root, format="tff", per_position=False)


def test_a_clients_rows_in_several_runs_are_joined_in_table_order(tmp_path):
  """TFF's writer keeps a client's rows together; a file that does not is still read right, rows in table order."""
  rng = np.random.default_rng(16)
  a, b = femnist_user(rng, 5), femnist_user(rng, 3)
  rows = lambda d, i: example(label=np.int32(d["y"][i]), pixels=np.asarray(d["x"][i], np.float32).reshape(28, 28))
  table = [("b", rows(b, 0)), ("a", rows(a, 0)), ("a", rows(a, 1)), ("b", rows(b, 1)), ("a", rows(a, 2)),
           ("a", rows(a, 3)), ("b", rows(b, 2)), ("a", rows(a, 4))]
  with contextlib.closing(sqlite3.connect(tmp_path / "emnist_all.sqlite")) as con, con:
    con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                "serialized_example_proto BLOB NOT NULL);")
    for split in ("all_train", "all_test"):
      con.executemany("INSERT INTO examples VALUES (?, ?, ?)", [(split, c, r) for c, r in table])
  data = fj.data.load("femnist", data_dir=tmp_path, cache=False)
  assert_client(data.train, 0, *expected_images(a))
  assert_client(data.train, 1, *expected_images(b))
  assert_client(data.test, 0, *expected_images(a))


def test_tff_cifar100_natural_split(cifar_sqlite):
  root, train, test = cifar_sqlite
  data, ids = natural.load_natural("cifar100", data_dir=root, format="tff", return_users=True, test_fraction=0.25)
  assert ids == ["0", "1", "10", "11", "2"] and data.num_classes == 100 and data.sample_shape == (32, 32, 3)
  for k, c in enumerate(ids):  # each client's own images, held out per client (TFF's test clients are others)
    (tx, ty), (sx, sy) = data.train.client(k), data.test.client(k)
    n = len(train[c]["y"])
    assert len(sx) == min(n - 1, max(1, round(0.25 * n)))  # holdout.split_local's sizes
    assert rows(np.concatenate([tx, sx])) == rows(train[c]["x"].astype(np.uint8))
    assert sorted(np.concatenate([ty, sy])) == sorted(train[c]["y"])
  assert data.mean == fj.data.channel_stats(np.asarray(data.train.x))[0] and len(data.mean) == 3
  # holdout=False reads TFF's test split, client by client id: clients "0" and "1" only.
  paired = fj.data.load("cifar100", data_dir=root, format="tff", holdout=False)
  assert paired.test.count.tolist() == [4, 4, 0, 0, 0]
  for k, c in enumerate(ids):
    assert_client(paired.train, k, train[c]["x"].astype(np.uint8), train[c]["y"].astype(np.int32))
  assert_client(paired.test, 1, test["1"]["x"].astype(np.uint8), test["1"]["y"].astype(np.int32))
  with pytest.raises(ValueError, match="cifar100 has no LEAF files"):
    fj.data.load("cifar100", data_dir=root, format="leaf")


# --- one split only: a seeded per-client holdout -------------------------------------------------------------------


def rows(a):
  return sorted(map(bytes, np.asarray(a).reshape(len(a), -1)))


@pytest.fixture(scope="module")
def femnist_one_split(tmp_path_factory, femnist_leaf):
  """LEAF's `all_data/` (no split step): each user's train + test samples together."""
  root = tmp_path_factory.mktemp("femnist_all")
  _, users = femnist_leaf
  # Two classes, so the stratified holdout has samples of a class to choose among.
  merged = {u: {"x": a["x"] + b["x"], "y": [v % 2 for v in a["y"] + b["y"]]} for u, (a, b) in users.items()}
  write_leaf(root, "all_data", [merged])
  return root, merged


def test_one_split_is_held_out_per_client(femnist_one_split, emnist_tff, tmp_path):
  root, merged = femnist_one_split
  data = fj.data.load("femnist", data_dir=root, test_fraction=0.3, seed=0)
  for k, d in enumerate(merged.values()):
    x, y = expected_images(d)
    (tx, ty), (sx, sy) = data.train.client(k), data.test.client(k)
    assert len(sx) == min(len(y) - 1, max(1, round(0.3 * len(y))))  # holdout.split_local's sizes
    assert rows(np.concatenate([tx, sx])) == rows(x)  # its own samples, each once
    assert sorted(np.concatenate([ty, sy])) == sorted(y)
  again = fj.data.load("femnist", data_dir=root, test_fraction=0.3, seed=0, cache=False)
  other = fj.data.load("femnist", data_dir=root, test_fraction=0.3, seed=1)
  np.testing.assert_array_equal(again.test.x, data.test.x)
  assert not np.array_equal(other.test.x, data.test.x)
  # TFF with its train file only: the same holdout.
  (tmp_path / "tff").mkdir()
  (tmp_path / "tff" / "fed_emnist_train.h5").write_bytes((emnist_tff[0] / "fed_emnist_train.h5").read_bytes())
  tff = fj.data.load("femnist", data_dir=tmp_path / "tff", format="tff")
  assert tff.test.total > 0 and tff.train.total + tff.test.total == sum(a for a, _ in FEMNIST_SIZES.values())


def test_partitions_are_cached_and_follow_their_files(femnist_leaf, tmp_path, monkeypatch):
  """A second load is a hit that reads no file; a rewritten file is read again (the entry is rebuilt)."""
  root = tmp_path / "femnist"
  shutil.copytree(femnist_leaf[0], root)
  load = lambda **kw: fj.data.load("femnist", data_dir=root, format="leaf", **kw)
  first = load()
  assert len(list((tmp_path / "cache" / "partitions").glob("femnist-*.npz"))) == 1

  def no_reading(*args, **kwargs):
    raise AssertionError("a hit must not read the files")

  with monkeypatch.context() as patch:
    patch.setattr(natural, "read_leaf_file", no_reading)
    hit = load()
  for split in ("train", "test"):
    for field in ("x", "y", "offset", "count"):
      np.testing.assert_array_equal(getattr(getattr(hit, split), field), getattr(getattr(first, split), field))
  assert (hit.num_classes, hit.name, hit.mean, hit.std) == (first.num_classes, first.name, first.mean, first.std)
  [path, *_] = sorted((root / "data" / "train").glob("*.json"))
  doc = json.loads(path.read_text())
  user = doc["users"][0]
  doc["user_data"][user]["y"][0] = (doc["user_data"][user]["y"][0] + 1) % 62  # one label changed
  path.write_text(json.dumps(doc))
  changed = load()
  np.testing.assert_array_equal(changed.train.y, load(cache=False).train.y)
  assert not np.array_equal(changed.train.y, first.train.y)


# --- options ------------------------------------------------------------------------------------------------------


def test_min_samples_keeps_the_users_with_enough(femnist_leaf):
  root, users = femnist_leaf
  data, ids = natural.load_natural("femnist", data_dir=root, min_samples=8, return_users=True)
  assert ids == [u for u, (a, b) in sizes_of(users).items() if a + b >= 8] == ["f0002_03", "f0004_22"]
  assert_client(data.train, 1, *expected_images(users["f0004_22"][0]))
  with pytest.raises(ValueError, match="no user has min_samples=100 samples"):
    fj.data.load("femnist", data_dir=root, min_samples=100)


def test_num_clients_and_client_fraction_take_a_seeded_subset(femnist_leaf):
  root, users = femnist_leaf
  subsets = {}
  for seed in range(6):
    data, ids = natural.load_natural("femnist", data_dir=root, num_clients=3, seed=seed, return_users=True)
    assert len(ids) == 3 == data.num_clients and ids == [u for u in users if u in ids]  # file order kept
    for k, u in enumerate(ids):
      assert_client(data.train, k, *expected_images(users[u][0]))
    subsets[seed] = tuple(ids)
  assert natural.load_natural("femnist", data_dir=root, num_clients=3, seed=0, return_users=True)[1] == list(subsets[0])
  assert len(set(subsets.values())) > 1
  _, ids = natural.load_natural("femnist", data_dir=root, client_fraction=0.4, return_users=True)
  assert len(ids) == 2
  assert fj.data.load("femnist", data_dir=root, num_clients=0).num_clients == len(users)  # 0: all
  with pytest.raises(ValueError, match="num_clients=6 but the files hold 5 users"):
    fj.data.load("femnist", data_dir=root, num_clients=6)


def test_sample_fraction_draws_whole_writers_as_leaf_does(femnist_leaf):
  root, users = femnist_leaf
  sizes = {u: a + b for u, (a, b) in sizes_of(users).items()}
  target = int(0.5 * sum(sizes.values()))
  seen = set()
  for seed in range(8):
    data, ids = natural.load_natural("femnist", data_dir=root, sample_fraction=0.5, seed=seed, return_users=True)
    drawn = sum(sizes[u] for u in ids)
    assert drawn >= target and drawn - max(sizes[u] for u in ids) < target  # stops at the writer that reaches it
    assert data.train.total + data.test.total == drawn  # whole writers, both splits
    seen.add(tuple(ids))
  assert len(seen) > 1
  assert natural.load_natural("femnist", data_dir=root, sample_fraction=1.0, return_users=True)[1] == list(users)


# --- bad input: one-line errors -----------------------------------------------------------------------------------


def one_line(e: BaseException) -> str:
  message = str(e)
  assert "\n" not in message, message
  return message


def test_no_files_is_a_file_not_found_error(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    fj.data.load("femnist", data_dir=tmp_path / "empty")
  message = one_line(e.value)
  assert str(tmp_path / "empty") in message and "fed_emnist_train.h5" in message and "train/*.json" in message
  assert "emnist_all.sqlite[.lzma]" in message
  with pytest.raises(FileNotFoundError, match=r"no TFF SQLite file \(shakespeare.sqlite\[.lzma\]\) or TFF HDF5 "
                                              r"files \(shakespeare_train.h5"):
    fj.data.load("shakespeare", data_dir=tmp_path, format="tff")


def test_leaf_num_samples_is_a_hint(tmp_path, caplog):
  """LEAF's own reader ignores num_samples; a file whose entries disagree with user_data loads what user_data holds."""
  rng = np.random.default_rng(4)
  u = femnist_user(rng, 3)
  write_leaf(tmp_path, "train", [{"u1": u}])
  path = next((tmp_path / "data" / "train").glob("*.json"))
  doc = json.loads(path.read_text())
  doc["num_samples"] = [4]
  path.write_text(json.dumps(doc))
  with caplog.at_level(logging.WARNING, logger="fedspa_jax.data.natural"):
    data = fj.data.load("femnist", data_dir=tmp_path, cache=False)
  assert data.train.total + data.test.total == 3
  [message] = [r.getMessage() for r in caplog.records if "num_samples" in r.getMessage()]
  assert "1 of 1 users" in message and "user 'u1': 4 listed, 3 held" in message


def test_hdf5_without_examples(tmp_path):
  with h5py.File(tmp_path / "fed_emnist_train.h5", "w") as f:
    f.create_dataset("pixels", data=np.zeros((2, 28, 28), np.float32))
  with pytest.raises(DataFormatError) as e:
    fj.data.load("femnist", data_dir=tmp_path, format="tff")
  assert "has no group 'examples'" in one_line(e.value)


@pytest.mark.parametrize("case, match", [
    ("label", r"user 'u': labels must be in 0..61, got \d+..62"),
    ("pixel", r"user 'u': pixel values must be in \[0, 1\], got 0..1.5"),
    ("twice", "user 'u' appears in both .*all_data_0.*json and .*all_data_1.*json"),
])
def test_bad_values(case, match, tmp_path):
  rng = np.random.default_rng(9)
  u = femnist_user(rng, 3)
  if case == "label":
    u["y"][0] = 62
  elif case == "pixel":
    u["x"][0][0] = 1.5
  write_leaf(tmp_path, "train", [{"u": u}, {"u": u}] if case == "twice" else [{"u": u}])
  with pytest.raises(DataFormatError, match=match) as e:
    fj.data.load("femnist", data_dir=tmp_path)
  one_line(e.value)


@pytest.mark.parametrize("case, match", [
    ("no_table", r"emnist_all.sqlite has no table 'examples' \(has: client_metadata\): not a TFF SQLite"),
    ("not_sqlite", r"emnist_all.sqlite is not a SQLite database"),
    ("truncated", r"emnist_all.sqlite.lzma ends before the end of its LZMA stream"),
    ("not_lzma", r"emnist_all.sqlite.lzma is not an LZMA file"),
    ("no_feature", r"emnist_all.sqlite, split 'all_train', client 'f1': an Example without the feature 'pixels' "
                   r"\(it has: label\)"),
    ("no_split", r"emnist_all.sqlite holds no rows of split 'all_test' \(it holds: all_train\)"),
])
def test_bad_sqlite_files(case, match, tmp_path):
  write_bad_sqlite(case, tmp_path)
  with pytest.raises(DataFormatError, match=match) as e:
    fj.data.load("femnist", data_dir=tmp_path, format="tff")
  assert str(tmp_path) in one_line(e.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BAD_SQLITE_FILES[case])  # nothing left behind


BAD_SQLITE_FILES = {"no_table": ["emnist_all.sqlite"], "not_sqlite": ["emnist_all.sqlite"],
                    "truncated": ["emnist_all.sqlite.lzma"], "not_lzma": ["emnist_all.sqlite.lzma"],
                    "no_feature": ["emnist_all.sqlite"], "no_split": ["emnist_all.sqlite"]}


def write_bad_sqlite(case, folder):
  rng = np.random.default_rng(10)
  good = {"f1": [example(label=np.int32(3), pixels=np.ones((28, 28), np.float32))]}
  path = folder / "emnist_all.sqlite"
  if case == "no_table":
    with contextlib.closing(sqlite3.connect(path)) as con, con:
      con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                  "num_examples INTEGER NOT NULL);")
  elif case == "not_sqlite":
    path.write_bytes(rng.bytes(4096))
  elif case == "truncated":
    packed = write_tff_sqlite(path, {"all_train": good, "all_test": good}, compress=True)
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
  elif case == "not_lzma":
    (folder / "emnist_all.sqlite.lzma").write_bytes(b"SQLite format 3\0" + rng.bytes(100))
  elif case == "no_feature":
    write_tff_sqlite(path, {"all_train": {"f1": [example(label=np.int32(3))]}, "all_test": good})
  else:
    write_tff_sqlite(path, {"all_train": good})


@pytest.mark.parametrize("case", ["leaf_pixels", "leaf_text", "tff_pixels"])
def test_a_client_with_samples_of_another_shape(case, tmp_path):
  rng = np.random.default_rng(5)
  if case == "leaf_pixels":
    bad = femnist_user(rng, 3)
    bad["x"][1] = bad["x"][1][:-1]
    write_leaf(tmp_path, "train", [{"good": femnist_user(rng, 2), "bad": bad}])
    name, match = "femnist", "user 'bad': samples of different shapes"
  elif case == "leaf_text":
    bad = shakespeare_user(rng, 3)
    bad["x"][2] = bad["x"][2][:79]
    write_leaf(tmp_path, "train", [{"good": shakespeare_user(rng, 2), "bad": bad}])
    name, match = "shakespeare", "user 'bad': a sample of another shape .a string of 79 characters"
  else:
    with h5py.File(tmp_path / "fed_emnist_train.h5", "w") as f:
      f.create_dataset("examples/bad/pixels", data=np.zeros((2, 28, 27), np.float32))
      f.create_dataset("examples/bad/label", data=np.zeros(2, np.int32))
    name, match = "femnist", r"client 'bad': pixels of shape \(28, 27\), expected \(28, 28\)"
  with pytest.raises(DataFormatError, match=match) as e:
    fj.data.load(name, data_dir=tmp_path)
  one_line(e.value)


def test_bad_options(femnist_leaf):
  root, _ = femnist_leaf
  for kwargs, match in [
      ({"format": "csv"}, "unknown format 'csv'; known: leaf, tff"),
      ({"client_fraction": 1.5}, r"client_fraction must be a number in \(0, 1\]"),
      ({"num_clients": 2, "client_fraction": 0.5}, "pass num_clients or client_fraction, not both"),
      ({"partition": "iid"}, "femnist comes split by user"),
      ({"only_digits": True, "format": "leaf"}, "only_digits reads TFF's digits-only files"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      fj.data.load("femnist", data_dir=root, **kwargs)
    one_line(e.value)
  with pytest.raises(ValueError, match="num_clients must be an integer >= 1 for mnist"):
    fj.data.load("mnist", partition="iid")


def test_test_users_without_training_data_are_refused(tmp_path):
  """LEAF's `-t user` split gives train and test different users: no client would have both."""
  rng = np.random.default_rng(6)
  write_leaf(tmp_path, "train", [{"a": femnist_user(rng, 2)}])
  write_leaf(tmp_path, "test", [{"b": femnist_user(rng, 2)}])
  with pytest.raises(DataFormatError, match=r"1 of the 1 users of the test files have no training data.*-t sample"):
    fj.data.load("femnist", data_dir=tmp_path)


# --- CLI: listed, configs run end to end, errors exit 2 with nothing written ----------------------------------------


def call(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def test_listed():
  assert {"femnist", "shakespeare"} <= set(fj.data.dataset_names())
  code, out, _ = call("list")
  assert code == 0 and "femnist" in out and "shakespeare" in out
  configs = out.split("configs:")[1].split("\n")[0]
  assert {"femnist_natural", "shakespeare_natural", "cifar100_natural"} <= {c.strip() for c in configs.split(",")}


def test_femnist_natural_smoke_runs_end_to_end(femnist_leaf, tmp_path):
  root, _ = femnist_leaf
  out = tmp_path / "run"
  code, stdout, stderr = call("run", "--config", "femnist_natural", "--set", "smoke=true", "--set",
                              f"data_dir={root}", "--out", out, "--no-plots", "--quiet")
  assert code == 0, stderr
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_clients"] == 4 and 0.0 <= summary["final_accuracy_mean"] <= 1.0
  assert_trained(out, summary)


def test_shakespeare_natural_smoke_runs_end_to_end(shakespeare_leaf, tmp_path):
  """Needs the `char_lstm` model (branch charlstm)."""
  root, _ = shakespeare_leaf
  out = tmp_path / "run"
  code, _, stderr = call("run", "--config", "shakespeare_natural", "--set", "smoke=true", "--set", "num_clients=3", "--set", "model.hidden=32",
                         "--set", "model.layers=1",
                         "--set", f"data_dir={root}", "--out", out, "--no-plots", "--quiet")
  assert code == 0, stderr
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_clients"] == 3 and 0.0 <= summary["final_accuracy_mean"] <= 1.0
  assert_trained(out, summary)


def assert_trained(out, summary):
  """What a run that trained gives and a broken one would not: samples trained on in every round, finite losses."""
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert records and all(np.isfinite(r["train_loss"]) and np.isfinite(r["loss_mean"]) for r in records)
  assert summary["samples"] > 0 and summary["flops"] > 0 and summary["bytes_up"] > 0


def test_cifar100_natural_smoke_runs_end_to_end_on_tffs_sqlite(cifar_sqlite, tmp_path):
  """`fedspa-jax run --config cifar100_natural --set smoke=true --data-dir D` on TFF's cifar100.sqlite. The config's
  model is the paper-style configs' ResNet-18; this run swaps in FedAvg's CNN, whose compile is seconds, not minutes
  (ResNet-18 on CIFAR-100 runs end to end in tests/test_data_tfds_resnet.py)."""
  from fedspa_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load("cifar100_natural", smoke=True)
  assert (config.dataset, config.model, config.partition, config.data_args) == ("cifar100", "resnet18", None,
                                                                                  {"format": "tff"})
  assert config_lib.load("cifar100_natural").num_clients == 0  # every TFF client
  root, _, _ = cifar_sqlite
  out = tmp_path / "run"
  code, _, stderr = call("run", "--config", "cifar100_natural", "--set", "smoke=true", "--set", "model=cnn",
                         "--data-dir", root, "--out", out, "--no-plots", "--quiet")
  assert code == 0, stderr
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_clients"] == 4 and summary["dataset"] == "cifar100"
  assert 0.0 <= summary["final_accuracy_mean"] <= 1.0 and summary["clients_with_test_data"] == 4


@pytest.mark.parametrize("case", ["no_files", "no_examples", "format", *BAD_SQLITE_FILES])
def test_cli_data_errors_exit_2_with_nothing_written(case, tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  extra = []
  if case in BAD_SQLITE_FILES:
    write_bad_sqlite(case, data_dir)
  elif case == "no_examples":
    with h5py.File(data_dir / "fed_emnist_train.h5", "w") as f:
      f.create_group("snippets")
  elif case == "format":
    extra = ["--set", "data.format=csv"]
  out = tmp_path / "run"
  code, _, stderr = call("run", "--config", "femnist_natural", "--set", "smoke=true", "--data-dir", data_dir,
                         *extra, "--out", out)
  assert code == cli.EXIT_BAD_INPUT, stderr
  assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("fedspa-jax: error: "), stderr
  assert not out.exists()  # nothing written, not even the run folder
  assert not (tmp_path / "cache").exists()


SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "prepare_leaf.sh"


def test_prepare_script_usage_and_names():
  import subprocess  # pylint: disable=g-import-not-at-top

  usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
  assert usage.returncode == 2 and "./preprocess.sh -s niid --sf $SF -k 0 -t sample" in usage.stdout
  assert "set -e" not in usage.stdout
  bad = subprocess.run(["bash", str(SCRIPT), "femnist", "cifar"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "unknown name 'cifar'" in bad.stderr


def test_channel_stats_count_in_chunks_and_stay_exact():
  """The images' mean/std (`build.channel_stats`) over more images than one chunk (~4 M pixels) equal float64 numpy's."""
  x = np.random.default_rng(15).integers(0, 256, (1500, 32, 32, 3), dtype=np.uint8)  # chunks of 1,365 images
  mean, std = fj.data.channel_stats(x)
  scaled = x.astype(np.float64) / 255.0
  np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), rtol=1e-10)
