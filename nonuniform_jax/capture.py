"""The capture contract of the Kronecker factors, in one place below both of its sides.

The capturing layers (``models.layers.Dense``, ``Conv``, ``BatchNorm``) sow what a Kronecker
factor needs into the variable collection ``KFAC`` and pass their outputs through
``Module.perturb`` into ``PERTURBATIONS``; ``optim.kfac`` (factors, per-example gradients and
norms) and through it ``measures.captures`` read them back by these names:

* ``KFAC/<layer>/INPUTS``: a Dense or Conv layer's input x̄ [B, T, K̄] (patches, bias column);
* ``PERTURBATIONS/<layer>/OUTPUTS``: its output, whose gradient is s = ∂ℓ_i/∂y [B, T, F];
* ``KFAC/<layer>/NORMALIZED`` and ``PERTURBATIONS/<layer>/NORM_OUTPUTS``: a BatchNorm layer's
  normalised input x̂ and output (running statistics), under names of their own so that K-FAC
  never takes it for a Kronecker layer (``kfac.layer_names``); they serve exact per-example
  gradient norms only.

``<layer>`` is the layer's module path joined with '/'. The layouts are those of
``models.layers`` (its module docstring).
"""

KFAC = "kfac"
PERTURBATIONS = "perturbations"
INPUTS = "inputs"
OUTPUTS = "outputs"
NORMALIZED = "normalized"
NORM_OUTPUTS = "norm_outputs"
