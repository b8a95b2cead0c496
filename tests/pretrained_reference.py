"""Published checkpoint layouts written from scratch, and their networks computed from the raw
arrays: the oracle of tests/test_pretrained.py, written without the loader's code.

* ``augreg_vit``: random arrays under google-research/vision_transformer's keys and shapes
  (models_vit.py: ``Transformer/encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}``, ``Transformer/posembed_input/pos_embedding`` with the class
  token's row first, attention kernels [D, heads, D/heads]).
* ``big_vision_vit``: the same network in big_vision's layout (models/vit.py: blocks
  ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``; ``pos_embedding`` at the top
  without the class token's row, which big_vision adds before prepending the token, so the
  token carries its old row: what big_vision's ``fix_old_checkpoints`` does in reverse).
* ``torchvision_resnet``: random arrays under torchvision's ResNet ``state_dict`` keys and
  PyTorch shapes ([out, in, h, w] convolutions, [out, in] linear layers).
* ``vit_features`` and ``resnet_features``: the networks' features before the classifier,
  computed from those arrays with the original definitions in numpy (the convolutions through
  ``lax``): the ViT of vision_transformer with exact GELU, torchvision's ResNet v1.5 in
  evaluation mode.
"""

import math

import numpy as np
import scipy.special
from jax import lax


def augreg_vit(seed=0, *, hidden=8, depth=2, heads=2, mlp=16, patch=4, grid=2, channels=3,
               classes=5, token=True, pre_logits=False, zeros=False) -> dict:
  """``zeros``: every array zero (published sizes cost no time; only shapes matter then)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=0.3: (np.zeros(shape, np.float32) if zeros else
                                      (scale * rng.normal(size=shape)).astype(np.float32))
  d, k = hidden, hidden // heads
  ck = {"embedding/kernel": normal(patch, patch, channels, d),
        "embedding/bias": normal(d),
        "Transformer/posembed_input/pos_embedding": normal(1, grid * grid + token, d),
        "Transformer/encoder_norm/scale": 1 + normal(d), "Transformer/encoder_norm/bias": normal(d),
        "head/kernel": normal(d, classes), "head/bias": normal(classes)}
  if token:
    ck["cls"] = normal(1, 1, d)
  if pre_logits:
    ck["pre_logits/kernel"], ck["pre_logits/bias"] = normal(d, d), normal(d)
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    for norm in ("LayerNorm_0", "LayerNorm_2"):
      ck[b + norm + "/scale"], ck[b + norm + "/bias"] = 1 + normal(d), normal(d)
    for proj in ("query", "key", "value"):
      ck[b + f"MultiHeadDotProductAttention_1/{proj}/kernel"] = normal(d, heads, k)
      ck[b + f"MultiHeadDotProductAttention_1/{proj}/bias"] = normal(heads, k)
    ck[b + "MultiHeadDotProductAttention_1/out/kernel"] = normal(heads, k, d)
    ck[b + "MultiHeadDotProductAttention_1/out/bias"] = normal(d)
    mlp_block = b + "MlpBlock_3/"
    ck[mlp_block + "Dense_0/kernel"], ck[mlp_block + "Dense_0/bias"] = normal(d, mlp), normal(mlp)
    ck[mlp_block + "Dense_1/kernel"], ck[mlp_block + "Dense_1/bias"] = normal(mlp, d), normal(d)
  return ck


def big_vision_vit(augreg: dict, *, scan=False, prefix="") -> dict:
  """The network of ``augreg`` (with a class token) in big_vision's layout."""
  names = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
           "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  out = {}
  for key, value in augreg.items():
    if key == "Transformer/posembed_input/pos_embedding":
      out["pos_embedding"] = value[:, 1:]
      continue
    if key == "cls":
      value = value + augreg["Transformer/posembed_input/pos_embedding"][:, :1]
    parts = key.split("/")
    out["/".join(names.get(p, p) for p in parts)] = value
  if scan:
    blocks = sorted({k.split("/")[1] for k in out if k.startswith("Transformer/encoderblock_")},
                    key=lambda b: int(b.rsplit("_", 1)[1]))
    rests = {k.split("/", 2)[2] for k in out if k.startswith("Transformer/encoderblock_")}
    for rest in sorted(rests):
      out[f"Transformer/encoderblock/{rest}"] = np.stack(
          [out.pop(f"Transformer/{b}/{rest}") for b in blocks])
  return {prefix + k: v for k, v in out.items()}


def _layer_norm(x, ck, name):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * ck[name + "/scale"] + ck[name + "/bias"]


