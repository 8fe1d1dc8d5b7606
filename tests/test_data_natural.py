"""FEMNIST and Shakespeare from files written exactly as LEAF and TFF write them, checked client by client.

LEAF's files are `json.dump` of `{"users", "num_samples", "user_data"}`, several per split under `data/train/` and
`data/test/` (with the empty `user_data` entries LEAF's split step leaves for users it dropped); TFF's are HDF5 files
with `examples/<client_id>/<feature>` written with h5py. The expected samples are computed here from the written
values by plain Python, independently of the loader.
"""

import contextlib
import io
import json
import pathlib
import shutil

import h5py
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import cli
from fedspa_jax.data import natural, text
from fedspa_jax.data.natural_formats import DataFormatError

L = text.SEQUENCE_LENGTH
VOCAB = text.CHARACTERS
ALPHABET = VOCAB + "@#\u00e9"  # three characters outside LEAF's set: out of vocabulary


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


def write_leaf(root: pathlib.Path, split: str, files: list[dict[str, dict]], dropped=("dropped_user",)) -> None:
  """One JSON file per dict {user: {"x", "y"}}, named as LEAF's split step names them."""
  folder = root / "data" / split
  folder.mkdir(parents=True, exist_ok=True)
  for i, users in enumerate(files):
    user_data = dict(users)
    user_data.update({u: {"x": [], "y": []} for u in dropped})  # LEAF keeps entries for users it dropped
    doc = {"users": list(users), "num_samples": [len(d["y"]) for d in users.values()], "user_data": user_data}
    name = f"all_data_{i}_niid_05_keep_0_{split}_9.json" if split in ("train", "test") else f"all_data_{i}.json"
    with open(folder / name, "w") as f:
      json.dump(doc, f)


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


# --- expected values, by plain Python ---------------------------------------------------------------------------


def expected_images(d):
  x = np.array([[round(255 * (1 - v)) for v in row] for row in d["x"]], np.uint8).reshape(-1, 28, 28, 1)
  return x, np.array(d["y"], np.int32)


def expected_windows(d):
  x = np.array([[token(c) for c in s] for s in d["x"]], np.int32).reshape(-1, L)
  y = np.array([[token(c) for c in s[1:] + nxt] for s, nxt in zip(d["x"], d["y"])], np.int32).reshape(-1, L)
  return x, y


def expected_chunks(snippets):
  xs, ys = [], []
  for s in snippets:
    for i in range(0, len(s), L + 1):
      piece = [token(c) for c in s[i : i + L + 1]]
      if len(piece) < 2:
        continue
      xs.append(piece[:-1] + [0] * (L + 1 - len(piece)))
      ys.append(piece[1:] + [0] * (L + 1 - len(piece)))
  return np.array(xs, np.int32).reshape(-1, L), np.array(ys, np.int32).reshape(-1, L)


def assert_client(split, k, x, y):
  got_x, got_y = split.client(k)
  np.testing.assert_array_equal(got_x, x)
  np.testing.assert_array_equal(got_y, y)


# --- fixtures: small datasets in both formats --------------------------------------------------------------------

# Sizes chosen so the options have something to select: (train, test) samples per user.
FEMNIST_SIZES = {"f0000_14": (5, 2), "f0001_41": (1, 1), "f0002_03": (9, 3), "f0003_17": (3, 1), "f0004_22": (6, 2)}
SHAKESPEARE_SIZES = {"THE_TEMPEST_PROSPERO": (6, 2), "HAMLET_HAMLET": (2, 1), "KING_LEAR_FOOL": (4, 1)}


def leaf_users(root, rng, make_user, sizes, first_file):
  """Users' (train, test) samples written in LEAF's layout: the first `first_file` users in one file, the rest in the
  next (as LEAF's files go)."""
  users = {u: (make_user(rng, a), make_user(rng, b)) for u, (a, b) in sizes.items()}
  names = list(users)
  for split, i in (("train", 0), ("test", 1)):
    write_leaf(root, split, [{u: users[u][i] for u in names[:first_file]},
                             {u: users[u][i] for u in names[first_file:]}])
  return users


@pytest.fixture(scope="module")
def femnist_leaf(tmp_path_factory):
  root = tmp_path_factory.mktemp("femnist_leaf")
  return root, leaf_users(root, np.random.default_rng(0), femnist_user, FEMNIST_SIZES, first_file=3)


