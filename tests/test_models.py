"""The model zoo: every registered model builds and runs, the known architectures have their
published parameter counts, BatchNorm statistics and dropout act in training mode only, every
Dense/Conv comes from ``models.layers``, and bad names and settings raise ValueError.

Big models cost nothing here: shapes come from ``jax.eval_shape(model.init)`` and the variables
of the forward checks are filled on the host (a real ``init`` compiles one random kernel per
parameter shape, tens of seconds for a ResNet-50 on this machine); forward passes use tiny
images, run eagerly so the primitives compiled for one model are reused by the next.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from nonuniform_jax.models import MODELS, get_model, layers
from nonuniform_jax.models.vit import POOLS

NUM_CLASSES = 7
# (classes, image side) of the traces of the registered models: those of the published parameter
# counts, so test_parameter_counts reuses the traces (the side only matters to the ViT position
# embeddings, tracing costs the same at any side).
TRACE_SETTINGS = {"resnet18": (1000, 16), "resnet50": (1000, 16), "vit_tiny": (1000, 224),
                  "vit_small": (1000, 224)}
HAS_BATCHNORM = {"cifar_resnet", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50",
                 "preact_resnet18", "wide_resnet", "wrn16_8", "wrn28_6", "wrn28_10", "wrn58_6",
                 "vgg16_bn", "pyramidnet110", "densenet100"}


def _images(side, batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, side, side, 3)), jnp.float32)


def _shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)


@functools.cache
def _registered_shapes(name, num_classes, side, kwargs=()):
  """Variable shapes of ``get_model(name, num_classes, **dict(kwargs))`` on [1, side, side, 3]."""
  return _shapes(get_model(name, num_classes, **dict(kwargs)), _images(side, batch=1))


def _num_params(shapes):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def _host_variables(shapes, seed=0):
  """Variables of the given shapes: kernels N(0, 1/fan_in), scales and running variances 1,
  biases and running means 0, other parameters (class token, position embeddings) N(0, 0.02²)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1]
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = np.ones(leaf.shape)
    elif name in ("bias", "mean"):
      value = np.zeros(leaf.shape)
    else:
      value = 0.02 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return unflatten_dict({path: fill(path, leaf) for path, leaf in flatten_dict(shapes).items()})


def _foreign_layers(fn):
  """Runs fn() and returns the paths of the Dense/Conv-like modules it called that are not
  ``models.layers`` ones (the Kronecker-factor captures would miss them), and how many distinct
  ``models.layers`` modules it called."""
  foreign, ours = set(), set()
  kinds = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Einsum,
           nn.MultiHeadDotProductAttention)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, kinds):
      (ours if isinstance(module, (layers.Dense, layers.Conv)) else foreign).add(
          (type(module).__name__, module.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    fn()
  return sorted(foreign), len(ours)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registered_model_traces(name):
  """init and apply of every preset, traced only: output shape and dtype in both modes, the
  batch_stats collection exactly for BatchNorm models, every Dense/Conv from models.layers and
  its K-FAC captures (training mode) shaped as its kernel: [b, locations, K (+1 with a bias)]."""
  num_classes, side = TRACE_SETTINGS.get(name, (10, 8))
  model = get_model(name, num_classes)
  x = _images(side, batch=1)
  shapes = _registered_shapes(name, num_classes, side)
  assert ("batch_stats" in shapes) == (name in HAS_BATCHNORM)
  eval_logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), shapes)
  assert eval_logits.shape == (1, num_classes) and eval_logits.dtype == jnp.float32

  outputs = []
  foreign, calls = _foreign_layers(lambda: outputs.append(jax.eval_shape(
      lambda v: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)},
                            mutable=["batch_stats", layers.KFAC, layers.PERTURBATIONS]),
      shapes)))
  assert not foreign, foreign
  logits, state = outputs[0]
  assert logits.shape == (1, num_classes) and logits.dtype == jnp.float32
  assert jax.tree.map(lambda s: s.shape, state.get("batch_stats")) == jax.tree.map(
      lambda s: s.shape, shapes.get("batch_stats"))
  params = flatten_dict(shapes["params"])
  captured = flatten_dict(state[layers.KFAC])
  assert len(captured) == len(flatten_dict(state[layers.PERTURBATIONS])) == calls >= 2
  for path, inputs in captured.items():
    layer = path[:-1]
    rows = int(np.prod(params[layer + ("kernel",)].shape[:-1])) + (layer + ("bias",) in params)
    assert inputs.shape[0] == 1 and inputs.shape[-1] == rows, (path, inputs.shape, rows)


