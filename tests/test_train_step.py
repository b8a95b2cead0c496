"""The trainer's SAM step: hand-written references for the update, m-sharpness groups and both
BatchNorm policies, and the number of forward passes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nonuniform_jax import optim, steps
from nonuniform_jax.models import common, layers

RHO, LR = 0.05, 0.1


class TinyBN(nn.Module):
  """Conv, BatchNorm, ReLU, pooling, Dense: the smallest network with running statistics."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.Conv(4, (3, 3))(x)
    x = nn.relu(common.batch_norm(train)(x))
    return layers.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def setup(batch=8):
  model = TinyBN()
  x = jax.random.normal(jax.random.key(1), (batch, 6, 6, 3))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 3)
  variables = model.init(jax.random.key(0), x[:1])
  return model, {"inputs": x, "labels": y}, variables


def forward(model, params, stats, x, y):
  """Clean forward in train mode: (mean loss, new running statistics)."""
  logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                            mutable=["batch_stats"])
  return jnp.mean(steps.per_example_cross_entropy(logits, y)), new["batch_stats"]


def run_step(model, batch, variables, *, groups=1, bn_policy="clean"):
  tx = optax.chain(optim.sam(RHO, grouped=groups > 1), optax.sgd(LR))
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))
  step = steps.make_train_step(model, tx, seed=0, passes=2, groups=groups,
                               grouped_perturbation=groups > 1, bn_policy=bn_policy)
  return jax.jit(step)(state, batch)[0]


def sam_reference(model, params, stats, x, y):
  """Two passes by hand: ε = ρ g/‖g‖, g* = ∇L(θ+ε); returns (θ − lr g*, stats of each pass)."""
  (_, stats1), g = jax.value_and_grad(forward, argnums=1, has_aux=True)(model, params, stats,
                                                                       x, y)
  norm = jnp.sqrt(sum(jnp.sum(l ** 2) for l in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda p, gi: p + RHO * gi / norm, params, g)
  (_, stats2), g_star = jax.value_and_grad(forward, argnums=1, has_aux=True)(
      model, perturbed, stats1, x, y)
  return g_star, stats1, stats2


def test_sam_step_and_clean_batchnorm_policy():
  model, batch, variables = setup()
  new = run_step(model, batch, variables)
  g_star, stats1, _ = sam_reference(model, variables["params"], variables["batch_stats"],
                                    batch["inputs"], batch["labels"])
  want = jax.tree.map(lambda p, g: p - LR * g, variables["params"], g_star)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               new.params, want)
  # Running statistics: exactly those of the clean pass alone.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.batch_stats, stats1)


def test_every_pass_batchnorm_policy_updates_in_order():
  model, batch, variables = setup()
  new = run_step(model, batch, variables, bn_policy="every_pass")
  _, stats1, stats2 = sam_reference(model, variables["params"], variables["batch_stats"],
                                    batch["inputs"], batch["labels"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new.batch_stats, stats2)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(stats1), jax.tree.leaves(stats2)))
  assert diff > 1e-4   # the two policies really differ


def test_m_sharpness_groups_match_per_group_reference():
  model, batch, variables = setup(batch=8)
  new = run_step(model, batch, variables, groups=2)
  params, stats = variables["params"], variables["batch_stats"]
  g_stars, group_stats = [], []
  for k in range(2):
    sl = slice(4 * k, 4 * k + 4)
    g_star, stats1, _ = sam_reference(model, params, stats, batch["inputs"][sl],
                                      batch["labels"][sl])
    g_stars.append(g_star)
    group_stats.append(stats1)
  mean_g = jax.tree.map(lambda *g: sum(g) / 2, *g_stars)
  want = jax.tree.map(lambda p, g: p - LR * g, params, mean_g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               new.params, want)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-5,
                                                          atol=1e-6),
               new.batch_stats, *group_stats)


@pytest.mark.parametrize("passes, groups", [(1, 1), (2, 1), (2, 4), (3, 1)])
def test_one_forward_pass_per_gradient_evaluation(passes, groups):
  """SGD 1, SAM 2 (also with m groups: one vmapped pass each), CSAM 3 forward passes."""
  model, batch, variables = setup()
  calls = []

  class Counting(type(model)):
    def __call__(self, *args, **kwargs):
      calls.append(1)
      return super().__call__(*args, **kwargs)

  counting = Counting()
  perturb = {1: None, 2: optim.sam(RHO, grouped=groups > 1), 3: optim.csam(0.05, 0.1, 0.9)}
  tx = optax.chain(*filter(None, [perturb[passes]]), optax.sgd(LR))
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))
  step = steps.make_train_step(counting, tx, seed=0, passes=passes, groups=groups,
                               grouped_perturbation=groups > 1)
  jax.jit(step).lower(state, batch)
  assert len(calls) == passes


