"""Correlation of sharpness and nonuniformity with generalization, over a sweep's members.

``load_table(sweep_dir)`` reads a sweep (``sweep.json`` and each member's ``summary.json``)
into a :class:`Table` of members × hyperparameters × measures × targets, with the members left
out and why; the statistics are plain functions of it (numpy; definitions in
docs/measures.md, "Correlation statistics"):

    kendall_tau, bootstrap_tau, partial_kendall_tau     on columns (``table.column(key)``)
    granulated_psi, sign_error                           per hyperparameter, on a table
    within_sharpness_bins, wu_check                      on a table
    summary                                              the headline table

``nonuniform_jax.plot`` draws the figures and writes the tables (``analysis.figures``).
"""

from nonuniform_jax.analysis.correlation import (bootstrap_tau, granulated_psi,
                                                 hyperparameter_groups, kendall_tau,
                                                 measure_kind, partial_kendall_tau, sign_error,
                                                 summary, varying_measures,
                                                 within_sharpness_bins, wu_check)
from nonuniform_jax.analysis.table import REPLICATE_KEYS, TARGETS, Table, load_table
