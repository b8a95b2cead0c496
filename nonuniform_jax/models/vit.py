"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

The image [b, h, w, c] is cut into (h/p)·(w/p) patches of p×p pixels, each embedded linearly
(a p×p stride-p convolution) to ``hidden_size``; a learned class token is prepended
(``pool="token"``) and learned position embeddings added; ``depth`` pre-LayerNorm encoder
blocks x ← x + MHA(LN(x)), x ← x + MLP(LN(x)) follow (MLP: Dense(mlp_dim)-GELU-Dense(hidden));
a final LayerNorm, then the class token (or the mean over tokens, ``pool="gap"``) goes to the
classifier. Dropout (``dropout_rate``) follows the embedding, the attention output and both MLP
layers; ``attention_dropout_rate`` drops attention probabilities; both draw from the
``'dropout'`` rng collection in training mode only.

Every projection, the query/key/value/output ones included, is a ``layers.Dense`` so the
Kronecker-factor captures see it. The parameter names are those of the original implementation
(google-research/vision_transformer: ``embedding``, ``cls``, ``pos_embedding``,
``encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}}``, ``encoder_norm``, ``head``) with its
``Transformer/`` and ``posembed_input/`` scopes flattened and its attention kernels
([hidden, heads, head_dim]; [heads, head_dim, hidden] for ``out``) stored as [hidden, hidden]: a
checkpoint loader renames and reshapes. ViT-S/16 at 224×224 with 1000 classes has 22,050,664 parameters.

The position embeddings fix the number of patches at initialisation: apply at the image size
used for ``init``.
"""

import flax.linen as nn
import jax.numpy as jnp

from nonuniform_jax import checks
from nonuniform_jax.models.layers import Conv, Dense

POOLS = ("token", "gap")

_dense_init = {"kernel_init": nn.initializers.xavier_uniform(),
               "bias_init": nn.initializers.normal(1e-6)}


class MultiHeadAttention(nn.Module):
  """softmax(q kᵀ/√d_head) v over ``num_heads`` heads, q, k, v, output from ``layers.Dense``."""
  num_heads: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    b, n, d = x.shape
    split = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)
    q, k, v = (split(Dense(d, name=name, **_dense_init)(x)) for name in ("query", "key", "value"))
    dropout_rng = self.make_rng("dropout") if train and self.dropout_rate > 0 else None
    y = nn.dot_product_attention(q, k, v, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                                 deterministic=not train)
    return Dense(d, name="out", **_dense_init)(y.reshape(b, n, d))


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.gelu(Dense(self.mlp_dim, **_dense_init)(x), approximate=False)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = Dense(x.shape[-1], **_dense_init)(y)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    y = MultiHeadAttention(self.num_heads, self.attention_dropout_rate,
                           name="MultiHeadDotProductAttention_0")(nn.LayerNorm()(x), train)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return x + MlpBlock(self.mlp_dim, self.dropout_rate)(nn.LayerNorm()(x), train)


class VisionTransformer(nn.Module):
  """ViT; the defaults are a small ViT for 32×32 images (patch 4: 64 patches)."""
  num_classes: int
  patch_size: int = 4
  hidden_size: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 768
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  pool: str = "token"

  def __post_init__(self):
    checks.choice("ViT pool", self.pool, POOLS)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"ViT hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not a multiple of patch_size {p}")
    x = Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    x = x.reshape(x.shape[0], -1, self.hidden_size)
    if self.pool == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_size)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                       self.attention_dropout_rate, name=f"encoderblock_{i}")(x, train)
    x = nn.LayerNorm(name="encoder_norm")(x)
    x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
    return Dense(self.num_classes, name="head")(x)
