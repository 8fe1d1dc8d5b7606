"""Speed and memory of FedSpa rounds on synthetic data of the natural datasets' real sizes (no accuracies), and
(`--load`) of reading TFF's SQLite files of the real row counts.

    .venv/bin/python scripts/bench_natural.py                         # both datasets, 3 timed rounds each
    .venv/bin/python scripts/bench_natural.py --datasets shakespeare --rounds 5
    .venv/bin/python scripts/bench_natural.py --load --dir /tmp/tff_bench   # write the files once, time the loads
    .venv/bin/python scripts/bench_natural.py --load --scale 0.01      # the same at 1% of the rows (a quick check)

`--load` writes, once per folder, synthetic files in TFF's SQLite schema (`examples(split_name, client_id,
serialized_example_proto)` + `client_metadata`, one serialized tf.train.Example per row, each client's rows together)
with the real row counts: `emnist_all.sqlite` with `all_train`/`all_test` (3,400 writers, 671,585 + 77,483 images;
TFF's file also holds the digits-only splits, which a load of the full set scans past: `--digits` writes them too,
341,873 + 40,832 more rows), `shakespeare.sqlite` (715 roles, 16,068 + 2,356 snippets, lognormal lengths averaging
~220 characters), `cifar100.sqlite` (500 training clients x 100 images, 100 test clients x 100). The row contents
are drawn from a small pool of random Examples (parsing cost does not depend on the values). Then, each in its own
process, `fj.data.load(name, data_dir=..., format="tff", cache=False)` is timed and its peak resident memory
(ru_maxrss) reported, with the file's size. `--lzma` also compresses each file (xz, preset 1) into `<dir>/lzma/` and
times a first load there (which decompresses it once, next to itself) and a second (which reuses the copy).

- shakespeare: 715 clients (TFF's Shakespeare), ~4 M characters as 80-character sequences (50,000 sequences of
  random tokens 1..89, vocabulary 90 with token 0 = padding; each client's last sequence padded from a random
  point, as a snippet's tail is), client sizes lognormal (sigma 1.15: 1 to 1,300 sequences, std/mean 1.4;
  LEAF's Shakespeare users have std/mean ~1.7), 10% of each client's sequences held out for test; LEAF's model
  (`char_lstm`: embedding 8, two LSTM layers of 256).
- femnist: 3,550 writers, 800,000 random 28x28 uint8 images, 62 classes, client sizes lognormal (sigma 0.38:
  225 +- 89, 62 to 726 images per writer; LEAF's FEMNIST has 227 +- 89), 10% held out; the FedAvg CNN (`cnn`, as
  the EMNIST config).

FedSpa (density 0.5, ERK, gradient regrowth), 10 clients per round, 1 local epoch at batch 10 (as LEAF runs them),
the engine's defaults otherwise (cohort_batch="auto": one client at a time on CPU). Each dataset runs in its own
process, so that its peak resident memory (ru_maxrss: data, client store, compiled programs) is its own. One
warm-up round (compilation) is excluded; every timed round blocks on its result. A sample is one sequence for
Shakespeare (80 character positions) and one image for FEMNIST. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

LENGTH = 80


def client_sizes(rng: np.random.Generator, clients: int, total: int, sigma: float) -> np.ndarray:
  """`clients` lognormal sizes (at least 1) summing to `total` exactly."""
  raw = rng.lognormal(0.0, sigma, clients)
  sizes = np.maximum(1, np.floor(raw / raw.sum() * total)).astype(np.int64)
  short = total - int(sizes.sum())
  order = np.argsort(-raw)
  step = 1 if short > 0 else -1
  i = 0
  while short != 0:  # hand out (or take back) the rounding remainder, largest clients first
    k = order[i % clients]
    if sizes[k] + step >= 1:
      sizes[k] += step
      short -= step
    i += 1
  return sizes


def holdout(sizes: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-client (train, test) sizes: `fraction` of each client's samples (rounded down) for test."""
  test = np.floor(sizes * fraction).astype(np.int64)
  return sizes - test, test