def vit_features(ck: dict, images: np.ndarray) -> np.ndarray:
  """[b, D]: the AugReg ViT of ``ck`` on ``images`` [b, h, w, c] (pixels in [-1, 1])."""
  ck = {k: np.asarray(v, np.float64) for k, v in ck.items()}
  x = np.asarray(images, np.float64)
  kernel = ck["embedding/kernel"]
  p, d = kernel.shape[0], kernel.shape[-1]
  b, h, w, c = x.shape
  patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  tokens = patches.reshape(b, -1, p * p * c) @ kernel.reshape(-1, d) + ck["embedding/bias"]
  token = "cls" in ck
  if token:
    tokens = np.concatenate([np.broadcast_to(ck["cls"], (b, 1, d)), tokens], axis=1)
  tokens = tokens + ck["Transformer/posembed_input/pos_embedding"]
  depth = len({k.split("/")[1] for k in ck if k.startswith("Transformer/encoderblock_")})
  for i in range(depth):
    pre = f"Transformer/encoderblock_{i}/"
    att = pre + "MultiHeadDotProductAttention_1/"
    y = _layer_norm(tokens, ck, pre + "LayerNorm_0")
    q, k, v = (np.einsum("bnd,dhk->bnhk", y, ck[att + n + "/kernel"]) + ck[att + n + "/bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", weights, v)
    tokens = tokens + np.einsum("bqhk,hkd->bqd", o, ck[att + "out/kernel"]) + ck[att + "out/bias"]
    y = _layer_norm(tokens, ck, pre + "LayerNorm_2")
    y = y @ ck[pre + "MlpBlock_3/Dense_0/kernel"] + ck[pre + "MlpBlock_3/Dense_0/bias"]
    y = 0.5 * y * (1 + scipy.special.erf(y / math.sqrt(2)))
    y = y @ ck[pre + "MlpBlock_3/Dense_1/kernel"] + ck[pre + "MlpBlock_3/Dense_1/bias"]
    tokens = tokens + y
  tokens = _layer_norm(tokens, ck, "Transformer/encoder_norm")
  return tokens[:, 0] if token else tokens.mean(axis=1)


def torchvision_resnet(seed=0, *, layers=(1, 1, 1, 1), width=4, bottleneck=True, classes=5,
                       channels=3, zeros=False) -> dict:
  """A torchvision ResNet ``state_dict`` (resnet50's keys with ``layers=(3, 4, 6, 3)``, width
  64); ``zeros``: the convolutions and fc zero (only shapes matter then)."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, out, inp, k):
    sd[name + ".weight"] = (np.zeros((out, inp, k, k), np.float32) if zeros else
                            (rng.normal(size=(out, inp, k, k)) / math.sqrt(inp * k * k)).astype(
                                np.float32))

  def bn(name, n):
    sd[name + ".weight"] = (1 + 0.2 * rng.normal(size=n)).astype(np.float32)
    sd[name + ".bias"] = (0.2 * rng.normal(size=n)).astype(np.float32)
    sd[name + ".running_mean"] = (0.2 * rng.normal(size=n)).astype(np.float32)
    sd[name + ".running_var"] = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    sd[name + ".num_batches_tracked"] = np.array(7, np.int64)

  conv("conv1", width, channels, 7)
  bn("bn1", width)
  inp = width
  expansion = 4 if bottleneck else 1
  for s, blocks in enumerate(layers):
    planes = width * 2 ** s
    for i in range(blocks):
      pre = f"layer{s + 1}.{i}."
      if bottleneck:
        conv(pre + "conv1", planes, inp, 1), bn(pre + "bn1", planes)
        conv(pre + "conv2", planes, planes, 3), bn(pre + "bn2", planes)
        conv(pre + "conv3", planes * 4, planes, 1), bn(pre + "bn3", planes * 4)
      else:
        conv(pre + "conv1", planes, inp, 3), bn(pre + "bn1", planes)
        conv(pre + "conv2", planes, planes, 3), bn(pre + "bn2", planes)
      if i == 0 and (s > 0 or inp != planes * expansion):
        conv(pre + "downsample.0", planes * expansion, inp, 1)
        bn(pre + "downsample.1", planes * expansion)
      inp = planes * expansion
  sd["fc.weight"] = (np.zeros((classes, inp)) if zeros else rng.normal(size=(classes, inp))
                    ).astype(np.float32)
  sd["fc.bias"] = rng.normal(size=classes).astype(np.float32)
  return sd


def resnet_features(sd: dict, images: np.ndarray) -> np.ndarray:
  """[b, C]: torchvision's ResNet of ``sd`` in evaluation mode on ``images`` [b, h, w, c],
  up to the global average pool (torchvision ``resnet.py``: the stride on conv2, 3×3 max-pool
  of stride 2 and padding 1, BatchNorm ε = 1e-5)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)        # NCHW, as PyTorch

  def conv(x, name, stride=1):
    w = sd[name + ".weight"]
    pad = w.shape[-1] // 2
    return np.asarray(lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                               dimension_numbers=("NCHW", "OIHW", "NCHW")))

  def bn(x, name):
    shape = (1, -1, 1, 1)
    return ((x - sd[name + ".running_mean"].reshape(shape))
            / np.sqrt(sd[name + ".running_var"].reshape(shape) + 1e-5)
            * sd[name + ".weight"].reshape(shape) + sd[name + ".bias"].reshape(shape))

  relu = lambda x: np.maximum(x, 0)
  x = relu(bn(conv(x, "conv1", 2), "bn1"))
  x = np.asarray(lax.reduce_window(x, -np.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                                   [(0, 0), (0, 0), (1, 1), (1, 1)]))
  bottleneck = "layer1.0.conv3.weight" in sd
  s = 1
  while f"layer{s}.0.conv1.weight" in sd:
    i = 0
    while f"layer{s}.{i}.conv1.weight" in sd:
      pre, stride = f"layer{s}.{i}.", 2 if s > 1 and i == 0 else 1
      if bottleneck:
        y = relu(bn(conv(x, pre + "conv1"), pre + "bn1"))
        y = relu(bn(conv(y, pre + "conv2", stride), pre + "bn2"))
        y = bn(conv(y, pre + "conv3"), pre + "bn3")
      else:
        y = relu(bn(conv(x, pre + "conv1", stride), pre + "bn1"))
        y = bn(conv(y, pre + "conv2"), pre + "bn2")
      if pre + "downsample.0.weight" in sd:
        x = bn(conv(x, pre + "downsample.0", stride), pre + "downsample.1")
      x = relu(y + x)
      i += 1
    s += 1
  return x.mean(axis=(2, 3))