def test_csam_step_matches_three_pass_reference():
  """CSAM through the trainer's step: g1, g2 at θ+ε1, g3 at θ+ε2, m = (1−α)δ on the first step."""
  model, batch, variables = setup()
  rho1, rho2, alpha = 0.05, 0.1, 0.9
  tx = optax.chain(optim.csam(rho1, rho2, alpha), optax.sgd(LR))
  params, stats = variables["params"], variables["batch_stats"]
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=tx.init(params))
  new = jax.jit(steps.make_train_step(model, tx, seed=0, passes=3))(state, batch)[0]
  x, y = batch["inputs"], batch["labels"]
  grad = lambda p: jax.grad(forward, argnums=1, has_aux=True)(model, p, stats, x, y)[0]
  norm = lambda t: jnp.sqrt(sum(jnp.sum(l ** 2) for l in jax.tree.leaves(t)))
  g1 = grad(params)
  g2 = grad(jax.tree.map(lambda p, g: p + rho1 * g / norm(g1), params, g1))
  delta = jax.tree.map(jnp.subtract, g2, g1)
  d = jax.tree.map(lambda dl: dl - (1 - alpha) * dl, delta)   # δ − m, m = (1−α)δ
  g3 = grad(jax.tree.map(lambda p, di: p + rho2 * di / norm(d), params, d))
  want = jax.tree.map(lambda p, g: p - LR * g, params, g3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-4, atol=5e-6),
               new.params, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.batch_stats, forward(model, params, stats, x, y)[1])


def test_csam_kfac_step_captures_in_the_clean_pass():
  """With the K-FAC metric the clean pass also returns the factors: still 3 forward passes,
  and the update equals the transformation fed with factors from explicit captures."""
  from nonuniform_jax.models.layers import zero_perturbations
  from nonuniform_jax.optim import kfac
  model, batch, variables = setup()
  params, stats = variables["params"], variables["batch_stats"]
  perts = zero_perturbations(model, variables, batch["inputs"], train=True)
  tx = optax.chain(optim.csam(0.05, 0.1, 0.9, metric="kfac", schedule=kfac.Schedule(1, 1),
                              kfac_layers=kfac.layer_names(perts)), optax.sgd(LR))
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=tx.init(params))
  step = steps.make_train_step(model, tx, seed=0, passes=3, extra_args=("kfac_factors",))
  new = jax.jit(step)(state, batch)[0]

  def per_example(p, q):
    logits, st = model.apply({"params": p, "batch_stats": stats, "perturbations": q},
                             batch["inputs"], train=True, mutable=["kfac", "batch_stats"])
    return steps.per_example_cross_entropy(logits, batch["labels"]), st["kfac"]

  out = kfac.loss_grad_and_captures(per_example, params, perts)
  grad_fn = lambda p: jax.grad(forward, argnums=1, has_aux=True)(
      model, p, stats, batch["inputs"], batch["labels"])[0]
  updates, _ = tx.update(out.grads, tx.init(params), params, grad_fn=grad_fn,
                         kfac_factors=kfac.batch_factors(out.captures))
  want = optax.apply_updates(params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-4, atol=5e-6),
               new.params, want)


@pytest.mark.parametrize("in_perturbation", [False, True])
def test_weight_decay_placement_against_hand_written_step(in_perturbation):
  """sam.weight_decay_in_perturbation: wd·θ enters the perturbation (J = L + wd/2‖θ‖², as the
  original SAM) or only the base optimizer's step (coupled L2 after the perturbation)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import models, plan  # pylint: disable=g-import-not-at-top
  from nonuniform_jax.optim import family  # pylint: disable=g-import-not-at-top
  wd = 0.1
  c = default.get_config()
  c.optimizer.update({"name": "sam", "base": "sgd", "momentum": 0.0, "learning_rate": LR,
                      "weight_decay": wd, "weight_decay_mode": "coupled"})
  c.schedule.name = "constant"
  c.sam.rho = RHO
  c.sam.weight_decay_in_perturbation = in_perturbation
  o = plan.read(c).optimizer
  tx = family.make(o.name, o.settings, optax.constant_schedule(LR), family.Context(),
                   o.weight_decay_in_loss)
  passes, l2 = o.passes, o.l2
  assert passes == 2 and l2 == (wd if in_perturbation else 0.0)
  model = models.get_model("mlp", 3, widths=(8,))
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
  params = model.init(jax.random.key(0), x)["params"]
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                           opt_state=tx.init(params))
  step = steps.make_train_step(model, tx, seed=0, passes=passes, l2=l2)
  got = jax.jit(step)(state, {"inputs": x, "labels": y})[0].params

  def loss(p, decay):
    ce = jnp.mean(steps.per_example_cross_entropy(model.apply({"params": p}, x), y))
    return ce + decay / 2 * sum(jnp.sum(l ** 2) for l in jax.tree.leaves(p))

  def reference(inner, outer):
    g = jax.grad(loss)(params, inner)
    norm = jnp.sqrt(sum(jnp.sum(l ** 2) for l in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda p, gi: p + RHO * gi / norm, params, g)
    g_star = jax.grad(loss)(perturbed, inner)
    return jax.tree.map(lambda p, gs: p - LR * (gs + outer * p), params, g_star)

  flat = lambda tree: np.concatenate([np.ravel(l) for l in jax.tree.leaves(tree)])
  want = reference(wd, 0.0) if in_perturbation else reference(0.0, wd)
  other = reference(0.0, wd) if in_perturbation else reference(wd, 0.0)
  np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(flat(got) - flat(other))) > 1e-5   # the placements differ


def test_nonuniform_sam_is_csam_in_configs():
  """The paper README's name for CSAM selects the same three-pass transformation."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import plan  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.optimizer.name = "nonuniform_sam"
  o = plan.read(c).optimizer
  assert o.entry.name == "csam" and o.passes == 3 and o.needs == ()
  c.csam.metric = "kfac"
  assert plan.read(c).optimizer.needs == ("kfac_factors",)


