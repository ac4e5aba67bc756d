"""Design checks: each fires on a bad design, with its numbers, and stays quiet on a good one."""

import numpy as np
import pytest

from launch import cli
from scaling.checks.design import EPOCH_PRIOR, check_design, iso_groups
from scaling.fitting.laws import chinchilla_optimum


def good_design():
    """An IsoFLOP design: 4 budgets x 7 sizes around the compute-optimal N, D = C / 6N."""
    n, d = [], []
    for compute in (1e18, 1e19, 1e20, 1e21):
        n_opt = chinchilla_optimum(EPOCH_PRIOR, compute)[0]
        for size in n_opt * np.geomspace(1 / 8, 8, 7):
            n.append(size)
            d.append(compute / (6 * size))
    n, d = np.array(n), np.array(d)
    return n, d, 6 * n * d


def log_steps(points, last=10_000):
    return [np.unique(np.round(np.geomspace(1, last, points))) for _ in range(3)]


def test_a_good_design_is_quiet():
    n, d, c = good_design()
    assert check_design(n, d, c, log_steps(30)) == []


def test_collinear_n_and_d():
    n = np.geomspace(1e7, 1e10, 20)
    d = 20 * n * np.exp(np.random.default_rng(0).normal(0, 0.01, 20))  # tokens ~ 20 N
    (warning,) = [w for w in check_design(n, d, 6 * n * d) if "collinear" in w]
    assert "corr(log N, log D) = 1.000" in warning
    n2, d2, c2 = good_design()
    assert not [w for w in check_design(n2, d2, c2) if "collinear" in w]


def test_isoflop_group_that_misses_the_minimum():
    compute = 1e20
    n_opt = chinchilla_optimum(EPOCH_PRIOR, compute)[0]
    n = n_opt * np.geomspace(4, 64, 5)  # all larger than the optimum
    d = compute / (6 * n)
    warnings = [w for w in check_design(n, d, 6 * n * d) if "IsoFLOP group" in w]
    assert len(warnings) == 1 and "does not bracket" in warnings[0] and "1e+20" in warnings[0]
    # Observed losses override the prior: a minimum in the middle brackets.
    losses = np.array([3.0, 2.9, 2.8, 2.9, 3.0])
    assert not [w for w in check_design(n, d, 6 * n * d, losses=losses) if "IsoFLOP group" in w]
    losses = np.array([3.0, 2.9, 2.8, 2.7, 2.6])  # still falling at the largest size
    assert [w for w in check_design(n, d, 6 * n * d, losses=losses) if "IsoFLOP group" in w]


def test_iso_groups_cluster_by_compute():
    groups = iso_groups(np.array([1e18, 1.05e18, 1e19, 0.98e19, 1e20]))
    assert [sorted(g.tolist()) for g in groups] == [[0, 1], [2, 3], [4]]


def test_too_few_points_for_the_law():
    n, d, c = good_design()
    keep = slice(0, 10)
    (warning,) = [w for w in check_design(n[keep], d[keep], c[keep]) if "distinct" in w]
    assert "10 distinct" in warning and "3 x 5 = 15" in warning
    assert not [
        w for w in check_design(n[:10], d[:10], c[:10], law="saturating") if "distinct" in w
    ]


def test_sizes_within_a_decade():
    n = np.geomspace(1e8, 5e8, 12)
    d = np.tile([1e9, 1e10, 1e11], 4)
    (warning,) = [w for w in check_design(n, d, 6 * n * d) if "decade" in w]
    assert "5x" in warning
    n_wide = np.geomspace(1e8, 2e9, 12)
    assert not [w for w in check_design(n_wide, d, 6 * n_wide * d) if "span" in w]


def test_too_few_eval_points():
    n, d, c = good_design()
    (warning,) = check_design(n, d, c, log_steps(5))
    assert "3 of 3 members" in warning and "eval.points" in warning
    # Many points but crammed into the last decade are too few per decade on a log axis.
    crammed = [np.concatenate([[1], np.linspace(1000, 10_000, 40)])]
    assert check_design(n, d, c, crammed)


def test_check_command_warns_on_the_tiny_study(capsys):
    assert cli.main(["check", "experiments/local_cpu.py:tiny"]) == 0
    out = capsys.readouterr().out
    assert "warning: 3 distinct (N, D) points" in out and "eval.points" in out


@pytest.mark.parametrize("law", ["nonsense"])
def test_check_command_refuses_an_unknown_law(capsys, law):
    assert cli.main(["check", "experiments/local_cpu.py", "--law", law]) == 2
    assert "unknown law" in capsys.readouterr().err


def test_the_main_study_passes_its_design_checks_for_the_law_it_fits(capsys):
    # The README's main command fits L(N) = (N_c / N)^alpha to the local study.
    assert cli.main(["check", "experiments/local_cpu.py", "--law", "power"]) == 0
    assert capsys.readouterr().out.strip() == "design checks passed"
