"""The character LSTM and sequence labels: model shapes and FLOPs, next-character accuracy without padding, FedSpa /
Sub-FedAvg / FedAvg rounds on the LSTM with exact mask counts, and the per-client evaluation against a hand loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import client as client_lib
from fedspa_jax import models
from fedspa_jax.evaluation import evaluate_client
from fedspa_jax.models import flops

VOCAB, LENGTH, EMBED, HIDDEN = 10, 8, 4, 6
TINY = dict(embed_dim=EMBED, hidden=HIDDEN)
# The engine tests train a one-layer LSTM (the same module, `layers=1`): a second layer doubles their compile time
# and adds nothing the mask and label code could see (16 of its 18 kernels are the same kind of leaf).
ENGINE = dict(TINY, layers=1)
# (train, test) sequences per client; client 3 has no test data
SIZES = [(7, 3), (3, 2), (12, 5), (5, 0), (9, 4)]


def sequences(rng, n):
  """n token sequences [n, L] and their next tokens, with 0..L-2 trailing padding positions (token 0)."""
  text = rng.integers(1, VOCAB, (n, LENGTH + 1))
  lengths = rng.integers(2, LENGTH + 1, n)
  padded = np.arange(LENGTH + 1)[None, :] >= lengths[:, None] + 1
  text = np.where(padded, 0, text)
  return text[:, :-1].astype(np.int32), text[:, 1:].astype(np.int32)


def make_data():
  rng = np.random.default_rng(0)
  train = [sequences(rng, a) for a, _ in SIZES]
  test = [sequences(rng, b) for _, b in SIZES]
  return fj.data.from_clients(train, test, num_classes=VOCAB, name="tiny_text")  # sequence labels [n_k, L]


@pytest.fixture(scope="module")
def data():
  return make_data()


@pytest.fixture(scope="module")
def model():
  return models.get("char_lstm", vocab_size=VOCAB, **TINY)


@pytest.fixture(scope="module")
def engine_model():
  return models.get("char_lstm", vocab_size=VOCAB, **ENGINE)


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


# ------------------------------------------------------------------------------------------------- the model


def test_registry_accepts_vocab_size_or_num_classes():
  assert "char_lstm" in models.names()
  assert models.get("char_lstm", vocab_size=12).num_classes == 12
  assert models.get("char_lstm", num_classes=12).vocab_size == 12
  assert models.get("char_lstm", num_classes=12, vocab_size=12).num_classes == 12
  with pytest.raises(ValueError, match="disagree"):
    models.get("char_lstm", num_classes=12, vocab_size=13)
  with pytest.raises(ValueError, match="needs num_classes"):
    models.get("char_lstm")


def test_leaf_size_parameters_and_maskable_leaves():
  model = models.get("char_lstm", vocab_size=80)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 80))))["params"]
  per_layer = lambda n_in: 4 * (n_in * 256 + 256 * 256 + 256)  # four gates: input kernel, recurrent kernel, bias
  expected = 80 * 8 + per_layer(8) + per_layer(256) + 256 * 80 + 80
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == expected == 817_872
  per_position = 2 * 4 * (8 * 256 + 256 * 256) + 2 * 4 * (256 * 256 + 256 * 256) + 2 * 256 * 80
  assert sum(flops.forward_flops(model, (80,)).values()) == 80 * per_position == 130_416_640  # docs/models.md
  maskable = {jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
              if fj.masks.is_maskable(path, leaf)}
  gates = [f"['lstm{l}']['cell']['{k}{g}']['kernel']" for l in (1, 2) for k in "ih" for g in "ifgo"]
  assert maskable == {"['embed']['embedding']", "['head']['kernel']", *gates}


def test_logits_per_position_and_causal(model):
  params = model.init(jax.random.key(0), jnp.zeros((1, LENGTH)))["params"]
  x = np.random.default_rng(1).integers(1, VOCAB, (3, LENGTH)).astype(np.float32)  # the engine feeds float ids
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  logits = apply(x)
  assert logits.shape == (3, LENGTH, VOCAB)
  later = x.copy()
  later[:, 5:] = 0  # changing later tokens leaves earlier positions' logits unchanged (left to right)
  np.testing.assert_array_equal(apply(later)[:, :5], logits[:, :5])
  assert not np.array_equal(apply(later)[:, 5:], logits[:, 5:])
  with pytest.raises(ValueError, match=r"token ids \[batch, length\]"):
    model.apply({"params": params}, x[..., None])


def test_forward_flops_match_hand_count(model):
  got = flops.forward_flops(model, (LENGTH,))
  # per position: 4 gates x 2 x (input kernel + recurrent kernel); the head 2 x hidden x vocab; embedding free
  lstm1 = LENGTH * 4 * 2 * (EMBED * HIDDEN + HIDDEN * HIDDEN)
  lstm2 = LENGTH * 4 * 2 * (HIDDEN * HIDDEN + HIDDEN * HIDDEN)
  head = LENGTH * 2 * HIDDEN * VOCAB
  assert got["lstm1/cell/ii"] == LENGTH * 2 * EMBED * HIDDEN
  assert got["lstm2/cell/ho"] == LENGTH * 2 * HIDDEN * HIDDEN
  assert len(got) == 17 and sum(got.values()) == lstm1 + lstm2 + head == 9408
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, LENGTH))))["params"]
  densities = fj.masks.erk_densities(params, 0.5)
  sparse = flops.sparse_forward_flops(model, (LENGTH,), densities)
  for path, f in sparse.items():  # every counted layer's kernel is a params leaf, read at its own density
    node = densities
    for name in path.split("/"):
      node = node[name]
    assert f == pytest.approx(node["kernel"] * got[path])


# ----------------------------------------------------------------------------- sequence labels, padding ignored


def test_next_character_accuracy_and_loss_ignore_padding():
  # Two real sequences and one weight-0 slot; logits put the argmax on token 0 at every padded position, so counting
  # padding would raise the accuracy from 2/3 to 7/8 (and change the loss).
  y = jnp.asarray([[1, 2, 0, 0], [3, 0, 0, 0], [2, 2, 2, 2]], jnp.int32)
  logits = np.zeros((3, 4, 4), np.float32)
  logits[..., 0] = 2.0  # predicts padding everywhere...
  logits[0, 0, 1] = logits[1, 0, 3] = 5.0  # ...except two real positions, predicted right
  logits[0, 1, 3] = 5.0  # a real position predicted wrong
  logits[2, :, 2] = 9.0  # the weight-0 slot would be all right
  weight = jnp.asarray([1.0, 1.0, 0.0])
  loss, correct, labels = client_lib.weighted_loss(lambda p, x: jnp.asarray(logits), None, None, y, weight)
  log_softmax = np.asarray(jax.nn.log_softmax(logits))
  real = [(0, 0, 1), (0, 1, 2), (1, 0, 3)]
  assert float(correct) == 2 and float(labels) == 3
  assert float(loss) == pytest.approx(-np.mean([log_softmax[b, t, c] for b, t, c in real]), rel=1e-6)
  # the per-client evaluation scores the same positions
  data = client_lib.ClientData(jnp.zeros((3, 4)), y, jnp.int32(0), jnp.int32(2))
  scored = evaluate_client(lambda p, x: jnp.asarray(logits[: x.shape[0]]), None, data, preprocess=lambda x: x,
                           chunk_size=2)
  assert float(scored["accuracy"]) == pytest.approx(2 / 3)
  assert float(scored["loss"]) == pytest.approx(float(loss), rel=1e-6)
  assert int(scored["count"]) == 2  # samples are sequences


def hand_scores(model, params, x, y):
  """Numpy: mean loss and accuracy over the non-padding positions of sequences x, y [n, L]."""
  logits = np.asarray(model.apply({"params": params}, x.astype(np.float32)), np.float64)
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  real = y != 0
  nll = -np.take_along_axis(log_softmax, y[..., None], -1)[..., 0]
  return nll[real].mean(), (logits.argmax(-1) == y)[real].mean()


# -------------------------------------------------------------------------------------------- algorithms


@pytest.fixture(scope="module")
def fedspa_run(engine_model, data):
  algo = fj.algorithms.get("fedspa", model=engine_model, density=0.5, clients_per_round=3, local_epochs=1,
                           batch_size=4, lr=0.5, rounds=4, personal_model="local")
  state = algo.init(jax.random.key(0), data)
  first = algo.client_states(state, data)
  history = []
  for _ in range(3):
    state, metrics = algo.round(state, data)
    history.append(metrics)
  return algo, state, first, algo.client_states(state, data), history


def test_fedspa_on_the_lstm_keeps_exact_counts_and_zeros(fedspa_run, engine_model):
  algo, state, first, last, history = fedspa_run
  params = state.server.params
  # Every client starts with the same count per leaf (round(d_l * n_l): tests/test_references.py checks those by
  # hand) and keeps it through every prune-and-regrow.
  initial = [np.asarray(c) for c in jax.tree.leaves(fj.masks.count_active(first.mask, stacked=True))]
  targets = [int(c[0]) for c in initial]
  for c, target in zip(initial, targets):
    np.testing.assert_array_equal(c, target)
  for c, target in zip(jax.tree.leaves(fj.masks.count_active(last.mask, stacked=True)), targets):
    np.testing.assert_array_equal(np.asarray(c), target)
  sizes = [math.prod(p.shape) for p in jax.tree.leaves(params)]
  sparse = [i for i, (t, n) in enumerate(zip(targets, sizes)) if t < n]
  assert len(sparse) == 10  # embedding, 8 LSTM kernels, head kernel
  # ERK at density 0.5 over the kernels: half their entries in all, up to each leaf's rounding.
  kernels = [i for i, p in enumerate(jax.tree.leaves(params)) if p.ndim >= 2]
  assert abs(sum(targets[i] for i in kernels) - 0.5 * sum(sizes[i] for i in kernels)) <= len(kernels)
  # masks moved (prune and regrow ran on the LSTM's kernels) for the clients that trained
  trained = np.asarray(last.trained)
  moved = np.asarray(jax.vmap(fj.masks.hamming_distance)(first.mask, last.mask))
  assert trained.any() and (moved[trained] > 0).all() and (moved[~trained] == 0).all()
  # the sparse models the clients ended with are zero outside their masks, and not elsewhere
  for w, m in zip(jax.tree.leaves(last.local), jax.tree.leaves(last.local_mask)):
    w, m = np.asarray(w)[trained], np.asarray(m)[trained]
    assert (w[~m] == 0).all() and np.count_nonzero(w[m]) == m.sum()
  for metrics in history:
    assert np.isfinite(np.asarray(metrics["loss"])).all()
  # The clients' training loss falls over the rounds (lr 0.5 from a model near uniform over 82 tokens).
  assert float(np.mean(history[-1]["loss"])) < float(np.mean(history[0]["loss"]))
  assert float(history[0]["flops"]) > 0


def test_subfedavg_rounds_and_evaluation_run_on_the_lstm(engine_model, data):
  algo = fj.algorithms.get("subfedavg", model=engine_model, clients_per_round=3, local_epochs=1, batch_size=4,
                           lr=0.5, rounds=2)
  state = algo.init(jax.random.key(0), data)
  before = copy(state.server.params)
  ev0 = algo.evaluate(state, data)
  for _ in range(2):
    state, metrics = algo.round(state, data)
    assert np.isfinite(np.asarray(metrics["loss"])).all()
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, state.server.params)
  assert all(jax.tree.leaves(changed))
  ev = algo.evaluate(state, data)  # each client's own kept network on its test sequences
  accuracy = np.asarray(ev["accuracy"])
  assert np.isnan(accuracy[3]) and int(ev["with_test_data"]) == 4
  assert np.isfinite(accuracy[[0, 1, 2, 4]]).all()
  # The clients that trained score their own networks with a lower loss than the initial model.
  trained = np.flatnonzero(np.asarray(ev["participated"]) & ~np.isnan(accuracy))
  assert trained.size and np.mean(np.asarray(ev["loss"])[trained]) < np.mean(np.asarray(ev0["loss"])[trained])


def test_fedavg_round_reports_per_position_training_metrics(engine_model, data):
  # One local step over all of a client's sequences (batch 16 >= 12): the reported loss and accuracy are those of
  # the round's starting model over the client's non-padding positions; samples are sequences.
  algo = fj.algorithms.get("fedavg", model=engine_model, clients_per_round=3, local_steps=1, local_epochs=None,
                           batch_size=16, lr=0.5, rounds=1)
  state = algo.init(jax.random.key(0), data)
  start = copy(state.server.params)
  state, metrics = algo.round(state, data)
  for i, k in enumerate(np.asarray(metrics["cohort"])):
    loss, accuracy = hand_scores(engine_model, start, *data.train.client(k))
    assert float(metrics["loss"][i]) == pytest.approx(loss, rel=1e-5)
    assert float(metrics["accuracy"][i]) == pytest.approx(accuracy, rel=1e-6)
    assert int(metrics["samples"][i]) == SIZES[k][0] and int(metrics["steps"][i]) == 1
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), start, state.server.params)
  assert all(jax.tree.leaves(changed))


def test_evaluation_equals_a_hand_loop_for_one_client(fedspa_run, engine_model, data):
  algo, state, _, last, _ = fedspa_run
  ev = algo.evaluate(state, data)
  np.testing.assert_array_equal(ev["count"], data.test.count)
  for k in (0, 2):  # scored with the model the client ended its last training with ("local"), or m_k ⊙ w
    trained = bool(last.trained[k])
    params = jax.tree.map(lambda a: a[k], last.local) if trained else fj.masks.apply_mask(
        state.server.params, jax.tree.map(lambda a: a[k], last.mask))
    loss, accuracy = hand_scores(engine_model, params, *data.test.client(k))
    assert float(ev["loss"][k]) == pytest.approx(loss, rel=1e-5)
    assert float(ev["accuracy"][k]) == pytest.approx(accuracy, rel=1e-6)


def test_a_model_with_the_wrong_vocabulary_or_data_is_refused_before_compiling(data):
  algo = fj.algorithms.get("fedavg", model=models.get("char_lstm", vocab_size=VOCAB + 1, **ENGINE),
                           clients_per_round=2, batch_size=4, rounds=1)
  with pytest.raises(ValueError, match=r"outputs logits of shape \(8, 11\) .* 10 classes per sample and label "
                                       r"position \(8 positions\)"):
    algo.init(jax.random.key(0), data)
  rng = np.random.default_rng(0)
  images = fj.data.from_clients([(rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4))] * 2,
                                num_classes=VOCAB)
  algo = fj.algorithms.get("fedavg", model=models.get("char_lstm", vocab_size=VOCAB, **ENGINE),
                           clients_per_round=2, batch_size=4, rounds=1)
  with pytest.raises(ValueError, match=r"does not accept inputs of shape \(28, 28, 1\)"):
    algo.init(jax.random.key(0), images)


def test_sweep_stacks_sequence_datasets_of_different_sizes(data):
  from fedspa_jax.sweep import stack_data

  smaller = fj.data.FederatedData(
      train=fj.data.stack_clients([data.train.client(k)[0][:2] for k in range(5)],
                                  [data.train.client(k)[1][:2] for k in range(5)]),
      test=data.test, num_classes=VOCAB, name="tiny_text")
  stacked = stack_data([data, smaller])
  assert stacked.train.y.shape == (2, data.train.y.shape[0], LENGTH)
  np.testing.assert_array_equal(stacked.train.y[1, :10], smaller.train.y)
  assert (stacked.train.y[1, 10:] == 0).all()
