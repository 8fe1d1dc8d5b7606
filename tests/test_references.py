"""Hand-derived references: each rule recomputed here in numpy from its paper's formula, never by the code under test.

One client with a full batch makes every step deterministic (the batch order does not change a full batch's mean
gradient), so a whole round can be replayed by hand: softmax cross-entropy gradients written out (dL/dlogits =
(softmax - onehot) / B), plain SGD, the rules of FedSpa (Huang et al. 2022; RigL's drop and grow), Ditto (Li et al.
2021), FedRep (Collins et al. 2021) and the server step w <- w - server_lr * aggregate(U).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj

D, C, N = 6, 3, 8  # features, classes, samples of the one client
LR = 0.5


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


@pytest.fixture(scope="module")
def one_client():
  """One client with N float samples (train) and a few test samples; classes all present."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  xt = rng.normal(size=(3, D)).astype(np.float32)
  yt = np.array([0, 1, 2], np.int32)
  return fj.data.from_clients([(x, y)], [(xt, yt)], num_classes=C), x.astype(np.float64), y


def softmax_grad(logits, y):
  """dL/dlogits of the mean softmax cross-entropy: (softmax - onehot) / B."""
  z = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return p / len(y)


def linear_grads(kernel, bias, x, y):
  g = softmax_grad(x @ kernel + bias, y)
  return x.T @ g, g.sum(axis=0)


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------------------------------------------------------------
# FedSpa: one client, one round, by hand.


def fedspa_round_by_hand(w, mask, x, y, *, steps, lr, rate, server_lr):
  """Returns (x_final kernel, bias, kept mask, new mask, U, w_next) of one FedSpa client (RigL regrowth)."""
  kernel0 = np.where(mask, w["kernel"], 0.0)
  kernel, bias = kernel0.copy(), w["bias"].copy()
  for _ in range(steps):  # masked SGD: the gradient of inactive coordinates is dropped
    gk, gb = linear_grads(kernel, bias, x, y)
    kernel, bias = kernel - lr * np.where(mask, gk, 0.0), bias - lr * gb
  active = np.flatnonzero(mask.ravel())
  drop = math.ceil(rate * active.size)
  order = active[np.argsort(np.abs(kernel.ravel()[active]), kind="stable")]
  kept = mask.ravel().copy()
  kept[order[:drop]] = False  # the `drop` active weights of smallest |x| at the trained point
  dense_grad, _ = linear_grads(kernel, bias, x, y)  # the dense gradient of one batch at the trained point
  candidates = np.flatnonzero(~kept)
  grown = candidates[np.argsort(-np.abs(dense_grad.ravel()[candidates]), kind="stable")[:drop]]
  new = kept.copy()
  new[grown] = True
  update = {"kernel": kernel0 - kernel, "bias": w["bias"] - bias}
  w_next = {k: w[k] - server_lr * update[k] for k in w}
  return kernel, bias, kept.reshape(mask.shape), new.reshape(mask.shape), update, w_next


@pytest.fixture(scope="module")
def fedspa_linear(one_client):
  data, x, y = one_client
  model = fj.models.get("mlp", num_classes=C, hidden=())  # one Dense "head": kernel [D, C] masked, bias dense

  def run(regrow, server_lr=0.5):
    algo = fj.algorithms.get("fedspa", model=model, density=0.5, clients_per_round=1, local_steps=3,
                             local_epochs=None, batch_size=N, lr=LR, alpha=0.5, rounds=10, server_lr=server_lr,
                             regrow=regrow)
    state0 = algo.init(jax.random.key(1), data)
    w0 = f64(state0.server.params["head"])
    mask0 = np.asarray(algo.client_states(state0, data)["head"]["kernel"][0])
    state1, metrics = algo.round(copy(state0), data)
    mask1 = np.asarray(algo.client_states(state1, data)["head"]["kernel"][0])
    return algo, w0, mask0, state1, mask1, metrics

  return run, x, y


