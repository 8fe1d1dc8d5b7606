"""Models: registry, shapes and parameter counts, the im2col convolution against XLA's, FLOPs, vmap over clients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedspa_jax import models
from fedspa_jax.models import conv as conv_lib
from fedspa_jax.models import flops

DN = ("NHWC", "HWIO", "NHWC")

# name -> (sample shape, parameter count for 10 classes)
EXPECTED = {
    "mlp": ((28, 28, 1), 28 * 28 * 64 + 64 + 64 * 10 + 10),
    "lenet5": ((28, 28, 1), 61_706),
    "cnn": ((28, 28, 1), 582_026),
    "cifar_cnn": ((32, 32, 3), 307_842),
    "vgg11": ((32, 32, 3), 9_750_922),
    "resnet18": ((32, 32, 3), 11_173_962),
}
CONV_MODELS = ["lenet5", "cnn", "cifar_cnn", "vgg11", "resnet18"]


def count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@functools.lru_cache(maxsize=None)
def abstract_params(name: str, sample_shape=None, **kw):
  model = models.get(name, 10, **kw)
  shape = sample_shape or EXPECTED[name][0]
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))


def random_params(name: str, clients: int, seed: int = 0):
  """Per-client params [clients, ...] drawn on the host (no init compile): kernels ~ N(0, 1/fan_in), 1-D ~ 1 +- 0.1."""
  rng = np.random.default_rng(seed)

  def draw(p):
    if p.ndim >= 2:
      fan_in = int(np.prod(p.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, fan_in**-0.5, (clients, *p.shape)), jnp.float32)
    return jnp.asarray(1.0 + 0.1 * rng.normal(size=(clients, *p.shape)), jnp.float32)

  return jax.tree.map(draw, abstract_params(name)["params"])


# ---------------------------------------------------------------------------------------------- registry, shapes


def test_registry_names():
  assert set(EXPECTED) <= set(models.names())
  with pytest.raises(ValueError, match="unknown model"):
    models.get("alexnet", 10)
  with pytest.raises(ValueError, match="num_classes"):
    models.get("lenet5", 1)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_count_and_output_shape(name):
  sample_shape, expected = EXPECTED[name]
  variables = abstract_params(name)
  assert set(variables) == {"params"}  # no batch statistics or other mutable collections
  assert count(variables["params"]) == expected
  model = models.get(name, 7)
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), jnp.zeros((1, *sample_shape))),
                                           jnp.zeros((3, *sample_shape))))
  assert out.shape == (3, 7) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_head_and_leaf_conventions(name):
  params = abstract_params(name)["params"]
  assert "head" in params and params["head"]["kernel"].shape[-1] == 10
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf_name = path[-1].key
    if leaf_name == "kernel":
      assert leaf.ndim >= 2
    else:
      assert leaf.ndim == 1, (path, leaf.shape)  # biases and norm scales stay dense under FedSpa


@pytest.mark.parametrize("name,shape", [("lenet5", (32, 32, 3)), ("cnn", (32, 32, 3)), ("cifar_cnn", (28, 28, 1)),
                                        ("vgg11", (28, 28, 1)), ("resnet18", (28, 28, 1))])
def test_models_accept_both_image_sizes(name, shape):
  model = models.get(name, 10)
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), jnp.zeros((1, *shape))),
                                           jnp.zeros((2, *shape))))
  assert out.shape == (2, 10)


def test_cnn_same_padding_is_the_fedavg_paper_count():
  assert count(abstract_params("cnn", padding="SAME")["params"]) == 1_663_370


def test_lenet5_cifar_count():
  assert count(abstract_params("lenet5", (32, 32, 3))["params"]) == 62_006


# ---------------------------------------------------------------------------------------------- convolution


def test_resolve_conv():
  assert conv_lib.resolve_conv("auto") == ("im2col" if jax.default_backend() == "cpu" else "xla")
  assert [conv_lib.resolve_conv("auto", p) for p in ("cpu", "cuda", "rocm", "tpu")] == ["im2col"] + ["xla"] * 3
  assert conv_lib.resolve_conv("xla", "cpu") == "xla" and conv_lib.resolve_conv("im2col", "tpu") == "im2col"
  for bad in (conv_lib.resolve_conv, conv_lib.conv_cls, lambda c: models.get("lenet5", 10, conv=c).init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1)))):
    with pytest.raises(ValueError, match="unknown conv"):
      bad("winograd")


def test_auto_conv_is_im2col_on_cpu_through_grad_and_vmap():
  """conv="auto" stages out both implementations and keeps im2col when lowered for CPU: per-client values and
  gradients under vmap are bitwise those of conv="im2col" (the program XLA compiles is the same)."""
  x = jax.random.normal(jax.random.key(0), (3, 4, 12, 12, 3))
  w = jax.random.normal(jax.random.key(1), (3, 5, 5, 3, 8))

  def loss(conv_fn, x, w):
    return jnp.sum(jnp.sin(conv_fn(x, w, (1, 1), "SAME", dimension_numbers=DN)))

  run = lambda conv_fn: jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, conv_fn), (0, 1))))(x, w)
  auto, im2col = run(conv_lib.conv_general_dilated_auto), run(conv_lib.conv_general_dilated_im2col)
  for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(im2col)):
    np.testing.assert_array_equal(a, b)
  # Both branches are in the program until it is lowered: a platform-dependent cond, one convolution inside.
  jaxpr = jax.make_jaxpr(functools.partial(loss, conv_lib.conv_general_dilated_auto))(x[0], w[0]).jaxpr
  (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert cond.params["branches_platforms"] == (("cpu",), None)
  names = [{e.primitive.name for e in branch.jaxpr.eqns} for branch in cond.params["branches"]]
  assert "conv_general_dilated" not in names[0] and "dot_general" in names[0]
  assert "conv_general_dilated" in names[1]
  assert conv_lib.conv_cls("auto") is conv_lib.AutoConv


def _conv_case(c_in, stride, padding, kernel=3, c_out=4, groups=1, size=9, batch=2, method="auto"):
  kx, kw = jax.random.split(jax.random.key(c_in * 100 + stride * 10 + kernel))
  x = jax.random.normal(kx, (batch, size, size, c_in))
  w = jax.random.normal(kw, (kernel, kernel, c_in // groups, c_out))
  strides = (stride, stride)

  def loss(conv_fn, x, w):
    y = conv_fn(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)
    return jnp.sum(jnp.sin(y)), y

  grad = lambda conv_fn: jax.jit(jax.grad(functools.partial(loss, conv_fn), (0, 1), has_aux=True))
  ref_grads, ref_y = grad(lax.conv_general_dilated)(x, w)
  grads, y = grad(functools.partial(conv_lib.conv_general_dilated_im2col, method=method))(x, w)
  scale = float(jnp.max(jnp.abs(ref_y)))
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6 * scale)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("method", ["patches", "rows"])
@pytest.mark.parametrize("c_in", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_im2col_matches_lax_conv(c_in, stride, padding, method):
  """Both CPU forms: full im2col patches, and row windows with a banded kernel."""
  _conv_case(c_in, stride, padding, kernel=5 if method == "rows" else 3, method=method)


@pytest.mark.parametrize("kwargs", [
    dict(c_in=8, stride=1, padding="SAME"),  # wide input: the one-concatenate path
    dict(c_in=16, stride=2, padding="VALID", kernel=5),
    dict(c_in=4, stride=2, padding="SAME", kernel=1),  # 1x1 projection shortcut
    dict(c_in=3, stride=1, padding=((2, 1), (0, 3)), kernel=5),  # explicit, asymmetric padding
    dict(c_in=4, stride=1, padding="SAME", groups=2),
    dict(c_in=2, stride=2, padding="SAME", size=10, kernel=4),  # even kernel: SAME pads asymmetrically
    dict(c_in=6, stride=1, padding="VALID", kernel=5, size=14, c_out=16, batch=32),  # LeNet's conv2: rows
    dict(c_in=16, stride=1, padding="SAME", kernel=1, method="rows"),
    dict(c_in=2, stride=3, padding="VALID", kernel=4, size=11, method="rows"),
])
def test_im2col_matches_lax_conv_more(kwargs):
  _conv_case(**kwargs)


def test_im2col_method_choice():
  """The cost model picks row windows for LeNet-5's small layers and full patches for wide ones."""
  prefer = conv_lib._prefer_rows  # (batch, H_out, W_out, W_pad, kw, C_out, stride)
  assert prefer(32, 28, 28, 32, 5, 6, 1) and prefer(32, 10, 10, 14, 5, 16, 1)  # LeNet-5 conv1, conv2
  assert not prefer(10, 8, 8, 12, 5, 64, 1)  # FedAvg CNN conv2
  assert not prefer(32, 32, 32, 34, 3, 64, 1)  # VGG-11 conv1
  with pytest.raises(ValueError, match="unknown method"):
    conv_lib.conv_general_dilated_im2col(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), (1, 1), "SAME",
                                         dimension_numbers=DN, method="fft")