def shakespeare_like(seed: int, clients: int = 715, characters: int = 4_000_000, vocab: int = 90):
  import fedspa_jax as fj

  rng = np.random.default_rng(seed)
  sizes = client_sizes(rng, clients, characters // LENGTH, 1.15)

  def split(counts):
    n = int(counts.sum())
    text = rng.integers(1, vocab, (n, LENGTH + 1), dtype=np.int32)
    last = np.cumsum(counts)[counts > 0] - 1
    cut = rng.integers(1, LENGTH + 1, last.size)  # a client's last sequence ends early: its tail is padding
    text[last] = np.where(np.arange(LENGTH + 1)[None, :] > cut[:, None], 0, text[last])
    return fj.data.split_from_flat(text[:, :-1], text[:, 1:], counts)

  train, test = holdout(sizes, 0.1)
  data = fj.data.FederatedData(train=split(train), test=split(test), num_classes=vocab, name="shakespeare_synthetic")
  return data, fj.models.get("char_lstm", vocab_size=vocab)


def femnist_like(seed: int, clients: int = 3550, images: int = 800_000, classes: int = 62):
  import fedspa_jax as fj

  rng = np.random.default_rng(seed)
  sizes = client_sizes(rng, clients, images, 0.38)

  def split(counts):
    n = int(counts.sum())
    x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return fj.data.split_from_flat(x, rng.integers(0, classes, n, dtype=np.int32), counts)

  train, test = holdout(sizes, 0.1)
  data = fj.data.FederatedData(train=split(train), test=split(test), num_classes=classes, name="femnist_synthetic")
  return data, fj.models.get("cnn", num_classes=classes)


BUILDERS = {"shakespeare": shakespeare_like, "femnist": femnist_like}

# --- TFF SQLite files of the real row counts (--load) ----------------------------------------------------------------

LOAD_DATASETS = {"femnist": "emnist_all.sqlite", "shakespeare": "shakespeare.sqlite", "cifar100": "cifar100.sqlite"}


def _example(**features) -> bytes:
  from tensorflow_datasets.proto import tf_example_pb2

  ex = tf_example_pb2.Example()
  for key, value in features.items():
    if isinstance(value, bytes):
      ex.features.feature[key].bytes_list.value.append(value)
    elif np.asarray(value).dtype.kind == "f":
      ex.features.feature[key].float_list.value.extend(np.ravel(value).tolist())
    else:
      ex.features.feature[key].int64_list.value.extend(np.ravel(value).astype(np.int64).tolist())
  return ex.SerializeToString()


def _write_sqlite(path: str, splits: dict) -> None:
  """`splits`: {split name: iterable of (client id, [serialized rows])}, in TFF's schema."""
  import sqlite3

  tmp = path + ".tmp"
  if os.path.exists(tmp):
    os.unlink(tmp)
  con = sqlite3.connect(tmp)
  con.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
              "serialized_example_proto BLOB NOT NULL);")
  con.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
              "num_examples INTEGER NOT NULL);")
  for split, clients in splits.items():
    for cid, rows in clients:
      con.executemany("INSERT INTO examples VALUES (?, ?, ?)", ((split, cid, r) for r in rows))
      con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (cid, split, len(rows)))
    con.commit()
  con.close()
  os.replace(tmp, path)


def _split_counts(rng, clients: int, total: int, sigma: float) -> np.ndarray:
  return client_sizes(rng, clients, total, sigma) if total >= clients else np.ones(clients, np.int64)