def test_fedspa_client_step_by_hand(fedspa_linear):
  run, x, y = fedspa_linear
  _, w0, mask0, state1, mask1, metrics = run("gradient", server_lr=0.5)
  assert mask0.sum() == 9  # round(0.5 * 18): one masked layer, so ERK gives it the overall density
  rate = 0.5 / 2 * (1 + math.cos(0.0))  # the cosine schedule at t = 0: alpha
  assert float(metrics["prune_rate"]) == pytest.approx(rate)
  _, _, kept, new, update, w_next = fedspa_round_by_hand(w0, mask0, x, y, steps=3, lr=LR, rate=rate, server_lr=0.5)
  assert kept.sum() == 9 - math.ceil(0.5 * 9)
  np.testing.assert_array_equal(mask1, new)
  assert int(mask1.sum()) == 9 and not np.array_equal(mask1, mask0)
  got = f64(state1.server.params["head"])
  # w1 = w0 - server_lr * U (one client: every aggregation of U is U itself); U is 0 off the mask.
  assert np.all(update["kernel"][~mask0] == 0) and np.any(update["kernel"] != 0)
  np.testing.assert_allclose(got["kernel"], w_next["kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["bias"], w_next["bias"], rtol=1e-5, atol=1e-6)
  # The other server steps would differ by far more than the tolerance.
  assert np.abs(w0["kernel"] - update["kernel"] - w_next["kernel"]).max() > 1e-3


def test_fedspa_regrowth_uses_the_gradient_at_the_trained_point(fedspa_linear, one_client):
  # The case the test above pins is one where the gradient at x0 picks other weights to grow than the gradient at
  # the trained point: regrowth by the gradient at x0 gives a different mask.
  run, x, y = fedspa_linear
  _, w0, mask0, _, mask1, _ = run("gradient", server_lr=0.5)
  kernel0 = np.where(mask0, w0["kernel"], 0.0)
  _, _, kept, new, _, _ = fedspa_round_by_hand(w0, mask0, x, y, steps=3, lr=LR, rate=0.5, server_lr=0.5)
  g0, _ = linear_grads(kernel0, w0["bias"], x, y)
  candidates = np.flatnonzero(~kept.ravel())
  at_x0 = kept.ravel().copy()
  at_x0[candidates[np.argsort(-np.abs(g0.ravel()[candidates]), kind="stable")[:5]]] = True
  assert not np.array_equal(at_x0.reshape(mask0.shape), new)
  np.testing.assert_array_equal(mask1, new)


def test_fedspa_random_regrowth_counts(fedspa_linear):
  run, x, y = fedspa_linear
  _, w0, mask0, state1, mask1, _ = run("random", server_lr=1.0)
  _, _, kept, _, _, w_next = fedspa_round_by_hand(w0, mask0, x, y, steps=3, lr=LR, rate=0.5, server_lr=1.0)
  # Random regrowth: the kept weights stay, exactly ceil(0.5 * 9) = 5 are grown among the others, the count holds.
  assert np.all(mask1[kept])
  assert int((mask1 & ~kept).sum()) == 5 and int(mask1.sum()) == 9
  got = f64(state1.server.params["head"])
  np.testing.assert_allclose(got["kernel"], w_next["kernel"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# ERK: a layer's density is proportional to (sum of its dims) / (product of its dims) (RigL, Evci et al. 2020).


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_erk_ratios_follow_the_formula(density):
  shapes = {"a": (20, 30), "b": (3, 3, 4, 8), "c": (50, 10), "d": (7,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  got = fj.masks.erk_densities(params, density)
  raw = {k: sum(s) / math.prod(s) for k, s in shapes.items() if len(s) >= 2}
  # With no layer capped at 1: eps * sum(raw_l * n_l) = density * sum(n_l).
  eps = density * sum(math.prod(shapes[k]) for k in raw) / sum(raw[k] * math.prod(shapes[k]) for k in raw)
  assert all(eps * r < 1 for r in raw.values())
  for k, r in raw.items():
    assert got[k] == pytest.approx(eps * r, rel=1e-9)
  # Ratios between layers: (20 + 30) / 600 against (3 + 3 + 4 + 8) / 288.
  assert got["a"] / got["b"] == pytest.approx((50 / 600) / (18 / 288), rel=1e-9)
  assert got["d"] == 1.0


def test_erk_caps_a_small_layer_at_one_and_rescales_the_rest():
  shapes = {"big": (100, 100), "mid": (40, 50), "small": (2, 3)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  got = fj.masks.erk_densities(params, 0.2)
  # raw: big 200/1e4 = 0.02, mid 90/2000 = 0.045, small 5/6. Uncapped eps = 0.2 * 12006 / (200 + 90 + 5) = 8.14,
  # which would give small 6.8 > 1: small becomes dense and the rest share 0.2 * 12006 - 6 = 2395.2 values.
  assert got["small"] == 1.0
  eps = (0.2 * 12006 - 6) / (200 + 90)
  assert got["big"] == pytest.approx(eps * 0.02, rel=1e-9)
  assert got["mid"] == pytest.approx(eps * 0.045, rel=1e-9)


def test_target_counts_are_rounded_by_hand():
  params = {"a": jnp.zeros((20, 30)), "b": jnp.zeros((3, 3)), "c": jnp.zeros((4,))}
  # 0.1249 * 600 = 74.94 rounds to 75 and 0.1234 * 600 = 74.04 to 74; 0.01 * 9 = 0.09 rounds to 0 but a layer keeps
  # at least 1; dense leaves: all.
  assert fj.masks.target_counts(params, {"a": 0.1249, "b": 0.01, "c": 1.0}) == {"a": 75, "b": 1, "c": 4}
  assert fj.masks.target_counts(params, {"a": 0.1234, "b": 0.01, "c": 1.0})["a"] == 74


# ---------------------------------------------------------------------------------------------------------------------
# Ditto: the personal model v takes steps v - lr (grad f(v) + lambda (v - w)) from the round's global model w.


def test_ditto_personal_steps_by_hand(one_client):
  data, x, y = one_client
  lam = 0.5
  model = fj.models.get("mlp", num_classes=C, hidden=())
  algo = fj.algorithms.get("ditto", model=model, ditto_lambda=lam, personal_epochs=2, clients_per_round=1,
                           local_epochs=1, batch_size=N, lr=LR, rounds=5)
  state = algo.init(jax.random.key(2), data)
  w = f64(state.server.params["head"])
  v = f64(jax.tree.map(lambda a: a[0], algo.client_states(state, data)["head"]))
  np.testing.assert_allclose(v["kernel"], w["kernel"])  # v starts at the initial model
  for _ in range(2):  # in round 2, v (trained twice in round 1) and w (one FedAvg step) differ
    state, _ = algo.round(state, data)
    for _ in range(2):  # personal_epochs=2 full-batch steps from the client's own v, pulled towards this round's w
      gk, gb = linear_grads(v["kernel"], v["bias"], x, y)
      v = {"kernel": v["kernel"] - LR * (gk + lam * (v["kernel"] - w["kernel"])),
           "bias": v["bias"] - LR * (gb + lam * (v["bias"] - w["bias"]))}
    gk, gb = linear_grads(w["kernel"], w["bias"], x, y)  # the global model: one FedAvg step (one full batch)
    w = {"kernel": w["kernel"] - LR * gk, "bias": w["bias"] - LR * gb}
    got = f64(jax.tree.map(lambda a: a[0], algo.client_states(state, data)["head"]))
    for k in ("kernel", "bias"):
      np.testing.assert_allclose(got[k], v[k], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(f64(state.server.params["head"])[k], w[k], rtol=1e-5, atol=1e-6)
  assert np.abs(v["kernel"] - w["kernel"]).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# FedRep: head epochs with the body frozen, then body epochs with the new head frozen; only the body is aggregated.


def mlp_grads(p, x, y):
  """Gradients of a Dense-ReLU-Dense network (flax names: Dense_0, head)."""
  h_pre = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = np.maximum(h_pre, 0.0)
  g = softmax_grad(h @ p["head"]["kernel"] + p["head"]["bias"], y)
  gh = (g @ p["head"]["kernel"].T) * (h_pre > 0)
  return {"Dense_0": {"kernel": x.T @ gh, "bias": gh.sum(0)}, "head": {"kernel": h.T @ g, "bias": g.sum(0)}}


def sgd(tree, grads, lr):
  return jax.tree.map(lambda a, g: a - lr * g, tree, grads)


def test_fedrep_head_then_body_by_hand(one_client):
  data, x, y = one_client
  model = fj.models.get("mlp", num_classes=C, hidden=(5,))
  algo = fj.algorithms.get("fedrep", model=model, head_epochs=1, clients_per_round=1, local_epochs=1, batch_size=N,
                           lr=LR, rounds=5, server_lr=0.5)
  state0 = algo.init(jax.random.key(3), data)
  p = f64(state0.server.params)
  p["head"] = f64(jax.tree.map(lambda a: a[0], algo.client_states(state0, data)["head"]))
  state1, _ = algo.round(copy(state0), data)
  head = sgd(p["head"], mlp_grads(p, x, y)["head"], LR)  # the head first, body frozen
  body = sgd(p["Dense_0"], mlp_grads({"Dense_0": p["Dense_0"], "head": head}, x, y)["Dense_0"], LR)  # then the body
  got_head = f64(jax.tree.map(lambda a: a[0], algo.client_states(state1, data)["head"]))
  got_body = f64(state1.server.params["Dense_0"])
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(got_head[k], head[k], rtol=1e-5, atol=1e-6)
    # Server: w - server_lr * (w - body').
    expected = p["Dense_0"][k] - 0.5 * (p["Dense_0"][k] - body[k])
    np.testing.assert_allclose(got_body[k], expected, rtol=1e-5, atol=1e-6)
  # The server's copy of the head does not move.
  np.testing.assert_array_equal(np.asarray(state1.server.params["head"]["kernel"]),
                                np.asarray(state0.server.params["head"]["kernel"]))


# ---------------------------------------------------------------------------------------------------------------------
# masked_mean, coordinate by coordinate.


def test_masked_mean_by_hand():
  updates = {"k": jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [100.0, 200.0, 300.0, 400.0]])}
  coverage = {"k": jnp.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]], bool)}
  weights = jnp.array([1.0, 3.0, 4.0])
  got = np.asarray(fj.server.aggregate_masked_mean(updates, coverage, weights)["k"])
  # coordinate 0: clients 0 and 1, (1*1 + 3*10) / 4; coordinate 1: client 0 alone, 2; coordinate 2: clients 1 and 2,
  # (3*30 + 4*300) / 7; coordinate 3: nobody, 0.
  np.testing.assert_allclose(got, [31 / 4, 2.0, 1290 / 7, 0.0], rtol=1e-6)
  # mean: every client over every coordinate, (1*u0 + 3*u1 + 4*u2) / 8.
  got = np.asarray(fj.server.aggregate_mean(updates, weights)["k"])
  np.testing.assert_allclose(got, [431 / 8, 862 / 8, 1293 / 8, 1724 / 8], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Accounting: bytes and FLOPs of a small MLP derived by hand.


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="head")(nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1)))))


