"""Published checkpoints loaded into this project's models, for transfer.

A checkpoint is an ``.npz`` archive of arrays under flat names (pickles are refused: reading one
could run code). Three layouts are read, recognised by their keys:

* ``augreg``: google-research/vision_transformer's ViTs, the AugReg checkpoints of Steiner et al.
  2021 (``gs://vit_models/augreg/*.npz``) and the original ones (``gs://vit_models/imagenet21k/``):
  ``cls`` [1, 1, D], ``embedding/{kernel,bias}`` (kernel [p, p, 3, D]),
  ``Transformer/posembed_input/pos_embedding`` [1, 1 + g², D] (the class token's entry first),
  for each block ``Transformer/encoderblock_i/`` ``LayerNorm_0``,
  ``MultiHeadDotProductAttention_1/{query,key,value}`` (kernel [D, heads, D/heads], bias
  [heads, D/heads]), ``MultiHeadDotProductAttention_1/out`` (kernel [heads, D/heads, D]),
  ``LayerNorm_2``, ``MlpBlock_3/Dense_{0,1}``; then ``Transformer/encoder_norm``, ``head`` and, in
  the older checkpoints, ``pre_logits``.
* ``big_vision``: big_vision's ViT (``big_vision/models/vit.py``, with learned position
  embeddings): the same arrays with the blocks' ``MultiHeadDotProductAttention_0``,
  ``LayerNorm_1`` and ``MlpBlock_0``, and the position embeddings at the top, ``pos_embedding``
  [1, g², D], added before the class token is prepended (this project's ViT adds them after, so
  the class token's entry is zero); the blocks may be stacked on a leading axis under
  ``Transformer/encoderblock/`` (``scan=True``) and every key may sit under ``params/``.
* ``torchvision``: torchvision's ResNet ``state_dict`` (ResNet-18/34/50/101/152, "v1.5" with the
  stride on the 3×3 convolution, as ``resnet.ResNet``) saved as ``.npz``: ``conv1.weight``
  [out, in, h, w], ``bn1.{weight,bias,running_mean,running_var}``, ``layer{s}.{b}.conv{k}.weight``,
  ``layer{s}.{b}.bn{k}.*``, ``layer{s}.{b}.downsample.{0,1}.*``, ``fc.{weight,bias}``;
  ``num_batches_tracked`` is ignored. A ``.pth`` converts with
  ``np.savez(path, **{k: v.numpy() for k, v in torch.load(pth).items()})``.

Loading gives every parameter and BatchNorm statistic of the model from the checkpoint except
the classifier, which keeps the model's own initialisation for the new number of classes (the
checkpoint's ``head`` and ``pre_logits``, or ``fc``, are dropped: vision_transformer's
"drop-head" fine-tuning). Position embeddings trained on another grid are resized bilinearly on
the grid, the class token's entry kept, as vision_transformer and big_vision do
(``scipy.ndimage.zoom`` of order 1: the corner embeddings stay in place). The ViT layouts were
trained on pixels scaled to [-1, 1]; a run that normalises channel c by (pixel − mean_c)/std_c
(pixels in [0, 1]) gets the patch embedding re-expressed for its inputs, exactly (the patches
do not overlap and the embedding has a bias): kernel_c · 2·std_c, and
bias + Σ kernel_c·(2·mean_c − 1).
torchvision's ResNets were trained with ImageNet's normalisation, which the ImageNet and
Food-101 pipelines use; they are loaded unchanged (a zero-padded convolution without bias has no
exact re-expression).

A checkpoint that does not fit — an array missing, one with no place in the model, a wrong
shape — is a one-line ValueError naming the first (in the archive's order, then the model's) by
its checkpoint key, the model's parameter and the shapes.
"""

import dataclasses
import math
import zipfile
from typing import Callable

import numpy as np
import scipy.ndimage
from flax.traverse_util import flatten_dict, unflatten_dict

from nonuniform_jax.models import resnet, vit