@pytest.fixture(scope="module")
def shakespeare_leaf(tmp_path_factory):
  root = tmp_path_factory.mktemp("shakespeare_leaf")
  return root, leaf_users(root, np.random.default_rng(1), shakespeare_user, SHAKESPEARE_SIZES, first_file=1)


@pytest.fixture(scope="module")
def emnist_tff(tmp_path_factory):
  root = tmp_path_factory.mktemp("emnist_tff")
  rng = np.random.default_rng(2)
  full = {u: (femnist_user(rng, a), femnist_user(rng, b)) for u, (a, b) in FEMNIST_SIZES.items()}
  digits = {u: tuple({"x": d["x"], "y": [v % 10 for v in d["y"]]} for d in pair) for u, pair in full.items()}
  for prefix, users in (("fed_emnist", full), ("fed_emnist_digitsonly", digits)):
    for split, i in (("train", 0), ("test", 1)):
      write_tff_images(root / f"{prefix}_{split}.h5", {u: users[u][i] for u in users})
  return root, full, digits


def snippets(rng, lengths):
  return ["".join(rng.choice(list(ALPHABET), n)) for n in lengths]


@pytest.fixture(scope="module")
def shakespeare_tff(tmp_path_factory):
  root = tmp_path_factory.mktemp("shakespeare_tff")
  rng = np.random.default_rng(3)
  # Lengths around the chunk size: 81 (one full chunk), 82 (a last chunk of one character, dropped), 200, 5, 1.
  train = {"ALLS_WELL_HELENA": snippets(rng, [81, 82, 200]), "CORIOLANUS_MENENIUS": snippets(rng, [5, 1, 163]),
           "THE_TEMPEST_ARIEL": snippets(rng, [40, 300])}
  test = {u: snippets(rng, [30 + 20 * i]) for i, u in enumerate(train)}
  write_tff_snippets(root / "shakespeare_train.h5", train, fixed_length=("CORIOLANUS_MENENIUS",))
  write_tff_snippets(root / "shakespeare_test.h5", test)
  return root, train, test


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.keras/datasets of the machine


# --- round trips, client by client --------------------------------------------------------------------------------


def test_leaf_femnist_round_trip(femnist_leaf):
  root, users = femnist_leaf
  data = fj.data.load("femnist", data_dir=root, format="leaf")
  assert data.num_clients == len(users) and data.num_classes == 62 and data.name == "femnist"
  assert data.train.x.dtype == np.uint8 and data.sample_shape == (28, 28, 1) and data.train.y.dtype == np.int32
  for k, (train, test) in enumerate(users.values()):  # clients in file order: each one's rows are its own
    assert_client(data.train, k, *expected_images(train))
    assert_client(data.test, k, *expected_images(test))
  assert data.train.total == sum(a for a, _ in FEMNIST_SIZES.values())
  assert data.test.total == sum(b for _, b in FEMNIST_SIZES.values())
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

  root, users = femnist_leaf
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
  assert events == [("parse", 1), *[("user", u) for u in list(users)[:3]], ("parse", 2),
                    *[("user", u) for u in list(users)[3:]]]
  assert all(set(doc["user_data"]) == {"dropped_user"} for doc in docs)  # each user's lists went once converted


def test_a_training_user_missing_from_the_test_files_gets_no_test_data(tmp_path):
  rng = np.random.default_rng(8)
  a, b, t = femnist_user(rng, 3), femnist_user(rng, 2), femnist_user(rng, 1)
  write_leaf(tmp_path, "train", [{"a": a, "b": b}])
  write_leaf(tmp_path, "test", [{"b": t}])
  data = fj.data.load("femnist", data_dir=tmp_path)
  assert data.test.count.tolist() == [0, 1]
  assert_client(data.test, 1, *expected_images(t))


def test_leaf_shakespeare_round_trip(shakespeare_leaf):
  root, users = shakespeare_leaf
  data = fj.data.load("shakespeare", data_dir=root, format="leaf")
  assert data.num_classes == text.VOCAB_SIZE == 82 and data.mean is None
  assert data.train.x.dtype == np.int32 and data.train.y.shape == (data.train.x.shape[0], L)
  for k, (train, test) in enumerate(users.values()):
    assert_client(data.train, k, *expected_windows(train))
    assert_client(data.test, k, *expected_windows(test))
  x, y = data.train.client(0)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
  assert (x > 0).all() and (y > 0).all()  # LEAF's windows are full: no padding
  assert (x == text.OOV).any()  # the characters outside LEAF's set


