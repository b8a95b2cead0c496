"""Equal sharpness, different nonuniformity: the one-dimensional toy (docs/experiments.md §1).

    python -m nonuniform_jax.main --config configs/toy_minima.py --workdir /tmp/nu/toy_minima

f = ½(f1 + f2), f_i(x) = min(x², c_i (x−1)²), c = (0.1, 1.9); start x0 = 1.0001, learning rate 0.6,
200 iterations; GD, SGD, SGD momentum 0.5, Nesterov μ_t = t/(t+2) and per-example SAM ρ = 0.01,
100 seeds each (one lax.scan per method, seeds vmapped). Writes escape rates, the measured
sharpness, nonuniformity and stability value at both minima, toy_minima.png and
toy_minima_trajectories.png. Takes about 15 s on a shared 2-core CPU (14 s wall, 7.5 s CPU
measured; mostly compilation).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "toy_minima"
  c.seed = 0
  c.num_seeds = 100
  c.methods = ("gd", "sgd", "momentum", "nesterov", "sam")
  c.coefficients = (0.1, 1.9)      # f_i(x) = min(x², c_i (x−1)²)
  c.x0 = 1.0001
  c.learning_rate = 0.6
  c.num_steps = 200
  c.momentum = 0.5                 # 'momentum' (heavy ball); 'nesterov' uses μ_t = t/(t+2)
  c.sam_rho = 0.01
  c.tolerance = 0.1                # |x_T| < tol: ended at x = 0; |x_T − 1| < tol: at x = 1
  c.measure_iterations = 20        # power iterations of λ_max and of Wu's s at the minima
  c.figure_seeds = 20              # seeds drawn in toy_minima_trajectories.png
  c.overwrite = False
  return c
