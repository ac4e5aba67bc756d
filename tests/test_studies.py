"""The reference studies: the designs they promise, checked from their loaded members."""

import pytest

from experiments.kaplan_fig20_gpu import learning_rate
from launch import config as config_lib

ISOFLOP = "experiments/chinchilla_isoflop.py"


def _grid(path):
    """{budget: [(n_total, 6 N_total D)]} of an IsoFLOP study, budget read back from C."""
    module, arg, _ = config_lib.load_study(path)
    budgets = module.LOCAL_BUDGETS if arg == "local" else module.BUDGETS
    grid = {b: [] for b in budgets}
    for member in config_lib.study_sweep(path):
        shape = config_lib.model_config(member).shape
        tokens = member.train.steps * member.train.batch_size * shape.n_ctx
        flops = 6 * shape.n_params * tokens
        nearest = min(budgets, key=lambda b: abs(flops / b - 1))
        grid[nearest].append((shape.n_params, flops))
    return grid


@pytest.mark.parametrize("path", [ISOFLOP, ISOFLOP + ":local"])
def test_isoflop_members_hit_their_budgets_within_one_percent(path):
    grid = _grid(path)
    assert len(grid) >= 5
    for budget, members in grid.items():
        assert len({n for n, _ in members}) >= 5, (budget, members)
        for n_total, flops in members:
            assert abs(flops / budget - 1) < 0.01, (budget, n_total, flops)


def test_isoflop_budgets_span_the_papers_range_and_the_local_one_is_small():
    module, _, _ = config_lib.load_study(ISOFLOP)
    assert min(module.BUDGETS) == 6e18 and max(module.BUDGETS) == 3e21
    local = config_lib.study_sweep(ISOFLOP + ":local")
    assert all(m.model.vocab_size == 256 and m.train.steps >= module.MIN_STEPS for m in local)
    assert len({config_lib.run_id(m) for m in local}) == len(local)
    assert max(module.LOCAL_BUDGETS) < 1e13


def test_isoflop_profiles_bracket_the_compute_optimal_size():
    for budget, members in _grid(ISOFLOP).items():
        sizes = sorted(n for n, _ in members)
        # The 20-tokens-per-parameter optimum lies inside every profile.
        assert sizes[0] < (budget / 120) ** 0.5 < sizes[-1], budget


def test_kaplan_study_spans_the_papers_range():
    from launch.train import run_record

    members = config_lib.study_sweep("experiments/kaplan2020.py")
    sizes = [run_record(m, config_lib.run_id(m)).n_params for m in members]
    assert len(sizes) >= 7 and max(sizes) / min(sizes) >= 1000
    assert min(sizes) == 768 and 1.4e9 < max(sizes) < 1.6e9
    for m in members:
        assert m.model.n_ctx == 1024 and m.train.batch_size == 512
        assert m.train.warmup_steps == 3000 and m.train.final_lr_fraction == 0.0
    rates = [m.train.learning_rate for m in members]
    assert rates == sorted(rates, reverse=True)  # equation D.1: smaller LR for larger N


HOUR = "experiments/cpu_hour.py"


def _budget(member):
    shape = config_lib.model_config(member).shape
    tokens = member.train.steps * member.train.batch_size * shape.n_ctx
    return shape, tokens, 6 * shape.n_params * tokens


def test_cpu_hour_ladder_shares_one_token_budget_and_grid_hits_its_budgets():
    module, _, _ = config_lib.load_study(HOUR)
    members = config_lib.study_sweep(HOUR)
    ladder, grid = members[: len(module.PER_TOKEN_SIZES)], members[len(module.PER_TOKEN_SIZES) :]
    assert len({_budget(m)[1] for m in ladder}) == 1
    sizes = sorted(_budget(m)[0].n_params_kaplan for m in ladder)
    assert len(set(sizes)) == 6 and sizes[-1] / sizes[0] > 100
    by_budget = {b: [] for b in module.BUDGETS}
    for member in grid:
        shape, tokens, flops = _budget(member)
        nearest = min(module.BUDGETS, key=lambda b: abs(flops / b - 1))
        assert abs(flops / nearest - 1) < 0.01, (nearest, flops)
        by_budget[nearest].append(shape.n_params)
    for budget, n_totals in by_budget.items():
        assert len(set(n_totals)) == module.SIZES_PER_BUDGET
        # the profile brackets the size that sees TOKENS_PER_PARAM tokens per parameter
        assert min(n_totals) < (budget / (6 * module.TOKENS_PER_PARAM)) ** 0.5 < max(n_totals)


def test_cpu_hour_ladder_never_joins_an_isoflop_profile():
    """isoflop.profiles groups runs within 2% of a budget: the ladder's budgets stay apart."""
    module, _, _ = config_lib.load_study(HOUR)
    members = config_lib.study_sweep(HOUR)
    for member in members[: len(module.PER_TOKEN_SIZES)]:
        flops = _budget(member)[2]
        assert all(abs(flops / b - 1) > 0.05 for b in module.BUDGETS), flops