LAYOUTS = ("augreg", "big_vision", "torchvision")
# The ViT layouts' inputs: pixels in [0, 1] mapped to [-1, 1], as (mean, std) per channel.
VIT_INPUT_MEAN, VIT_INPUT_STD = 0.5, 0.5
# The model's names for a block's attention, second LayerNorm and MLP -> each layout's.
_VIT_BLOCK_NAMES = {
    "augreg": {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
               "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"},
    "big_vision": {},
}
_TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                 "var": "running_var"}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One variable of the model: where it is in the checkpoint and how it converts."""
  collection: str
  path: tuple                       # in the model's collection
  key: str                          # in the checkpoint
  shape: tuple | None               # the checkpoint's shape it needs (None: checked by ``fits``)
  convert: Callable = lambda a: a   # checkpoint array -> model array
  fits: Callable | None = None      # checkpoint shape -> problem text or None


class _Archive:
  """An .npz archive's arrays by key: shapes from the headers alone (nothing is read until
  ``arrays``), a ``params/`` or ``opt/target/`` prefix dropped, scanned ViT blocks unstacked."""

  def __init__(self, path: str):
    self.path = path
    stored = _headers(path)
    for prefix in ("params/", "opt/target/"):
      if any(k.startswith(prefix) for k in stored):
        stored = {k: s for k, s in stored.items() if k.startswith(prefix)}
        break
    else:
      prefix = ""
    self.shapes, self._source = {}, {}
    scanned = "Transformer/encoderblock/"
    for key, shape in stored.items():
      name = key[len(prefix):]
      if name.startswith(scanned) and shape:
        for i in range(shape[0]):
          self._add(f"Transformer/encoderblock_{i}/{name[len(scanned):]}", shape[1:], key, i)
      else:
        self._add(name, shape, key, None)

  def _add(self, name, shape, stored_key, index):
    self.shapes[name] = tuple(shape)
    self._source[name] = (stored_key, index)

  def arrays(self, names) -> dict:
    out, cache = {}, {}
    with np.load(self.path, allow_pickle=False) as z:
      for name in names:
        key, index = self._source[name]
        if key not in cache:
          cache[key] = z[key]
        out[name] = cache[key] if index is None else cache[key][index]
    return out


def _headers(path: str) -> dict:
  """{key: shape} of an .npz archive, from the array headers."""
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise ValueError(f"model.pretrained {path!r}: no such file; download the checkpoint (README, "
                     "\"Transfer from a pretrained checkpoint\") or set model.pretrained='' to "
                     "train from scratch") from None
  except (zipfile.BadZipFile, IsADirectoryError, OSError) as e:
    raise ValueError(f"model.pretrained {path!r} is not an .npz archive of arrays "
                     f"({type(e).__name__}); a PyTorch .pth converts with np.savez(path, "
                     "**{k: v.numpy() for k, v in torch.load(pth).items()})") from None
  shapes = {}
  with archive:
    for info in archive.infolist():
      if not info.filename.endswith(".npy"):
        continue
      with archive.open(info) as f:
        try:
          version = np.lib.format.read_magic(f)
          read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                  np.lib.format.read_array_header_2_0)
          shape, _, dtype = read(f)
        except ValueError as e:
          raise ValueError(f"model.pretrained {path!r}: member {info.filename!r} is not a numpy "
                           f"array ({str(e).splitlines()[0]})") from None
      if dtype.hasobject:
        raise ValueError(f"model.pretrained {path!r}: array {info.filename[:-4]!r} holds Python "
                         "objects (a pickle), which is not read; save plain numeric arrays")
      shapes[info.filename[:-4]] = tuple(shape)
  if not shapes:
    raise ValueError(f"model.pretrained {path!r} holds no arrays")
  return shapes


def _layout(keys) -> str | None:
  if "conv1.weight" in keys:
    return "torchvision"
  if "embedding/kernel" in keys:
    if "Transformer/posembed_input/pos_embedding" in keys or any(
        "/MultiHeadDotProductAttention_1/" in k for k in keys):
      return "augreg"
    return "big_vision"
  return None


def _ignored(layout: str, key: str) -> bool:
  """The classifier (replaced) and what is not a variable (PyTorch's batch counters)."""
  if layout == "torchvision":
    return key.startswith("fc.") or key.endswith(".num_batches_tracked")
  return key.startswith(("head/", "pre_logits/"))


def _grid(tokens: int) -> tuple[int, bool] | None:
  """(side g, class-token entry) of a position embedding of ``tokens`` = g² or 1 + g² rows."""
  for cls in (False, True):
    side = math.isqrt(tokens - cls)
    if side >= 1 and side * side == tokens - cls:
      return side, cls
  return None


def _posemb_entry(key: str, ours: tuple, token: bool) -> _Entry:
  """The position embeddings [1, (1 +) g², D]: any square grid fits; it is resized to the
  model's grid, the class token's entry kept (zero when the checkpoint has none)."""
  side = math.isqrt(ours[1] - token)

  def fits(theirs):
    grid = _grid(theirs[1]) if len(theirs) == 3 and theirs[0] == 1 else None
    if grid is None or theirs[2] != ours[2]:
      return f"needs (1, g² or 1 + g², {ours[2]}) for a square grid of side g"
    if grid[1] and not token:
      return "has a class-token entry, and the model (pool 'gap') has no class token"
    return None

  def convert(a):
    g, cls = _grid(a.shape[1])
    grid = a[0, int(cls):].reshape(g, g, -1)
    if g != side:
      grid = scipy.ndimage.zoom(grid, (side / g, side / g, 1), order=1)
    grid = grid.reshape(1, side * side, -1)
    if not token:
      return grid
    first = a[:, :1] if cls else np.zeros((1, 1, a.shape[2]), a.dtype)
    return np.concatenate([first, grid], axis=1)

  return _Entry("params", ("pos_embedding",), key, None, convert, fits)


def _vit_entries(model: vit.VisionTransformer, variables, layout: str) -> list[_Entry]:
  rename = _VIT_BLOCK_NAMES[layout]
  heads = model.num_heads
  entries = []
  for path, leaf in flatten_dict(variables["params"]).items():
    shape = tuple(leaf.shape)
    if path[0] == "head":
      continue
    if path == ("pos_embedding",):
      key = ("Transformer/posembed_input/pos_embedding" if layout == "augreg" else
             "pos_embedding")
      if math.isqrt(shape[1] - (model.pool == "token")) ** 2 != shape[1] - (model.pool == "token"):
        raise ValueError(f"model.pretrained: the model's {shape[1]} tokens are not a square grid "
                         "of patches; position embeddings resize on square grids only")
      entries.append(_posemb_entry(key, shape, model.pool == "token"))
      continue
    if path[0].startswith("encoderblock_") or path[0] == "encoder_norm":
      key = "/".join(("Transformer", path[0], *(rename.get(p, p) for p in path[1:])))
    else:
      key = "/".join(path)
    theirs = shape
    if len(path) == 4 and path[1] == "MultiHeadDotProductAttention_0":
      d = shape[-1]
      theirs = {("out", "kernel"): (heads, d // heads, d), ("out", "bias"): shape}.get(
          path[2:], (*shape[:-1], heads, d // heads))
    entries.append(_Entry("params", path, key, theirs, lambda a, s=shape: a.reshape(s)))
  return entries


def _torchvision_entries(variables) -> list[_Entry]:
  entries = []
  for collection in ("params", "batch_stats"):
    for path, leaf in flatten_dict(variables.get(collection, {})).items():
      shape = tuple(leaf.shape)
      if path[0] == "Dense_0":
        continue
      *modules, leaf_name = path
      prefix = ""
      if modules[0].startswith("stage"):
        stage, block = modules.pop(0)[len("stage"):].split("_block")
        prefix = f"layer{stage}.{block}."
      (module,) = modules
      if module.startswith("shortcut_"):
        name = "downsample.0" if module == "shortcut_conv" else "downsample.1"
      else:
        kind, index = module.rsplit("_", 1)
        name = f"{'conv' if kind == 'Conv' else 'bn'}{int(index) + 1}"
      key = f"{prefix}{name}.{_TORCH_LEAVES[leaf_name]}"
      if leaf_name == "kernel":   # [h, w, in, out] <- [out, in, h, w]
        entries.append(_Entry(collection, path, key, (shape[3], shape[2], shape[0], shape[1]),
                              lambda a: np.transpose(a, (2, 3, 1, 0))))
      else:
        entries.append(_Entry(collection, path, key, shape))
  return entries


def _loadable_models() -> str:
  from nonuniform_jax.models import MODELS  # pylint: disable=g-import-not-at-top
  vits = [n for n, (cls, _) in MODELS.items() if cls is vit.VisionTransformer]
  resnets = [n for n, (cls, _) in MODELS.items() if cls is resnet.ResNet]
  return (f"the ViTs {vits} (layouts 'augreg', 'big_vision') and the ImageNet ResNets "
          f"{resnets} (layout 'torchvision')")


def _match(path: str, name: str, model, variables) -> tuple[_Archive, str, list[_Entry]]:
  """The archive, its layout and the model's entries; ValueError (one line) on any mismatch."""
  family = ("vit" if isinstance(model, vit.VisionTransformer) else
            "resnet" if isinstance(model, resnet.ResNet) else None)
  if family is None:
    raise ValueError(f"model.pretrained: model {name!r} loads no published checkpoint; "
                     f"checkpoints load into {_loadable_models()}")
  archive = _Archive(path)
  layout = _layout(archive.shapes)
  if layout is None:
    some = ", ".join(list(archive.shapes)[:3])
    raise ValueError(f"model.pretrained {path!r}: layout not recognised (keys such as {some}); "
                     "readable: 'augreg' and 'big_vision' ViTs (embedding/kernel, ...), "
                     "'torchvision' ResNets (conv1.weight, ...)")
  if (layout == "torchvision") != (family == "resnet"):
    raise ValueError(f"model.pretrained {path!r} is a {layout!r} checkpoint, which does not load "
                     f"into model {name!r}; checkpoints load into {_loadable_models()}")
  entries = (_torchvision_entries(variables) if layout == "torchvision" else
             _vit_entries(model, variables, layout))
  by_key = {e.key: e for e in entries}
  problems = []
  for key, theirs in archive.shapes.items():
    if _ignored(layout, key):
      continue
    entry = by_key.get(key)
    if entry is None:
      problems.append(f"{key} {theirs} has no place in the model")
      continue
    ours = "/".join(entry.path)
    if entry.fits is not None:
      problem = entry.fits(theirs)
      if problem:
        problems.append(f"{key} {theirs} {problem} (the model's {ours})")
    elif theirs != entry.shape:
      problems.append(f"{key} has shape {theirs}; the model's {ours} needs {entry.shape}")
  problems += [f"{e.key} is missing (the model's {e.collection} {'/'.join(e.path)})"
               for e in entries if e.key not in archive.shapes]
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ValueError(f"model.pretrained {path!r} ({layout} layout) does not fit model {name!r}: "
                     f"{problems[0]}{more}")
  return archive, layout, entries


def check(path: str, name: str, model, variables) -> str:
  """Checks that the checkpoint at ``path`` loads into ``model`` (named ``name``) with
  ``variables`` (shapes suffice: ``jax.eval_shape(model.init, ...)``) from the array headers
  alone; raises a one-line ValueError otherwise. Returns what loading will do, in words."""
  archive, layout, entries = _match(path, name, model, variables)
  notes = [f"{layout} layout"]
  pos = next((e for e in entries if e.path == ("pos_embedding",)), None)
  if pos is not None:
    g = _grid(archive.shapes[pos.key][1])[0]
    side = math.isqrt(flatten_dict(variables["params"])[pos.path].shape[1] - (
        model.pool == "token"))
    notes.append(f"position embeddings {g}×{g}" + (f" resized to {side}×{side}" if g != side
                                                   else ""))
  head = "head" if layout != "torchvision" else "fc"
  notes.append(f"new classifier ({head} dropped)")
  return ", ".join(notes)


def load(path: str, name: str, model, variables, normalization=None) -> dict:
  """The model's variables from the checkpoint at ``path``, every one but the classifier:
  {collection: nested dict} of float32 numpy arrays, to be merged over an initialisation
  (``merge``). ``normalization``: the run's (mean, std), per channel or for all, on pixels in
  [0, 1], for which a ViT's patch embedding is re-expressed (module docstring); None leaves it
  as trained.
  Raises a one-line ValueError where ``check`` would."""
  archive, layout, entries = _match(path, name, model, variables)
  arrays = archive.arrays([e.key for e in entries])
  flat = {(e.collection, *e.path): np.asarray(e.convert(np.asarray(arrays[e.key], np.float32)))
          for e in entries}
  if layout != "torchvision" and normalization is not None:
    kernel, bias = ("params", "embedding", "kernel"), ("params", "embedding", "bias")
    channels = flat[kernel].shape[2]
    mean, std = (np.broadcast_to(np.asarray(v, np.float32), (channels,)) for v in normalization)
    scale, offset = std / VIT_INPUT_STD, (mean - VIT_INPUT_MEAN) / VIT_INPUT_STD
    flat[bias] = flat[bias] + np.einsum("ijcd,c->d", flat[kernel], offset)
    flat[kernel] = flat[kernel] * scale[:, None]
  return unflatten_dict(flat)


def merge(variables, loaded):
  """``variables`` with the loaded arrays in place of their own (works under ``jax.jit``)."""
  flat = flatten_dict(dict(variables))
  for path, value in flatten_dict(loaded).items():
    flat[path] = value
  return unflatten_dict(flat)