# One small member of each family (and odd image sides where a shortcut must match a strided
# convolution), run for real: finite float32 logits that depend on the input, and in training
# mode on the batch statistics.
FAMILY_MEMBERS = [
    ("mlp", {}, 8), ("paper_mlp", {}, 8), ("cnn", {}, 8),
    ("cifar_resnet", {"depth": 8, "width": 4}, 9),
    ("cifar_resnet", {"depth": 8, "width": 4, "shortcut": "B"}, 9),
    ("resnet50", {"stage_sizes": (1, 1, 1, 1), "width": 4}, 16),
    ("preact_resnet18", {"stage_sizes": (1, 1, 1, 1), "width": 4}, 9),
    ("wide_resnet", {"depth": 10, "widen_factor": 1}, 9),
    ("vgg16_bn", {"stages": ((4, 4), (8,), (8,))}, 9),
    ("pyramidnet110", {"depth": 11, "alpha": 6}, 9),
    ("pyramidnet110", {"depth": 8, "alpha": 6, "bottleneck": False}, 9),
    ("densenet100", {"depth": 10, "growth_rate": 4}, 9),
    ("vit", {"hidden_size": 8, "depth": 2, "num_heads": 2, "mlp_dim": 16}, 8),
    ("vit", {"hidden_size": 8, "depth": 2, "num_heads": 2, "mlp_dim": 16, "pool": "gap"}, 8),
]


@pytest.mark.parametrize("name,kwargs,side", FAMILY_MEMBERS)
def test_family_member_forward(name, kwargs, side):
  model = get_model(name, NUM_CLASSES, **kwargs)
  x = _images(side)
  variables = _host_variables(_shapes(model, x))

  @jax.jit
  def forward(variables):  # one compilation for both modes
    train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(1)})
    return model.apply(variables, x, train=False), train_logits

  logits, train_logits = forward(variables)
  for y in (logits, train_logits):
    assert y.shape == (2, NUM_CLASSES) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
  assert not np.allclose(logits[0], logits[1], atol=1e-6)  # the input reaches the classifier
  if "batch_stats" in variables:
    assert not np.allclose(logits, train_logits, atol=1e-5)


# Published counts at 10 classes (CIFAR) or 1000 (ImageNet); the image size only matters for
# the ViT position embeddings.
PARAMETER_COUNTS = [
    # He et al. 2016, option A: 0.27M, 0.46M, 0.85M (exact counts of the reference code).
    ("resnet20", {}, 10, 8, 269_722),
    ("resnet32", {}, 10, 8, 464_154),
    ("resnet56", {}, 10, 8, 853_018),
    # Option B adds two 1×1 projections with BatchNorm: 16·32 + 32·64 + 2·(32 + 64).
    ("resnet20", {"shortcut": "B"}, 10, 8, 269_722 + 512 + 2_048 + 192),
    # torchvision resnet18 / resnet50.
    ("resnet18", {}, 1000, 16, 11_689_512),
    ("resnet50", {}, 1000, 16, 25_557_032),
    # kuangliu/pytorch-cifar PreActResNet18 (11,171,146) plus the final BatchNorm of He et al.
    ("preact_resnet18", {}, 10, 8, 11_171_146 + 2 * 512),
    # Zagoruyko & Komodakis: WRN-28-10 36.5M, WRN-16-8 11.0M.
    ("wrn28_10", {}, 10, 8, 36_479_194),
    ("wrn16_8", {}, 10, 8, 10_961_370),
    # kuangliu VGG('VGG16') (14,728,266) less its 4,224 convolution biases (BatchNorm follows).
    ("vgg16_bn", {}, 10, 8, 14_728_266 - 4_224),
    # osmr/imgclsmob, whose PyramidNets are the reference code's: pyramidnet110_a48_cifar10
    # (basic units; Han et al.: 1.7M) and densenet100_k12_bc_cifar10 (Huang et al.: 0.8M).
    ("pyramidnet110", {"bottleneck": False}, 10, 8, 1_772_706),
    ("densenet100", {}, 10, 8, 769_162),
    # timm vit_small_patch16_224 / vit_tiny_patch16_224 (22.05M / 5.72M).
    ("vit_small", {}, 1000, 224, 22_050_664),
    ("vit_tiny", {}, 1000, 224, 5_717_416),
]


@pytest.mark.parametrize("name,kwargs,num_classes,side,expected", PARAMETER_COUNTS)
def test_parameter_counts(name, kwargs, num_classes, side, expected):
  assert _num_params(_registered_shapes(name, num_classes, side, tuple(kwargs.items()))) == expected