def test_im2col_falls_back_for_dilation():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 2))
  got = conv_lib.conv_general_dilated_im2col(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
  want = lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_im2col_under_vmap_matches_lax_conv():
  """Per-client kernels: what a vmapped round does (a batched matmul for im2col, grouped conv for XLA)."""
  x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(1), (3, 5, 5, 3, 4))
  conv = lambda f: jax.vmap(lambda x, w: f(x, w, (1, 1), "SAME", dimension_numbers=DN))
  np.testing.assert_allclose(conv(conv_lib.conv_general_dilated_im2col)(x, w), conv(lax.conv_general_dilated)(x, w),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["lenet5", "cnn", "cifar_cnn"])
def test_model_logits_same_for_both_convs(name):
  sample_shape = EXPECTED[name][0]
  x = jax.random.normal(jax.random.key(1), (2, *sample_shape))
  fast, ref = models.get(name, 10, conv="im2col"), models.get(name, 10, conv="xla")
  params = {"params": jax.tree.map(lambda p: p[0], random_params(name, 1))}
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(lambda: ref.init(jax.random.key(0), x)))
  np.testing.assert_allclose(jax.jit(fast.apply)(params, x), jax.jit(ref.apply)(params, x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- FLOPs

# LeNet-5 on 28x28x1, counted by hand (2 FLOPs per multiply-add):
#   conv1: 28x28 outputs (input zero-padded by 2) x 5x5x1 window x 6 filters: 2*28*28*25*6   = 235,200
#   conv2: 10x10 outputs (14x14x6 after pooling, VALID) x 5x5x6 x 16:          2*10*10*150*16 = 480,000
#   fc1:   400 (5x5x16 after pooling) -> 120:                                  2*400*120      =  96,000
#   fc2:   120 -> 84:                                                          2*120*84       =  20,160
#   head:  84 -> 10:                                                           2*84*10        =   1,680
#   total forward                                                                             = 833,040
LENET5_HAND = {"conv1": 235_200, "conv2": 480_000, "fc1": 96_000, "fc2": 20_160, "head": 1_680}


def test_lenet5_forward_flops_match_hand_count():
  got = flops.forward_flops(models.get("lenet5", 10), (28, 28, 1))
  assert got == LENET5_HAND
  assert sum(got.values()) == 833_040


def test_lenet5_training_flops():
  model = models.get("lenet5", 10)
  dense = flops.training_flops(model, (28, 28, 1))
  assert dense.per_sample == dense.dense_per_sample == 3 * 833_040
  assert dense.regrow == 0
  # Per-leaf densities with the params' structure: kernels at 0.5 except the head at 1.0; biases 1.0.
  params = abstract_params("lenet5")["params"]
  densities = jax.tree_util.tree_map_with_path(
      lambda path, p: 1.0 if p.ndim < 2 or path[0].key == "head" else 0.5, params)
  sparse = flops.training_flops(model, (28, 28, 1), densities, regrow_batch=32)
  forward = 0.5 * (833_040 - 1_680) + 1_680
  assert sparse.per_sample == 3 * forward
  assert sparse.regrow == 32 * (2 * forward + 833_040)
  assert sparse.total(samples=100, mask_updates=1) == 100 * 3 * forward + sparse.regrow
  assert sparse.dense_total(100) == 100 * 3 * 833_040
  assert flops.training_flops(model, (28, 28, 1), 0.25).per_sample == 3 * 0.25 * 833_040


def test_flops_paths_line_up_with_params():
  """Each counted layer is a module in the params with a kernel; densities from the masks module fit."""
  from fedspa_jax import masks
  model = models.get("resnet18", 10)
  params = abstract_params("resnet18")["params"]
  per_layer = flops.forward_flops(model, (32, 32, 3))
  for path in per_layer:
    node = params
    for key in path.split("/"):
      node = node[key]
    assert "kernel" in node
  assert len(per_layer) == sum(1 for p in jax.tree.leaves(params) if p.ndim >= 2)
  assert abs(sum(per_layer.values()) - 1.1108e9) / 1.1108e9 < 1e-3  # ResNet-18 on CIFAR: 0.556 GMACs
  densities = masks.uniform_densities(params, 0.5)
  sparse = flops.sparse_forward_flops(model, (32, 32, 3), densities)
  assert sum(sparse.values()) == pytest.approx(0.5 * sum(per_layer.values()))


def test_conv_flops_count_groups_and_strides():
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME", feature_group_count=2, name="c")(x)
      return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))

  got = flops.forward_flops(Tiny(), (8, 8, 4))
  assert got == {"c": 2 * 4 * 4 * 3 * 3 * 2 * 8, "head": 2 * 128 * 10}


