"""The correlation statistics (nonuniform_jax.analysis) against tables computed by hand and
scipy, the bootstrap's coverage, and the sweep table's exclusions."""

import math

import numpy as np
import pytest
import scipy.stats

from nonuniform_jax import analysis, evaluators
from nonuniform_jax.analysis import Table, correlation
from tests import analysis_fixtures


def _table(hyperparameters, rows, measures=("m",)) -> Table:
  """A table from (hyperparameter values..., measure, gap) tuples."""
  out = []
  for i, values in enumerate(rows):
    *hyper, measure, gap = values
    out.append({"name": str(i), **dict(zip(hyperparameters, hyper)), "m": measure,
                "generalization_gap": gap})
  return Table(rows=tuple(out), hyperparameters=tuple(sorted(hyperparameters)),
               measures=tuple(measures))


def test_kendall_tau_by_hand():
  # 10 pairs, discordant (1, 2) and (3, 4): (8 - 2) / 10.
  assert analysis.kendall_tau([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.6)
  # Ties: C = 4, D = 0, P = 6, one pair tied in x, one in y: 4 / sqrt(5 * 5).
  assert analysis.kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
  # Non-finite values drop their model: the same as without it.
  assert analysis.kendall_tau([1, 2, np.nan, 3, 4, 5], [2, 1, 7, 4, 3, 5]) == pytest.approx(0.6)
  assert math.isnan(analysis.kendall_tau([1, 1, 1], [1, 2, 3]))   # undefined, as scipy
  assert math.isnan(analysis.kendall_tau([1], [2]))


@pytest.mark.parametrize("n, ties", [(7, False), (40, False), (40, True), (200, True)])
def test_kendall_tau_matches_scipy(n, ties):
  rng = np.random.default_rng(n)
  x = rng.normal(size=n)
  y = x + rng.normal(size=n)
  if ties:
    x, y = np.round(x), np.round(2 * y)
  expected = scipy.stats.kendalltau(x, y).statistic   # τ-b
  assert analysis.kendall_tau(x, y) == pytest.approx(expected, abs=1e-12)


def test_resampled_tau_is_tau_b_of_the_resample():
  """The bootstrap's weighted form equals τ-b of the resampled models, copies included."""
  rng = np.random.default_rng(0)
  x, y = np.round(rng.normal(size=25), 1), rng.normal(size=25)
  for _ in range(5):
    idx = rng.integers(0, 25, 25)
    weights = np.bincount(idx, minlength=25)[None].astype(float)
    got = correlation._weighted_tau(correlation._sign_matrix(x), correlation._sign_matrix(y),
                                    weights)[0]
    assert got == pytest.approx(scipy.stats.kendalltau(x[idx], y[idx]).statistic, abs=1e-12)


def test_bootstrap_tau_covers_the_true_tau_at_the_nominal_rate():
  """Bivariate normal with correlation ρ: Kendall's τ is (2/π) arcsin ρ."""
  rho, n, repetitions = 0.5, 30, 200
  true = 2 / math.pi * math.asin(rho)
  rng = np.random.default_rng(1)
  hits = 0
  for r in range(repetitions):
    x = rng.normal(size=n)
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.normal(size=n)
    result = analysis.bootstrap_tau(x, y, num_resamples=1000, seed=r)
    assert result["low"] <= result["tau"] <= result["high"]
    hits += result["low"] <= true <= result["high"]
  assert 0.9 <= hits / repetitions <= 0.99


def test_bootstrap_is_seeded_and_paired():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(2, 30))
  a = analysis.bootstrap_tau(x, y, 200, seed=3)
  assert a == analysis.bootstrap_tau(x, y, 200, seed=3)
  assert a != analysis.bootstrap_tau(x, y, 200, seed=4)
  b = analysis.bootstrap_tau(-x, y, 200, seed=3)   # the same resamples: a mirrored interval
  assert (b["low"], b["high"]) == pytest.approx((-a["high"], -a["low"]))
  assert math.isnan(analysis.bootstrap_tau(x, y, 0)["low"])


def test_partial_kendall_tau_by_hand():
  # τ_xz = τ_yz = 2/3 (one discordant pair of six), τ_xy = 1/3:
  # (1/3 − 4/9) / (1 − 4/9) = −1/5.
  z, x, y = [1, 2, 3, 4], [1, 2, 4, 3], [2, 1, 3, 4]
  assert analysis.kendall_tau(x, z) == pytest.approx(2 / 3)
  assert analysis.kendall_tau(x, y) == pytest.approx(1 / 3)
  assert analysis.partial_kendall_tau(x, y, z) == pytest.approx(-0.2)
  assert math.isnan(analysis.partial_kendall_tau(z, y, z))   # z orders x perfectly


