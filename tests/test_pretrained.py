"""Published checkpoints into the project's models (models/pretrained.py), on checkpoints written
here in the published layouts (tests/pretrained_reference.py): the loaded model computes what
the raw arrays compute, the classifier is the model's own, position embeddings are resized by
hand-checked bilinear interpolation, the ViT's input range is re-expressed exactly, every
mismatch is one line naming it, and a run starts from the weights (refused before it writes)."""

import os
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from nonuniform_jax import measure, plan as plan_lib, train
from nonuniform_jax.models import get_model, pretrained
from tests import pretrained_reference as ref

TINY_VIT = {"patch_size": 4, "hidden_size": 8, "depth": 2, "num_heads": 2, "mlp_dim": 16}
TINY_RESNET = {"stage_sizes": (1, 1, 1, 1), "width": 4}
CLASSES = 7


def _write(tmp_path, arrays, name="checkpoint.npz"):
  path = str(tmp_path / name)
  np.savez(path, **arrays)
  return path


def _loaded(path, name, model, side, channels=3, normalization=None, seed=0):
  """The model's variables initialised with ``seed`` and the checkpoint merged over them, and
  the initialisation alone."""
  x = jnp.zeros((1, side, side, channels))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  init = model.init(jax.random.key(seed), x)
  loaded = pretrained.load(path, name, model, shapes, normalization)
  return pretrained.merge(init, loaded), init


def _pixels(side, channels=3, batch=3, seed=1):
  return np.random.default_rng(seed).uniform(size=(batch, side, side, channels))


def _logits(features, variables, head="head"):
  params = variables["params"][head]
  return features @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"])


@pytest.mark.parametrize("layout", ["augreg", "augreg_pre_logits", "big_vision",
                                    "big_vision_scan"])
def test_vit_forward_equals_the_raw_arrays(layout, tmp_path):
  """Every array lands where the original network uses it: the loaded model's logits are the
  reference ViT's features (computed from the AugReg arrays) through the model's own head."""
  ck = ref.augreg_vit(classes=5, grid=2, pre_logits=layout == "augreg_pre_logits")
  arrays = {"big_vision": lambda: ref.big_vision_vit(ck),
            "big_vision_scan": lambda: ref.big_vision_vit(ck, scan=True, prefix="params/")
            }.get(layout, lambda: ck)()
  path = _write(tmp_path, arrays)
  model = get_model("vit", CLASSES, **TINY_VIT)
  variables, init = _loaded(path, "vit", model, 8)
  images = 2 * _pixels(8) - 1
  np.testing.assert_allclose(model.apply(variables, images),
                             _logits(ref.vit_features(ck, images), variables), atol=2e-5)
  # The classifier is the model's own initialisation, for the new number of classes.
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(variables["params"]["head"][leaf], init["params"]["head"][leaf])
  assert variables["params"]["head"]["kernel"].shape == (8, CLASSES)