class Lowerings:
  """Counts the programs JAX lowers (each compiled or loaded from the persistent cache) inside the block."""

  def __enter__(self):
    self.count = 0
    self._listener = lambda event, duration, **kwargs: setattr(self, "count", self.count + (
        event == "/jax/core/compile/jaxpr_to_mlir_module_duration"))
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def test_counting_flops_runs_nothing_while_a_round_is_traced():
  # The algorithms count FLOPs from shapes while their round is traced. Nothing of it may run eagerly: each eager op
  # is a program of its own to compile (a ResNet-18 round took seconds longer to trace). Shapes met nowhere else in
  # the suite, so no program of them can be in this process's caches.
  import fedspa_jax as fj

  rng = np.random.default_rng(0)
  data = fj.data.from_arrays(rng.integers(0, 256, (21, 7, 17, 1), dtype=np.uint8), np.arange(21) % 7,
                             num_clients=3, partition="iid", seed=0, mean=(0.5,), std=(0.25,))
  for name, kwargs in (("fedspa", {"density": 0.5}), ("fedavg", {})):  # sparse and dense (DisPFL: as FedSpa)
    algo = fj.algorithms.get(name, model=models.get("mlp", 7, hidden=(13,)), clients_per_round=2, local_steps=1,
                             local_epochs=None, batch_size=2, lr=0.1, rounds=1, **kwargs)
    state = algo.init(jax.random.key(0), data)
    with Lowerings() as lowered:
      jax.jit(algo.round).trace(state, data)
      if name == "fedspa":  # the evaluation's count (forward FLOPs of the scored models) is the same for both
        jax.jit(functools.partial(algo.evaluate, finetune_epochs=1)).trace(state, data)
    assert lowered.count == 0, name