# Learning rate × batch; measure and gap. Groups of the learning rate (batch fixed):
# b = 32: μ (1, 2, 3), gap (1, 3, 2): τ = 1/3; b = 64: μ (4, 5, 6), gap (4, 5, 1.5): τ = −1/3.
# Groups of the batch (rate fixed): (1, 1)-(4, 4) and (2, 3)-(5, 5) concordant, (3, 2)-(6, 1.5)
# discordant. ψ_lr = 0, ψ_b = 1/3, Ψ = 1/6.
GRID = [(0.1, 32, 1, 1), (0.2, 32, 2, 3), (0.4, 32, 3, 2),
        (0.1, 64, 4, 4), (0.2, 64, 5, 5), (0.4, 64, 6, 1.5)]


def test_granulated_psi_by_hand():
  table = _table(("lr", "batch"), GRID)
  psi = analysis.granulated_psi(table, "m", num_resamples=0)
  per = psi["per_hyperparameter"]
  assert per["lr"]["psi"] == pytest.approx(0.0) and per["lr"]["num_groups"] == 2
  assert per["batch"]["psi"] == pytest.approx(1 / 3) and per["batch"]["num_groups"] == 3
  assert psi["psi"] == pytest.approx(1 / 6)
  assert psi["num_models"] == 6


def test_granulated_psi_holds_seeds_fixed_and_counts_undefined_groups_as_zero():
  # Two seeds: the learning rate's groups are the seeds' (τ = 1 and −1); no ψ for the seed.
  rows = [(0.1, 0, 1, 1), (0.1, 1, 2, 4), (0.2, 0, 3, 2), (0.2, 1, 4, 3)]
  psi = analysis.granulated_psi(_table(("lr", "seed"), rows), "m", num_resamples=0)
  assert set(psi["per_hyperparameter"]) == {"lr"}
  assert psi["psi"] == pytest.approx(0.0)
  # A group whose measure is constant orders nothing: τ = 0, not dropped. (1 + 0) / 2.
  rows = [(0.1, 0, 1, 1), (0.2, 0, 2, 2), (0.1, 1, 5, 1), (0.2, 1, 5, 2)]
  psi = analysis.granulated_psi(_table(("lr", "seed"), rows), "m", num_resamples=0)
  assert psi["psi"] == pytest.approx(0.5)
  assert psi["per_hyperparameter"]["lr"]["num_groups"] == 2
  # A group with a single finite model is skipped.
  rows = [(0.1, 0, 1, 1), (0.2, 0, 2, 2), (0.1, 1, np.nan, 1), (0.2, 1, 5, 2)]
  psi = analysis.granulated_psi(_table(("lr", "seed"), rows), "m", num_resamples=0)
  assert psi["psi"] == pytest.approx(1.0) and psi["num_models"] == 2