@pytest.mark.parametrize("only_digits", [False, True])
def test_tff_emnist_round_trip(emnist_tff, only_digits):
  root, full, digits = emnist_tff
  users = digits if only_digits else full
  data = fj.data.load("femnist", data_dir=root, format="tff", only_digits=only_digits)
  assert data.num_classes == (10 if only_digits else 62) and data.num_clients == len(users)
  for k, (train, test) in enumerate(users.values()):  # h5py lists clients by name; these are written sorted
    assert_client(data.train, k, *expected_images(train))
    assert_client(data.test, k, *expected_images(test))


def test_tff_shakespeare_round_trip(shakespeare_tff):
  root, train, test = shakespeare_tff
  data, ids = natural.load_natural("shakespeare", data_dir=root, format="tff", return_users=True)
  assert ids == sorted(train)
  for k, user in enumerate(ids):
    assert_client(data.train, k, *expected_chunks(train[user]))
    assert_client(data.test, k, *expected_chunks(test[user]))
  # Snippet lengths 81, 82, 200 make 1, 1 (the 1-character tail dropped) and 3 chunks; the 200's last is padded.
  assert data.train.count[ids.index("ALLS_WELL_HELENA")] == 5
  x, y = data.train.client(ids.index("ALLS_WELL_HELENA"))
  real = 200 - 2 * (L + 1) - 1  # the last chunk: 38 characters, 37 inputs with a next character
  assert (x[-1, real:] == 0).all() and (y[-1, real:] == 0).all()
  assert (x[-1, :real] > 0).all() and (y[-1, :real] > 0).all()


def test_summary_counts_sequences_and_target_tokens(shakespeare_tff):
  data = fj.data.load("shakespeare", data_dir=shakespeare_tff[0])
  s = fj.data.summarize(data)
  assert s["train"]["count"] == np.asarray(data.train.count).tolist()  # sequences per client
  for k in range(data.num_clients):
    _, y = data.train.client(k)
    assert s["train"]["label_counts"][k] == np.bincount(y[y > 0], minlength=text.VOCAB_SIZE).tolist()  # no padding
  assert "shakespeare: 3 clients" in fj.data.format_summary(s)


def test_vocabulary():
  assert text.PAD == 0 and text.OOV == 81 and text.VOCAB_SIZE == 82 and len(set(VOCAB)) == 80
  ids = text.encode("To be, or not@")
  assert ids.dtype == np.uint8 and ids[-1] == text.OOV and text.decode(ids) == "To be, or not\ufffd"
  assert text.decode(np.array([0, 0])) == "" and text.chunk(text.encode("a")).shape == (0, L + 1)


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
  write_leaf(root, "all_data", [merged], dropped=())
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
  assert ids == [u for u, (a, b) in FEMNIST_SIZES.items() if a + b >= 8] == ["f0002_03", "f0004_22"]
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
  sizes = {u: a + b for u, (a, b) in FEMNIST_SIZES.items()}
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
  with pytest.raises(FileNotFoundError, match="no TFF HDF5 files .shakespeare_train.h5"):
    fj.data.load("shakespeare", data_dir=tmp_path, format="tff")


def test_leaf_num_samples_must_match_the_data(tmp_path):
  rng = np.random.default_rng(4)
  write_leaf(tmp_path, "train", [{"u1": femnist_user(rng, 3)}])
  path = next((tmp_path / "data" / "train").glob("*.json"))
  doc = json.loads(path.read_text())
  doc["num_samples"] = [4]
  path.write_text(json.dumps(doc))
  with pytest.raises(DataFormatError) as e:
    fj.data.load("femnist", data_dir=tmp_path)
  assert "user 'u1': num_samples says 4 but user_data holds 3 x and 3 y" in one_line(e.value)


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
  assert code == 0 and "femnist" in out and "shakespeare" in out and "femnist_natural" in out


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


@pytest.mark.parametrize("case", ["no_files", "num_samples", "no_examples", "format"])
def test_cli_data_errors_exit_2_with_nothing_written(case, tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  extra = []
  if case == "num_samples":
    rng = np.random.default_rng(7)
    write_leaf(data_dir, "train", [{"u": femnist_user(rng, 2)}])
    path = next((data_dir / "data" / "train").glob("*.json"))
    path.write_text(path.read_text().replace('"num_samples": [2]', '"num_samples": [3]'))
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
