"""The paper's small studies, each a module with ``run(config, workdir) -> summary``.

* ``toy_minima``: equal sharpness, different nonuniformity (docs/experiments.md §1);
* ``two_param``: the explicit gradient-noise penalty COV on a two-parameter model (§2 there);
* ``sparse_regression``: sparse regression with a diagonal network, and HaoChen et al.'s
  label-noise reference (§3 there).

``nonuniform_jax.train.train_and_evaluate`` runs them when ``config.task`` names one.
"""