def test_cpu_hour_follows_porians_recipe():
    members = config_lib.study_sweep(HOUR)
    assert len({config_lib.run_id(m) for m in members}) == len(members) == 24
    for member in members:
        shape = _budget(member)[0]
        assert member.train.b2 == 0.99
        assert member.train.warmup_steps <= max(5, member.train.steps // 20)
        warmup_tokens = member.train.warmup_steps * member.train.batch_size * shape.n_ctx
        assert warmup_tokens <= max(shape.n_params * 1.01, 5 * 16 * 256)
    by_size = sorted((_budget(m)[0].n_params, m.train.learning_rate) for m in members)
    rates = [lr for _, lr in by_size]
    assert rates == sorted(rates, reverse=True)  # a smaller peak for a larger model


def test_cpu_hour_lr_brackets_each_grid_member_and_reuses_the_main_sweeps_runs():
    module, _, _ = config_lib.load_study(HOUR)
    main = config_lib.study_sweep(HOUR)[len(module.PER_TOKEN_SIZES) :]
    ablation = config_lib.study_sweep(HOUR + ":lr")
    assert {m.sweep_name for m in ablation} == {"cpu_hour_lr"}
    ids = [config_lib.run_id(m) for m in ablation]
    assert len(set(ids)) == len(ids) == len(main) * len(module.LR_FACTORS) + module.SIZES_PER_BUDGET
    # the members at 1x are the main sweep's, so a store that holds them trains only the rest
    assert {config_lib.run_id(m) for m in main} <= set(ids)
    factors = {}  # each grid member (its config bar the rate) -> the factors it trains at
    for member in ablation:
        if member.train.b2 == 0.99:
            rule = learning_rate(_budget(member)[0].n_params_kaplan)
            factors.setdefault(config_lib.run_id(_without_lr(member)), []).append(
                member.train.learning_rate / rule
            )
    assert len(factors) == len(main)
    assert all(sorted(f) == pytest.approx(module.LR_FACTORS) for f in factors.values())
    beta2 = [m for m in ablation if m.train.b2 == module.BETA2_ABLATION]
    assert len(beta2) == module.SIZES_PER_BUDGET
    assert {abs(_budget(m)[2] / module.BUDGETS[1] - 1) < 0.01 for m in beta2} == {True}


def test_cpu_hour_tuned_is_the_main_sweep_with_the_grid_at_one_tuned_rate():
    module, _, _ = config_lib.load_study(HOUR)
    main = config_lib.study_sweep(HOUR)
    tuned = config_lib.study_sweep(HOUR + ":tuned")
    assert {m.sweep_name for m in tuned} == {"cpu_hour_tuned"} and len(tuned) == len(main)
    ladder = len(module.PER_TOKEN_SIZES)
    # the ladder is the main sweep's own runs; the grid differs in its rate only
    assert [config_lib.run_id(m) for m in tuned[:ladder]] == [
        config_lib.run_id(m) for m in main[:ladder]
    ]
    for ours, theirs in zip(tuned[ladder:], main[ladder:], strict=True):
        assert config_lib.run_id(_without_lr(ours)) == config_lib.run_id(_without_lr(theirs))
        steps = ours.train.steps
        assert ours.train.learning_rate == pytest.approx(module.tuned_learning_rate(steps))
        assert ours.train.learning_rate > theirs.train.learning_rate  # the rule was too low
    long_runs = [m for m in tuned[ladder:] if m.train.steps >= module.TUNED_FULL_STEPS]
    rates = {m.train.learning_rate for m in long_runs}
    assert rates == {module.TUNED_LR}  # one rate for every size, once a run is long enough


def test_cpu_hour_warmup_pairs_the_tuned_middle_budget_with_a_long_warmup():
    module, _, _ = config_lib.load_study(HOUR)
    tuned = {config_lib.run_id(m) for m in config_lib.study_sweep(HOUR + ":tuned")}
    members = config_lib.study_sweep(HOUR + ":warmup")
    half = len(members) // 2
    assert half == module.SIZES_PER_BUDGET
    recipe, long = members[:half], members[half:]
    assert {config_lib.run_id(m) for m in recipe} <= tuned  # :tuned's own runs
    for short, slow in zip(recipe, long, strict=True):
        assert abs(_budget(short)[2] / module.BUDGETS[1] - 1) < 0.01
        assert short.train.warmup_steps < slow.train.warmup_steps <= slow.train.steps // 4
        slow = slow.copy_and_resolve_references()
        slow.train.warmup_steps = short.train.warmup_steps
        assert config_lib.run_id(slow) == config_lib.run_id(short)  # nothing else differs


def _without_lr(member):
    member = member.copy_and_resolve_references()
    member.train.learning_rate = 0.0
    return member


@pytest.mark.parametrize("path", [ISOFLOP, "experiments/kaplan2020.py"])
def test_the_pod_studies_pass_their_own_design_checks(path, capsys):
    from launch.cli import main

    assert main(["check", path]) == 0
    out, err = capsys.readouterr()
    assert "design checks passed" in out and "warning" not in err, err