def test_psi_interval_covers_the_true_tau_at_the_nominal_rate():
  """40 groups of 5 models differing in k: each group's τ-b is unbiased for the population
  τ (no ties), so ψ_k's interval over groups covers it about 95% of the time."""
  rho, repetitions = 0.5, 200
  true = 2 / math.pi * math.asin(rho)
  rng = np.random.default_rng(5)
  hits = 0
  for r in range(repetitions):
    x = rng.normal(size=200)
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.normal(size=200)
    rows = [(i // 5, i % 5, x[i], y[i]) for i in range(200)]
    psi = analysis.granulated_psi(_table(("g", "k"), rows), "m", num_resamples=500, seed=r)
    entry = psi["per_hyperparameter"]["k"]
    assert entry["num_groups"] == 40
    hits += entry["low"] <= true <= entry["high"]
  assert 0.9 <= hits / repetitions <= 0.99


def test_psi_interval_needs_two_groups():
  table = _table(("lr", "batch"), GRID)
  psi = analysis.granulated_psi(table, "m", num_resamples=200)
  assert not math.isnan(psi["per_hyperparameter"]["lr"]["low"])   # two groups
  assert psi["low"] <= psi["psi"] <= psi["high"]
  one = _table(("lr", "batch"), GRID[:3] + GRID[3:4])   # the learning rate: one group
  psi = analysis.granulated_psi(one, "m", num_resamples=200)
  assert math.isnan(psi["per_hyperparameter"]["lr"]["low"]) and math.isnan(psi["low"])


def test_sign_error_by_hand():
  # Environments of the learning rate (b = 32): pairs (1,2) 0, (1,3) 0, (2,3) 1; (b = 64):
  # (4,5) 0, (4,6) 1, (5,6) 1: mean 1/2, max 1. Of the batch: 0, 0, 1: mean 1/3.
  errors = analysis.sign_error(_table(("lr", "batch"), GRID), "m")
  per = errors["per_hyperparameter"]
  assert per["lr"] == {"mean": pytest.approx(0.5), "max": 1.0, "num_environments": 6}
  assert per["batch"] == {"mean": pytest.approx(1 / 3), "max": 1.0, "num_environments": 3}
  assert errors["mean"] == pytest.approx(4 / 9) and errors["num_environments"] == 9
  assert errors["worst_hyperparameter"] == pytest.approx(0.5)
  assert errors["worst_hyperparameter_name"] == "lr"
  assert errors["worst_environment"] == 1.0
  # Several environments reach 1: the first in the hyperparameters' sorted order.
  assert errors["worst_environment_settings"] == ({"batch": 32, "lr": 0.4},
                                                  {"batch": 64, "lr": 0.4})


def test_sign_error_ties_and_seed_pairs():
  # A tie in the measure: ½.
  errors = analysis.sign_error(_table(("lr",), [(0.1, 1, 1), (0.2, 1, 2)]), "m")
  assert errors["mean"] == 0.5
  # Two seeds per setting: one environment, averaged over its four cross pairs:
  # (s0, s0) 0, (s0, s1) 0, (s1, s0) 1, (s1, s1) 1.
  rows = [(0.1, 0, 1, 1), (0.1, 1, 2, 4), (0.2, 0, 3, 2), (0.2, 1, 4, 3)]
  errors = analysis.sign_error(_table(("lr", "seed"), rows), "m")
  assert errors["num_environments"] == 1 and errors["mean"] == 0.5
  assert set(errors["per_hyperparameter"]) == {"lr"}


def test_within_sharpness_bins_by_hand():
  # Sharpness 1..10 (shuffled): bins {1..5} and {6..10}. In the first the nonuniformity
  # orders the gap perfectly (τ = 1); in the second, nonuniformity 1..5 with gaps 5, 4, 1, 3, 2:
  # concordant (1, 3) and (1, 2), the 8 other pairs discordant (τ = −0.6).
  # Weighted: (5·1 + 5·(−0.6)) / 10 = 0.2.
  sharp = [3, 1, 2, 5, 4, 8, 6, 10, 7, 9]
  noisy = [3, 1, 2, 5, 4, 1, 2, 3, 4, 5]
  gap = [3, 1, 2, 5, 4, 5, 4, 1, 3, 2]
  rows = tuple({"name": str(i), "s": s, "m": m, "generalization_gap": g}
               for i, (s, m, g) in enumerate(zip(sharp, noisy, gap)))
  table = Table(rows=rows, measures=("m", "s"))
  assert analysis.kendall_tau(noisy[5:], gap[5:]) == pytest.approx(-0.6)
  bins = analysis.within_sharpness_bins(table, "m", "s", num_bins=5)
  assert [(b["low"], b["high"], b["size"]) for b in bins["bins"]] == [(1, 5, 5), (6, 10, 5)]
  assert [b["tau"] for b in bins["bins"]] == pytest.approx([1.0, -0.6])
  assert bins["weighted_tau"] == pytest.approx(0.2)
  assert sorted(bins["bins"][0]["members"]) == ["0", "1", "2", "3", "4"]
  # Fewer than five models: no bin.
  assert analysis.within_sharpness_bins(table.select([True] * 4 + [False] * 6), "m",
                                        "s")["bins"] == []


def test_wu_check_by_hand():
  # η = 0.1: a = 15 (a·η/2 = 0.75, stable), a = 25 (1.25, not); s = 20, 40 at b = 16, 64:
  # s·η/√b = 0.5 both.
  rows = ({"name": "a", "lr": 0.1, "b": 16, "a": 15.0, "s": 20.0},
          {"name": "b", "lr": 0.1, "b": 64, "a": 25.0, "s": 40.0})
  check = analysis.wu_check(Table(rows=rows), "a", "s", learning_rate="lr", batch_size="b")
  first, second = check["members"]
  assert first["sharpness_ratio"] == pytest.approx(0.75) and first["stable"]
  assert second["sharpness_ratio"] == pytest.approx(1.25) and not second["stable"]
  assert first["nonuniformity_ratio"] == pytest.approx(0.5)
  assert second["nonuniformity_ratio"] == pytest.approx(0.5)
  assert check["fraction_stable"] == 0.5
  (rate,) = check["learning_rates"]
  assert rate["batch_sizes"] == [16, 64] and not rate["all_stable"]
  assert rate["tau_nonuniformity_batch"] == 1.0
  assert check["tau_nonuniformity_sqrt_b_over_eta"] == 1.0


def test_load_table_exclusions_measures_and_targets(tmp_path):
  expected = analysis_fixtures.write_sweep(str(tmp_path))
  table = analysis.load_table(str(tmp_path))
  assert len(table) == 18
  assert {e["name"]: e["reason"] for e in table.excluded}.keys() == expected.keys()
  for entry in table.excluded:
    assert expected[entry["name"]] in entry["reason"]
  assert "0.9 < 0.99" in next(e for e in table.excluded if e["name"] == "short")["reason"]
  assert table.hyperparameters == ("batch_size", "optimizer.learning_rate", "seed")
  # The values the trainer logs, not the settings recorded beside them.
  assert table.measures == ("gradient_noise/trace_sigma", "lambda_max/lambda_max",
                            "wu_nonuniformity/nonuniformity")
  row = table.rows[0]
  assert row["test_error"] == pytest.approx(1 - row["test_accuracy"])
  assert row["generalization_gap"] == pytest.approx(row["test_loss"] - row["train_loss"])
  # A setting not varied per member is read from the configs.
  assert table.values("dataset") == ["mnist1d"] * 18
  assert table.column("optimizer.learning_rate")[0] == 0.05
  # A looser criterion lets the short member in.
  loose = analysis.load_table(str(tmp_path), criterion={"train_accuracy": 0.8})
  assert len(loose) == 19 and "short" not in {e["name"] for e in loose.excluded}


def test_load_table_refuses_what_is_not_a_sweep(tmp_path):
  with pytest.raises(ValueError, match="no sweep.json"):
    analysis.load_table(str(tmp_path))
  (tmp_path / "sweep.json").write_text('{"members": [{"name": "a"}]}')
  with pytest.raises(ValueError, match="'name' and 'workdir'"):
    analysis.load_table(str(tmp_path))
  (tmp_path / "sweep.json").write_text('{"members": [], "criterion": {"test_loss": 1}}')
  with pytest.raises(ValueError, match="unknown training criterion"):
    analysis.load_table(str(tmp_path))


def test_summary_headline(tmp_path):
  analysis_fixtures.write_sweep(str(tmp_path))
  table = analysis.load_table(str(tmp_path))
  head = analysis.summary(table, num_resamples=100)
  assert head["num_models"] == 18 and len(head["excluded"]) == 3
  assert [(r["measure"], r["target"]) for r in head["rows"]][:2] == [
      ("lambda_max/lambda_max", "generalization_gap"), ("lambda_max/lambda_max", "test_error")]
  assert {r["kind"] for r in head["rows"][2:]} == {"nonuniformity"}
  for row in head["rows"]:
    assert row["num_models"] == 18
    assert row["tau_low"] <= row["tau"] <= row["tau_high"]
    assert row["abs_tau"] == abs(row["tau"])
    assert row["tau"] == pytest.approx(analysis.kendall_tau(table.column(row["measure"]),
                                                            table.column(row["target"])))
    assert row["psi"] == pytest.approx(
        analysis.granulated_psi(table, row["measure"], row["target"], 0)["psi"])
  with pytest.raises(ValueError, match="unknown target"):
    analysis.summary(table, targets=("test_loss",))
  with pytest.raises(ValueError, match="no measure"):
    analysis.summary(table, measures=("hessian_trace/trace",))


def test_measure_kinds_follow_the_trainer():
  for name in evaluators.NONUNIFORMITY:
    assert analysis.measure_kind(f"{name}/x") == "nonuniformity"
  assert analysis.measure_kind("lambda_max/lambda_max") == "sharpness"