@pytest.mark.parametrize("bottleneck", [True, False])
def test_resnet_forward_equals_the_raw_arrays(bottleneck, tmp_path):
  """torchvision's state_dict layout: the loaded network in evaluation mode (running
  statistics loaded too) computes torchvision's ResNet of the raw arrays; fc is replaced."""
  sd = ref.torchvision_resnet(bottleneck=bottleneck, classes=5)
  path = _write(tmp_path, sd)
  name = "resnet50" if bottleneck else "resnet18"
  model = get_model(name, CLASSES, **TINY_RESNET)
  variables, init = _loaded(path, name, model, 32)
  images = np.random.default_rng(2).normal(size=(2, 32, 32, 3))
  np.testing.assert_allclose(model.apply(variables, images, train=False),
                             _logits(ref.resnet_features(sd, images), variables, "Dense_0"),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(variables["params"]["Dense_0"]["kernel"],
                                init["params"]["Dense_0"]["kernel"])
  # Spot checks of the mapping, written out by hand.
  np.testing.assert_array_equal(variables["params"]["Conv_0"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["stage2_block0"]["shortcut_bn"]["var"],
                                sd["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(variables["params"]["stage4_block0"]["BatchNorm_1"]["scale"],
                                sd["layer4.0.bn2.weight"])


def test_position_embeddings_resized_bilinearly_class_token_kept(tmp_path):
  """A 2×2 grid to 3×3 (hand-computed: corners kept, edge midpoints and centre averaged), 3×3
  to 2×2 (the corners), and big_vision's embeddings without a class-token row (the token's row
  is then zero: big_vision adds no position to it)."""
  ck = ref.augreg_vit(grid=2, depth=1)
  pos = ck["Transformer/posembed_input/pos_embedding"]
  cls_row, g = pos[0, 0], pos[0, 1:].reshape(2, 2, -1)
  model3 = get_model("vit", CLASSES, **{**TINY_VIT, "depth": 1})
  variables, _ = _loaded(_write(tmp_path, ck), "vit", model3, 12)
  resized = np.asarray(variables["params"]["pos_embedding"])
  assert resized.shape == (1, 10, 8)
  a, b, c, d = g[0, 0], g[0, 1], g[1, 0], g[1, 1]
  expected = np.stack([a, (a + b) / 2, b,
                       (a + c) / 2, (a + b + c + d) / 4, (b + d) / 2,
                       c, (c + d) / 2, d])
  np.testing.assert_array_equal(resized[0, 0], cls_row)
  np.testing.assert_allclose(resized[0, 1:], expected, rtol=1e-6, atol=1e-7)

  big = ref.augreg_vit(grid=3, depth=1)
  variables, _ = _loaded(_write(tmp_path, big, "big.npz"), "vit", model3, 8)
  grid3 = big["Transformer/posembed_input/pos_embedding"][0, 1:].reshape(3, 3, -1)
  np.testing.assert_allclose(variables["params"]["pos_embedding"][0, 1:],
                             grid3[::2, ::2].reshape(4, -1), rtol=1e-6)

  bv = ref.big_vision_vit(ck)
  variables, _ = _loaded(_write(tmp_path, bv, "bv.npz"), "vit", model3, 12)
  np.testing.assert_array_equal(variables["params"]["pos_embedding"][0, 0], 0.0)
  np.testing.assert_allclose(variables["params"]["pos_embedding"][0, 1:], expected, rtol=1e-6,
                             atol=1e-7)
  note = pretrained.check(_write(tmp_path, ck, "note.npz"), "vit", model3,
                          jax.eval_shape(model3.init, jax.random.key(0), jnp.zeros((1, 12, 12, 3))))
  assert note == ("augreg layout, position embeddings 2×2 resized to 3×3, new classifier (head "
                  "dropped)")


def test_input_normalization_reexpressed_exactly(tmp_path):
  """A run normalising by (pixel − mean_c)/std_c gets the logits the checkpoint gives on pixels
  in [-1, 1], also through the model's on-device resize (bilinear commutes with it)."""
  ck = ref.augreg_vit(grid=2)
  path = _write(tmp_path, ck)
  mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
  pixels = _pixels(8)
  for side, kwargs in ((8, {}), (6, {"resize": 8})):
    model = get_model("vit", CLASSES, **TINY_VIT, **kwargs)
    u = pixels if side == 8 else _pixels(side)
    variables, _ = _loaded(path, "vit", model, side, normalization=(mean, std))
    reference_input = 2 * u - 1
    if side != 8:
      reference_input = np.asarray(jax.image.resize(reference_input, (3, 8, 8, 3), "bilinear"))
    np.testing.assert_allclose(model.apply(variables, (u - mean) / std),
                               _logits(ref.vit_features(ck, reference_input), variables),
                               atol=5e-5)


def _headers_only(path, arrays):
  """An .npz whose members hold the array headers and no data: what the check reads."""
  with zipfile.ZipFile(path, "w") as archive:
    for key, value in arrays.items():
      with archive.open(key + ".npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(value))
  return str(path)


@pytest.mark.parametrize("name,arrays,side", [
    # AugReg ImageNet-21k ViT-Ti/16, S/16, B/16 (21843 classes, 224 px), at 224 and 384 px.
    ("vit_tiny", dict(hidden=192, depth=12, heads=3, mlp=768), 224),
    ("vit_small", dict(hidden=384, depth=12, heads=6, mlp=1536), 384),
    ("vit_base", dict(hidden=768, depth=12, heads=12, mlp=3072), 224),
    # The original ImageNet-21k ViT-B/16 had a representation layer (pre_logits), dropped.
    ("vit_base", dict(hidden=768, depth=12, heads=12, mlp=3072, pre_logits=True), 224),
    # torchvision resnet50 and resnet18 (1000 classes).
    ("resnet50", dict(layers=(3, 4, 6, 3)), 224),
    ("resnet18", dict(layers=(2, 2, 2, 2), bottleneck=False), 224),
])
def test_published_sizes_fit_the_presets(name, arrays, side, tmp_path):
  if name.startswith("vit"):
    ck = ref.augreg_vit(patch=16, grid=14, classes=21843, zeros=True, **arrays)
    big_vision = _headers_only(tmp_path / "bv.npz", ref.big_vision_vit(ck, scan=True))
  else:
    ck = ref.torchvision_resnet(width=64, classes=1000, zeros=True, **arrays)
    big_vision = None
  model = get_model(name, 100)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  grid = f", position embeddings 14×14 resized to {side // 16}×{side // 16}" if side != 224 else (
      ", position embeddings 14×14")
  expected = ("torchvision layout, new classifier (fc dropped)" if big_vision is None else
              f"augreg layout{grid}, new classifier (head dropped)")
  assert pretrained.check(_headers_only(tmp_path / "ck.npz", ck), name, model, shapes) == expected
  if big_vision:
    assert pretrained.check(big_vision, name, model, shapes).startswith("big_vision layout")


def _drop(ck, key):
  return {k: v for k, v in ck.items() if k != key}


MISMATCHES = [
    # (model, its kwargs, checkpoint, message)
    ("vit", {}, lambda: _drop(ref.augreg_vit(), "Transformer/encoderblock_1/LayerNorm_2/scale"),
     "\\(augreg layout\\) does not fit model 'vit': Transformer/encoderblock_1/LayerNorm_2/scale "
     "is missing \\(the model's params encoderblock_1/LayerNorm_1/scale\\)$"),
    ("vit", {}, lambda: ref.augreg_vit(depth=3),
     "Transformer/encoderblock_2/LayerNorm_0/scale \\(8,\\) has no place in the model "
     "\\(and 15 more\\)$"),
    ("vit", {}, lambda: ref.augreg_vit(heads=4),
     "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel has shape "
     "\\(8, 4, 2\\); the model's encoderblock_0/MultiHeadDotProductAttention_0/query/kernel "
     "needs \\(8, 2, 4\\)"),
    ("vit", {"hidden_size": 16}, lambda: ref.augreg_vit(),
     "embedding/kernel has shape \\(4, 4, 3, 8\\); the model's embedding/kernel needs "
     "\\(4, 4, 3, 16\\)"),
    ("vit", {}, lambda: {**ref.augreg_vit(),
                         "Transformer/posembed_input/pos_embedding": np.zeros((1, 7, 8))},
     "pos_embedding \\(1, 7, 8\\) needs \\(1, g² or 1 \\+ g², 8\\) for a square grid"),
    ("vit", {"pool": "gap"}, lambda: ref.augreg_vit(),
     "pos_embedding \\(1, 5, 8\\) has a class-token entry, and the model \\(pool 'gap'\\) has "
     "no class token"),
    ("resnet50", {}, lambda: ref.torchvision_resnet(width=8),
     "\\(torchvision layout\\) does not fit model 'resnet50': conv1.weight has shape "
     "\\(8, 3, 7, 7\\); the model's Conv_0/kernel needs \\(4, 3, 7, 7\\)"),
    ("resnet50", {}, lambda: _drop(ref.torchvision_resnet(), "layer2.0.downsample.1.running_var"),
     "layer2.0.downsample.1.running_var is missing \\(the model's batch_stats "
     "stage2_block0/shortcut_bn/var\\)$"),
    ("vit", {}, lambda: {"conv.weight": np.zeros(3)},
     "layout not recognised \\(keys such as conv.weight\\)"),
    ("vit", {}, ref.torchvision_resnet,
     "is a 'torchvision' checkpoint, which does not load into model 'vit'; checkpoints load "
     "into the ViTs \\[.*'vit_small'"),
    ("resnet50", {}, ref.augreg_vit, "is a 'augreg' checkpoint, which does not load"),
    ("wide_resnet", {"depth": 10, "widen_factor": 1}, ref.augreg_vit,
     "model 'wide_resnet' loads no published checkpoint; checkpoints load into the ViTs"),
]


@pytest.mark.parametrize("name,kwargs,arrays,message", MISMATCHES)
def test_mismatches_named_in_one_line(name, kwargs, arrays, message, tmp_path):
  path = _write(tmp_path, arrays())
  model = get_model(name, CLASSES, **({**TINY_VIT, **kwargs} if name == "vit" else
                                      {**TINY_RESNET, **kwargs} if name == "resnet50" else kwargs))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  for call in (lambda: pretrained.check(path, name, model, shapes),
               lambda: pretrained.load(path, name, model, shapes)):
    with pytest.raises(ValueError, match=message) as info:
      call()
    assert "\n" not in str(info.value)


def test_unreadable_files_named_in_one_line(tmp_path):
  model = get_model("vit", CLASSES, **TINY_VIT)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  (tmp_path / "text.npz").write_text("not an archive")
  np.savez(tmp_path / "pickle.npz", a=np.array([{}], dtype=object))
  with zipfile.ZipFile(tmp_path / "garbage.npz", "w") as archive:
    archive.writestr("a.npy", b"garbage")
  for path, message in ((tmp_path / "absent.npz", "absent.npz': no such file"),
                        (tmp_path / "garbage.npz", "member 'a.npy' is not a numpy array"),
                        (tmp_path / "text.npz", "is not an .npz archive of arrays \\(BadZipFile\\)"
                                                "; a PyTorch .pth converts with np.savez"),
                        (tmp_path, "is not an .npz archive"),
                        (tmp_path / "pickle.npz", "array 'a' holds Python objects")):
    with pytest.raises(ValueError, match=message) as info:
      pretrained.check(str(path), "vit", model, shapes)
    assert "\n" not in str(info.value)


def _digits_vit_config(path, **overrides):
  c = default.get_config()
  c.dataset = "digits"
  c.model = ml_collections.ConfigDict({"name": "vit", "patch_size": 4, "hidden_size": 8,
                                       "depth": 1, "num_heads": 2, "mlp_dim": 16,
                                       "pretrained": path})
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 2, 2
  c.batch_size, c.train_eval_examples, c.progress = 16, 64, False
  for key, value in overrides.items():
    c[key] = value
  return c


def test_a_run_starts_from_the_checkpoint(tmp_path, capsys):
  """On the offline digits (8×8×1): the plan checks the file, the initial state holds the
  checkpoint (grid 4×4 resized to the run's 2×2, the embedding re-expressed for the digits'
  normalisation) and a fresh head drawn from the run's seed; the run says so, records it, and
  the measure command afterwards needs the weights from the run's checkpoint only."""
  ck = ref.augreg_vit(depth=1, grid=4, channels=1, classes=1000)
  path = _write(tmp_path, ck)
  config = _digits_vit_config(path)
  plan = plan_lib.read(config)
  note = "augreg layout, position embeddings 4×4 resized to 2×2, new classifier (head dropped)"
  assert plan.model.pretrained == path and plan.model.pretrained_note == note
  run = train.build(plan)
  params = jax.device_get(run.state.params)
  model = plan.model.build(10)
  norm = run.datasets.info["normalization"]
  expected, init = _loaded(path, "vit", model, 8, channels=1, seed=config.seed,
                           normalization=(norm["mean"], norm["std"]))
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(expected["params"]))
  np.testing.assert_array_equal(params["head"]["kernel"], init["params"]["head"]["kernel"])
  assert not np.allclose(params["embedding"]["kernel"], ck["embedding/kernel"])  # re-expressed

  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["status"] == "completed" and summary["settings"]["pretrained"] == note
  assert f"vit (890 parameters from {path} ({note}))" in capsys.readouterr().out
  os.remove(path)
  results = measure.measure(workdir, ["sam_sharpness"], num_examples=16, batch_size=8)
  assert np.isfinite(results["sam_sharpness"]["loss"])


def test_a_run_refuses_a_checkpoint_that_does_not_fit_before_writing(tmp_path):
  path = _write(tmp_path, ref.augreg_vit(depth=2, channels=1))
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="Transformer/encoderblock_1/LayerNorm_0/scale \\(8,\\) "
                                       "has no place in the model"):
    train.train_and_evaluate(_digits_vit_config(path), str(workdir))
  assert not workdir.exists() or not os.listdir(workdir)
  with pytest.raises(ValueError, match="no such file"):
    plan_lib.read(_digits_vit_config(str(tmp_path / "absent.npz")))