def test_bytes_and_flops_of_a_small_model_by_hand():
  params = Tiny().init(jax.random.key(0), jnp.zeros((1, 10)))["params"]
  # Kernels [10, 16] (160) and [16, 4] (64), biases 16 and 4: 244 float32 values, 976 bytes dense.
  assert fj.accounting.dense_bytes(params) == 976
  densities = {"Dense_0": {"kernel": 0.25, "bias": 1.0}, "head": {"kernel": 0.5, "bias": 1.0}}
  # Active values: 40 of 160 and 32 of 64, biases dense: 40 + 32 + 16 + 4 = 92 values, 368 bytes. Masks: 160 entries
  # as a bitmap take 20 bytes, as an index list 40 x 1 byte (log2 160 < 8): 20; 64 entries: bitmap 8 < 32 x 1.
  assert fj.accounting.sparse_bytes(params, densities) == 368 + 20 + 8
  assert fj.accounting.mask_bytes(1000, 10) == 20  # 10 indices of 2 bytes (log2 1000 > 8) beat a 125-byte bitmap
  # Forward FLOPs per sample: 2 x 10 x 16 + 2 x 16 x 4 = 448; sparse: 0.25 x 320 + 0.5 x 128 = 144.
  cost = fj.models.flops.training_flops(Tiny(), (10,), densities, regrow_batch=8)
  assert cost.dense_per_sample == 3 * 448
  assert cost.per_sample == 3 * 144
  # Regrowth (RigL): per sample of its batch a sparse forward, a sparse backward to the activations and a dense
  # gradient to every weight.
  assert cost.regrow == 8 * (2 * 144 + 448)