@pytest.mark.parametrize("inverse_every", [2, 3, 4])
def test_kfac_due_as_a_static_bool_equals_the_traced_choice(inverse_every):
  """The trainer tells the K-FAC step whether it refreshes (a static bool: no lax.cond, which
  XLA:CPU runs slowly around convolutions); over steps that do and do not refresh, the result
  equals the step that reads it from the optimizer state."""
  from nonuniform_jax.models.layers import zero_perturbations  # pylint: disable=g-import-not-at-top
  from nonuniform_jax.optim import kfac  # pylint: disable=g-import-not-at-top
  model, batch, variables = setup()
  perts = zero_perturbations(model, variables, batch["inputs"], train=True)
  every = 2
  tx = optax.chain(optim.csam(0.05, 0.1, 0.9, metric="kfac",
                              schedule=kfac.Schedule(every, inverse_every),
                              kfac_layers=kfac.layer_names(perts)), optax.sgd(LR))
  make = lambda: steps.make_train_step(model, tx, seed=0, passes=3, extra_args=("kfac_factors",))
  traced = jax.jit(make())
  static = jax.jit(make(), static_argnames=("kfac_due",))   # its own function: its own cache
  a = b = c = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                               batch_stats=variables["batch_stats"],
                               opt_state=tx.init(variables["params"]))
  for i in range(5):
    assert bool(kfac.stats_due(b.opt_state)) == (i % every == 0)
    a = traced(a, batch)[0]
    b = static(b, batch, kfac_due=i % every == 0)[0]
    c = static(c, batch, kfac_due=i == 0)[0]   # a wrong schedule: no refresh at steps 2 and 4
    if i == 0:
      first = np.concatenate([np.ravel(x) for x in jax.tree.leaves(c.opt_state[0].kfac.factors)])
  flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves((s.params,
                                                                       s.batch_stats))])
  factors = lambda s: np.concatenate([np.ravel(x) for x in
                                      jax.tree.leaves(s.opt_state[0].kfac.factors)])
  # Equal up to float32 rounding through three eigendecompositions of differently fused programs.
  np.testing.assert_allclose(flat(b), flat(a), rtol=2e-3, atol=5e-5)
  np.testing.assert_allclose(factors(b), factors(a), rtol=1e-4, atol=1e-6)
  # The wrong schedule keeps step 0's statistics untouched, where the right one refreshed them.
  np.testing.assert_array_equal(factors(c), first)
  assert np.max(np.abs(factors(a) - first)) > 1e-3
  assert static._cache_size() == 2   # one program for refresh steps, one for the others


def test_eval_step_splits_noisy_and_clean_examples():
  """Fixed logits (a model that returns its inputs): correct counts on the noisy part against
  the given (flipped) and the true labels, and on the clean part; padding never counts."""
  class Logits(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      del train
      return x

  predicted = np.array([0, 1, 2, 1, 0, 2])                      # argmax of each row
  batch = {"inputs": jnp.asarray(np.eye(3)[predicted], jnp.float32),
           "labels": jnp.array([0, 1, 1, 1, 2, 0]),             # as given (some flipped)
           "clean_labels": jnp.array([0, 2, 2, 1, 0, 0]),
           "noisy": jnp.array([0., 1., 1., 0., 1., 0.]),
           "mask": jnp.array([1., 1., 1., 1., 1., 0.])}         # the last is padding
  sums = jax.jit(steps.make_eval_step(Logits()))({}, {}, batch)
  # Real examples 0-4: correct against the given labels at 0, 1, 3; noisy ones are 1, 2, 4.
  assert float(sums["count"]) == 5 and float(sums["correct"]) == 3
  assert float(sums["noisy_count"]) == 3 and float(sums["noisy_correct"]) == 1    # example 1
  assert float(sums["noisy_true_correct"]) == 2                                  # 2 and 4