def test_cnn_convolves_one_dimensional_signals_along_their_length():
  """MNIST-1D's [batch, 40] signals get a channel axis and 1-D convolutions (kernel 3, pooling
  2): the laptop study's CNN has 3·16 + 16, 3·16·32 + 32, (10·32)·64 + 64 and 64·10 + 10
  parameters in its four layers."""
  model = get_model("cnn", 10, channels=(16, 32), hidden=64)
  shapes = _shapes(model, jnp.zeros((1, 40), jnp.float32))
  assert _num_params(shapes) == 64 + 1_568 + 20_544 + 650 == 22_826
  assert shapes["params"]["Conv_0"]["kernel"].shape == (3, 1, 16)


def test_batch_stats_update_in_training_mode_only():
  model = get_model("cifar_resnet", NUM_CLASSES, depth=8, width=4)
  x = _images(9, batch=4)
  variables = _host_variables(_shapes(model, x))
  _, train_updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  _, eval_updated = model.apply(variables, x, train=False, mutable=["batch_stats"])
  before = jax.tree.leaves(variables["batch_stats"])
  changed = [not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(train_updated))]
  assert all(changed)
  for a, b in zip(before, jax.tree.leaves(eval_updated)):
    np.testing.assert_array_equal(a, b)
  # The running mean moves 10% of the way from 0 to the batch mean (momentum 0.9).
  stem = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
  features = stem.apply({"params": {"kernel": variables["params"]["Conv_0"]["kernel"]}}, x)
  np.testing.assert_allclose(train_updated["batch_stats"]["BatchNorm_0"]["mean"],
                             0.1 * features.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", [
    ("wide_resnet", {"depth": 10, "widen_factor": 1, "dropout_rate": 0.5}),
    ("vit", {"hidden_size": 8, "depth": 1, "num_heads": 2, "mlp_dim": 16, "dropout_rate": 0.3,
             "attention_dropout_rate": 0.3}),
])
def test_dropout_in_training_mode_only(name, kwargs):
  model = get_model(name, NUM_CLASSES, **kwargs)
  x = _images(9 if name == "wide_resnet" else 8)
  variables = _host_variables(_shapes(model, x))

  @jax.jit
  def train(key):
    return model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]

  # rbg keys compile faster than threefry ones; what is tested does not depend on the generator.
  key = functools.partial(jax.random.key, impl="rbg")
  np.testing.assert_array_equal(train(key(1)), train(key(1)))
  assert not np.allclose(train(key(1)), train(key(2)))
  evaluated = model.apply(variables, x, train=False)  # needs no rng
  np.testing.assert_array_equal(evaluated, model.apply(variables, x, train=False,
                                                       rngs={"dropout": key(3)}))
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(variables, x, train=True, mutable=["batch_stats"])


def test_vit_pooling_and_patch_size():
  x = _images(8)
  for pool in POOLS:
    model = get_model("vit", 3, patch_size=4, hidden_size=8, depth=1, num_heads=2, mlp_dim=16,
                      pool=pool)
    params = _shapes(model, x)["params"]
    assert ("cls" in params) == (pool == "token")
    assert params["pos_embedding"].shape == (1, 4 + (pool == "token"), 8)  # (8/4)² patches
  with pytest.raises(ValueError, match="patch_size 3"):
    _shapes(get_model("vit", 3, patch_size=3), x)


@pytest.mark.parametrize("call,match", [
    (lambda: get_model("resnet21", 10), "unknown model 'resnet21'.*resnet20"),
    (lambda: get_model("resnet20", 10, widen_factor=2), "no argument 'widen_factor'.*depth"),
    (lambda: get_model("wrn28_10", 10, depth=27), "depth 27"),
    (lambda: get_model("wide_resnet", 10, depth=6), "depth 6"),
    (lambda: get_model("cifar_resnet", 10, depth=21), "depth 21"),
    (lambda: get_model("resnet20", 10, shortcut="C"), "shortcut 'C'.*'A'"),
    (lambda: get_model("pyramidnet110", 10, depth=29, bottleneck=False), "depth 29.*6n\\+2"),
    (lambda: get_model("pyramidnet110", 10, depth=21), "depth 21.*9n\\+2"),
    (lambda: get_model("densenet100", 10, depth=101), "depth 101"),
    (lambda: get_model("vit", 10, pool="max"), "pool 'max'.*'gap'"),
    (lambda: get_model("vit", 10, hidden_size=10, num_heads=3), "hidden_size 10"),
])
def test_bad_names_and_settings_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