def test_an_algorithm_initializes_in_one_program():
  import fedspa_jax as fj

  rng = np.random.default_rng(0)
  data = fj.data.from_arrays(rng.integers(0, 256, (21, 9, 13, 1), dtype=np.uint8), np.arange(21) % 7,
                             num_clients=3, partition="iid", seed=0, mean=(0.5,), std=(0.25,))
  for name, kwargs in (("fedspa", {"density": 0.5}), ("ditto", {})):
    algo = fj.algorithms.get(name, model=models.get("mlp", 7, hidden=(11,)), clients_per_round=2, local_steps=1,
                             local_epochs=None, batch_size=2, lr=0.1, rounds=1, **kwargs)
    key = jax.random.key(0)
    with Lowerings() as lowered:
      state = algo.init(key, data)
    assert lowered.count == 1, name  # params, masks, server and client state: before, a program per op
    assert state.server.params["head"]["kernel"].shape == (11, 7)


# ---------------------------------------------------------------------------------------------- vmap over clients


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_backward_under_vmap_over_clients(name):
  """Per-client params and data: grads are finite and each client's equals its own unbatched computation."""
  sample_shape = EXPECTED[name][0]
  model = models.get(name, 10)
  x = jax.random.normal(jax.random.key(1), (2, 2, *sample_shape))
  y = jnp.array([[0, 1], [2, 3]])
  params = random_params(name, 2)

  def loss(p, x, y):
    logits = model.apply({"params": p}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  grad_fn = jax.jit(jax.vmap(jax.value_and_grad(loss)))
  values, grads = grad_fn(params, x, y)
  assert values.shape == (2,)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  if name in ("lenet5", "cnn"):  # the cheap ones: compare with client 1 alone
    one = jax.tree.map(lambda p: p[1], params)
    value1, grads1 = jax.jit(jax.value_and_grad(loss))(one, x[1], y[1])
    np.testing.assert_allclose(values[1], value1, rtol=1e-5)
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
      np.testing.assert_allclose(g[1], g1, rtol=1e-4, atol=1e-6)
