"""nonuniform_jax: sharpness versus nonuniformity of the gradient noise, in JAX.

Subpackages: ``optim`` (the SAM family as Optax transformations), ``measures`` (sharpness and
gradient-noise measures on any loss over any pytree), ``models``, ``data``, ``experiments``.
The optimizers and measures import without TensorFlow.
"""

__version__ = "0.1.0"