def write_tff_files(name: str, folder: str, scale: float, seed: int, digits: bool) -> str:
  """Writes `name`'s SQLite file of the real row counts (times `scale`) into `folder`, unless it is there."""
  path = os.path.join(folder, LOAD_DATASETS[name])
  if os.path.exists(path):
    return path
  rng = np.random.default_rng(seed)
  pick = lambda pool, n: [pool[i] for i in rng.integers(0, len(pool), n)]
  if name == "femnist":
    pool = {c: [_example(label=np.int32(c), pixels=rng.integers(0, 256, (28, 28)).astype(np.float32) / 255)
                for _ in range(8)] for c in range(62)}
    writers = [f"f{i:04d}_{i % 100:02d}" for i in range(max(2, int(3400 * scale)))]
    splits = {"all_train": 671_585, "all_test": 77_483}
    if digits:
      splits.update(digits_only_train=341_873, digits_only_test=40_832)
    out = {}
    for split, total in splits.items():
      counts = _split_counts(rng, len(writers), max(len(writers), int(total * scale)), 0.38)
      classes = 10 if split.startswith("digits") else 62
      out[split] = ((w, [pool[c][j % 8] for j, c in enumerate(rng.integers(0, classes, n))])
                    for w, n in zip(writers, counts))
    _write_sqlite(path, out)
  elif name == "shakespeare":
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.;:!?'\n", np.uint8)
    roles = [f"PLAY_{i // 20}_ROLE_{i}" for i in range(max(2, int(715 * scale)))]
    out = {}
    for split, total in (("train", 16_068), ("test", 2_356)):
      counts = _split_counts(rng, len(roles), max(len(roles), int(total * scale)), 1.15)
      out[split] = ((r, [_example(snippets=letters[rng.integers(0, len(letters), int(rng.lognormal(5.0, 0.9)) + 1)]
                                  .tobytes()) for _ in range(n)]) for r, n in zip(roles, counts))
    _write_sqlite(path, out)
  else:
    pool = [_example(coarse_label=np.int64(c // 5), image=rng.integers(0, 256, (32, 32, 3)), label=np.int64(c))
            for c in range(100) for _ in range(4)]
    per_client = max(1, int(100 * scale))
    _write_sqlite(path, {"train": ((str(c), pick(pool, per_client)) for c in range(500)),
                         "test": ((str(c), pick(pool, per_client)) for c in range(100))})
  return path


def measure_load(name: str, folder: str) -> dict:
  """One timed load of `name` from TFF's file in `folder` (`.sqlite.lzma` if it is there; run in its own process)."""
  import fedspa_jax as fj

  start = time.perf_counter()
  data = fj.data.load(name, data_dir=folder, format="tff", cache=False)
  seconds = time.perf_counter() - start
  import sqlite3

  from fedspa_jax.data import natural, tff_sqlite

  found = natural.find(name, folder, format="tff")
  splits = found.splits[:1] if natural.SPECS[name].holdout_default else found.splits  # the splits the load read
  with sqlite3.connect(tff_sqlite.decompressed(found.train[0])) as con:
    rows = con.execute(f"SELECT COUNT(*) FROM examples WHERE split_name IN ({', '.join('?' * len(splits))})",
                       splits).fetchone()[0]
  packed = os.path.join(folder, LOAD_DATASETS[name] + ".lzma")
  return {"dataset": name, "clients": data.num_clients, "train": data.train.total, "test": data.test.total,
          "rows": rows, "lzma_bytes": os.path.getsize(packed) if os.path.exists(packed) else None,
          "load_s": seconds, "peak_rss": peak_rss_bytes(),
          "data_bytes": sum(int(np.asarray(a).nbytes) for a in (data.train.x, data.train.y, data.test.x, data.test.y)),
          "file_bytes": os.path.getsize(os.path.join(folder, LOAD_DATASETS[name]))}


def main_load(args) -> None:
  folder = args.dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fedspa_tff_bench_{args.scale:g}")
  os.makedirs(folder, exist_ok=True)
  names = args.load_datasets
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {cpu()} x{os.cpu_count()} | "
        f"load before: {load()} | files in {folder} (scale {args.scale:g})")
  for name in names:
    start = time.perf_counter()
    write_tff_files(name, folder, args.scale, args.seed, args.digits)
    print(f"#   {LOAD_DATASETS[name]} ready in {time.perf_counter() - start:.0f} s", flush=True)
  runs = [(name, folder, "") for name in names]
  if args.lzma:
    import lzma

    packed_dir = os.path.join(folder, "lzma")
    os.makedirs(packed_dir, exist_ok=True)
    for name in names:
      target = os.path.join(packed_dir, LOAD_DATASETS[name] + ".lzma")
      if os.path.exists(copy := os.path.join(packed_dir, LOAD_DATASETS[name])):
        os.unlink(copy)  # the first load below must decompress
      if not os.path.exists(target):
        start = time.perf_counter()
        with open(os.path.join(folder, LOAD_DATASETS[name]), "rb") as src, lzma.open(target + ".tmp", "wb",
                                                                                     preset=1) as dst:
          while chunk := src.read(1 << 22):
            dst.write(chunk)
        os.replace(target + ".tmp", target)
        print(f"#   {LOAD_DATASETS[name]}.lzma written in {time.perf_counter() - start:.0f} s", flush=True)
      runs += [(name, packed_dir, " (.lzma: 1st load, decompresses)"), (name, packed_dir, " (.lzma: 2nd load)")]
  print("| file | rows read | clients | samples (train / test) | file size | load (s) | rows/s | data | peak RSS |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, where, label in runs:
    child = subprocess.run([sys.executable, __file__, "--measure-load", name, "--dir", where],
                           capture_output=True, text=True)
    if child.returncode != 0:
      sys.exit(f"{name}: the measuring process failed:\n{child.stderr[-3000:]}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    unit = "sequences" if name == "shakespeare" else "images"
    size = r["file_bytes"] if not label else r["lzma_bytes"]
    print(f"| {LOAD_DATASETS[name]}{label} | {r['rows']:,} | {r['clients']:,} | {r['train']:,} / {r['test']:,} {unit} | "
          f"{size / 2**20:,.0f} MiB | {r['load_s']:.1f} | {r['rows'] / r['load_s']:,.0f} | "
          f"{r['data_bytes'] / 2**20:,.0f} MiB | {r['peak_rss'] / 2**30:.2f} GiB |", flush=True)
    print(f"#   {name}: load now: {load()}", flush=True)


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def parse_cohort_batch(text: str) -> int | str | None:
  if text in ("auto", "none"):
    return None if text == "none" else text
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"--cohort-batch is auto, none or an integer >= 1, got {text!r}")
  return int(text)


def run_one(name: str, rounds: int, seed: int, cohort_batch: int | str | None = "auto") -> dict:
  """Builds the data, runs one warm-up and `rounds` timed FedSpa rounds; returns the measurements."""
  import jax

  import fedspa_jax as fj

  start = time.perf_counter()
  data, model = BUILDERS[name](seed)
  build_s = time.perf_counter() - start
  data_bytes = sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(data))
  after_data = peak_rss_bytes()
  device_data = jax.device_put(data)
  algo = fj.algorithms.get("fedspa", model=model, density=0.5, clients_per_round=10, local_epochs=1, batch_size=10,
                           lr=0.05, rounds=rounds + 1, cohort_batch=cohort_batch)
  state = algo.init(jax.random.key(seed), device_data)
  start = time.perf_counter()
  state, metrics = algo.round(state, device_data)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - start
  times, samples = [], []
  for _ in range(rounds):
    start = time.perf_counter()
    state, metrics = algo.round(state, device_data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
    samples.append(int(np.sum(metrics["samples"])))
  return {
      "dataset": name, "clients": data.num_clients, "model": type(model).__name__,
      "train_samples": data.train.total, "test_samples": data.test.total, "sample_shape": list(data.sample_shape),
      "data_bytes": data_bytes, "build_s": build_s, "first_round_s": first_s, "round_s": times,
      "round_samples": samples, "peak_rss_after_data": after_data, "peak_rss": peak_rss_bytes(),
      "jax": jax.__version__,
  }


def load() -> str:
  return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--datasets", nargs="+", choices=sorted(BUILDERS), default=["shakespeare", "femnist"])
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cohort-batch", default="auto", type=parse_cohort_batch,
                      help="clients vmapped together: auto (1 on CPU), none (the whole cohort) or k")
  parser.add_argument("--one", choices=sorted(BUILDERS), help=argparse.SUPPRESS)  # the child process
  parser.add_argument("--load", action="store_true", help="time loading TFF's SQLite files of the real row counts")
  parser.add_argument("--load-datasets", nargs="+", choices=list(LOAD_DATASETS), default=list(LOAD_DATASETS))
  parser.add_argument("--dir", help="--load: the folder the files are written to once (default: under $TMPDIR)")
  parser.add_argument("--scale", type=float, default=1.0, help="--load: share of the real row counts to write")
  parser.add_argument("--digits", action="store_true", help="--load: also write EMNIST's digits-only splits")
  parser.add_argument("--lzma", action="store_true", help="--load: also time loads from .sqlite.lzma files")
  parser.add_argument("--measure-load", choices=list(LOAD_DATASETS), help=argparse.SUPPRESS)  # the child process
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error("--rounds must be >= 1")
  if not 0 < args.scale <= 1:
    parser.error("--scale must be in (0, 1]")
  if args.measure_load:
    print(json.dumps(measure_load(args.measure_load, args.dir)))
    return
  if args.load:
    main_load(args)
    return
  if args.one:
    print(json.dumps(run_one(args.one, args.rounds, args.seed, args.cohort_batch)))
    return

  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {cpu()} x{os.cpu_count()} | "
        f"load before: {load()} | cohort_batch {args.cohort_batch}")
  print("| dataset | clients | samples (train / test) | model | data | compile + 1st round (s) | samples/round "
        "| s/round | samples/s | peak RSS |")
  print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name in args.datasets:
    child = subprocess.run([sys.executable, __file__, "--one", name, "--rounds", str(args.rounds),
                            "--seed", str(args.seed), "--cohort-batch", str(args.cohort_batch).lower()],
                           capture_output=True, text=True)
    if child.returncode != 0:
      sys.exit(f"{name}: the measuring process failed:\n{child.stderr[-3000:]}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    total_s, total_samples = sum(r["round_s"]), sum(r["round_samples"])
    per_sample = " (x80 characters)" if name == "shakespeare" else ""
    print(f"| {name} (synthetic) | {r['clients']:,} | {r['train_samples']:,} / {r['test_samples']:,}{per_sample} | "
          f"{r['model']} | {r['data_bytes'] / 2**20:,.0f} MiB | {r['first_round_s']:.1f} | "
          f"{total_samples / len(r['round_s']):,.0f} ({min(r['round_samples']):,}-{max(r['round_samples']):,}) | "
          f"{total_s / len(r['round_s']):.2f} | {total_samples / total_s:,.0f} | "
          f"{r['peak_rss'] / 2**30:.2f} GiB (after data: {r['peak_rss_after_data'] / 2**30:.2f}) |", flush=True)
    print(f"#   {name}: per round {', '.join(f'{n} in {t:.2f} s' for n, t in zip(r['round_samples'], r['round_s']))};"
          f" data built in {r['build_s']:.1f} s; jax {r['jax']}; load now: {load()}", flush=True)


if __name__ == "__main__":
  main()
