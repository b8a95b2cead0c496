"""An explicit gradient-noise penalty on a two-parameter model (docs/experiments.md §2).

    python -m nonuniform_jax.main --config configs/two_param.py --workdir /tmp/nu/two_param

y = θ1θ2·x + e, x ~ 2·N(0,1), e ~ N(0,1), θ1θ2 = −0.01 in the data, n = 5000, batch 100, learning
rate 0.01, 10 000 iterations from (0.1, 0.19); SGD, SAM (ρ = 0.005) and COV (λ = 0.3), 5 seeds
(the paper shows one), one lax.scan per method with the seeds vmapped. Writes two_param.png
(contours with the three trajectories of seed 0; ‖θ‖ over iterations) and the final norms.
Takes about 15–20 s on a shared 2-core CPU (17 s wall, 8 s CPU measured).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "two_param"
  c.seed = 0
  c.num_seeds = 5
  c.methods = ("sgd", "sam", "cov")
  c.num_examples = 5000
  c.x_scale = 2.0                  # x = x_scale · N(0, 1)
  c.noise_std = 1.0                # e ~ noise_std · N(0, 1)
  c.theta_product = -0.01          # θ*1 θ*2 of the data (θ* = (0.1, −0.1))
  c.init = (0.1, 0.19)
  c.batch_size = 100               # without replacement, epochs of shuffled batches
  c.learning_rate = 0.01
  c.num_steps = 10_000
  c.sam_rho = 0.005
  c.cov_lambda = 0.3
  c.log_every = 100                # metrics.jsonl: every log_every iterations
  c.overwrite = False
  return c
