"""The critical batch size and L(N, S_min), as in Kaplan et al. 2020, section 5.

From a sweep's eval points (loss L, gradient noise scale B_noise in tokens,
logged by the trainer as `noise_scale`):

1. fit B_crit(L) = B*/L^(1/alpha_B) (law `b_crit`) to the (L, B_noise)
   points, B_noise standing in for B_crit (McCandlish et al. 2018: B_crit
   ~ B_simple);
2. at every eval point, with the run's batch B (tokens), its step S and its
   tokens E, compute the steps and tokens the same loss would take at an
   ideal batch: S_min = S / (1 + B_crit(L)/B), E_min = E / (1 + B/B_crit(L));
3. fit Kaplan's L(N, S) (law `kaplan_ns`) with S_min for S.

Both fits are stored with what="critical-batch", so `scaling query` lists
B*, alpha_B and N_c, alpha_N, S_c, alpha_S with their intervals.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from scaling.errors import UserError
from scaling.fitting.fit import OPTIMIZER_DEFAULTS, fit
from scaling.fitting.laws import get_law
from scaling.store import FitRecord, Store, sweep_runs
from scaling.studies.provenance import save_fit_result

WHAT = "critical-batch"


@dataclasses.dataclass(frozen=True)
class EvalPoints:
    """Every usable eval point of a sweep, one entry per point (numpy arrays)."""

    run_id: np.ndarray
    n_params: np.ndarray  # Kaplan non-embedding N of the point's run
    step: np.ndarray
    loss: np.ndarray  # eval loss, nats per token
    noise_scale: np.ndarray  # B_noise, tokens
    batch_tokens: np.ndarray  # the run's batch, tokens per step
    tokens: np.ndarray  # tokens seen by this step


def eval_points(store: Store, runs) -> EvalPoints:
    """The points of finished runs past their warmup with a finite, positive noise scale.

    Warmup steps are left out: the noise scale's moving average and the loss
    are still in their initial transient there (Kaplan fits after it too).
    """
    columns = {
        k: []
        for k in ("run_id", "n_params", "step", "loss", "noise_scale", "batch_tokens", "tokens")
    }
    for run in runs:
        if run.status != "finished":
            continue
        steps, loss = store.scalars(run.run_id, "eval_loss")
        noise_steps, noise = store.scalars(run.run_id, "noise_scale")
        by_step = dict(zip(noise_steps.tolist(), noise.tolist(), strict=True))
        train = run.config.get("train", {})
        batch = train.get("batch_size", 0) * run.n_ctx
        warmup = train.get("warmup_steps", 0)
        for step, value in zip(steps.tolist(), loss.tolist(), strict=True):
            b_noise = by_step.get(step, float("nan"))
            if step <= warmup or not (np.isfinite(b_noise) and b_noise > 0 and value > 0):
                continue
            for key, v in (
                ("run_id", run.run_id),
                ("n_params", run.n_params),
                ("step", step),
                ("loss", value),
                ("noise_scale", b_noise),
                ("batch_tokens", batch),
                ("tokens", step * batch),
            ):
                columns[key].append(v)
    return EvalPoints(
        **{k: np.asarray(v, dtype=object if k == "run_id" else float) for k, v in columns.items()}
    )


def min_steps_and_tokens(b_crit, batch_tokens, steps, tokens):
    """(S_min, E_min): Kaplan et al. 2020, equations 5.4 and 5.5 (all in tokens)."""
    b_crit, batch = np.asarray(b_crit, float), np.asarray(batch_tokens, float)
    return (
        np.asarray(steps, float) / (1 + b_crit / batch),
        np.asarray(tokens, float) / (1 + batch / b_crit),
    )


def fit_critical_batch(
    store: Store, sweep: str, *, bootstrap: int = 200, objective: str = "huber", seed: int = 0
) -> list[FitRecord]:
    """Fit b_crit to the sweep's (L, B_noise) points, then kaplan_ns on (N, S_min); save both."""
    runs = sweep_runs(store, sweep)
    points = eval_points(store, runs)
    if len(points.loss) < 3:
        raise UserError(
            f"sweep {sweep!r} has {len(points.loss)} eval points with a noise "
            "scale past warmup; train it with train.noise_scale=true (the "
            "default) and let runs finish"
        )
    settings = {"objective": objective, "bootstrap": bootstrap, "seed": seed}
    selection = {"runs": sorted(set(points.run_id.tolist())), "points": len(points.loss)}

    b_crit_fit = fit(
        "b_crit",
        points.loss[:, None],
        points.noise_scale,
        bootstrap=bootstrap,
        objective=objective,
        seed=seed,
    )
    params = {k: float(v[0]) for k, v in b_crit_fit.params.items()}
    b_crit = get_law("b_crit").predict(params, points.loss)
    s_min, e_min = min_steps_and_tokens(
        np.asarray(b_crit), points.batch_tokens, points.step, points.tokens
    )
    if len(set(points.n_params.tolist())) < 2:
        raise UserError(f"sweep {sweep!r} has one model size; L(N, S_min) needs several")
    ns_fit = fit(
        "kaplan_ns",
        np.stack([points.n_params, s_min], axis=1),
        points.loss,
        bootstrap=bootstrap,
        objective=objective,
        seed=seed,
    )
    ranges = {
        "S_min": [float(s_min.min()), float(s_min.max())],
        "E_min": [float(e_min.min()), float(e_min.max())],
    }
    optimizer = {**settings, **OPTIMIZER_DEFAULTS}
    every = np.ones((1, len(points.loss)), bool)
    return [
        save_fit_result(
            store,
            result,
            0,
            sweep=sweep,
            what=WHAT,
            label=curve,
            selection={**selection, **ranges},
            settings=settings,
            x=x[None],
            y=y[None],
            mask=every,
            run_ids=points.run_id.tolist(),
            fit_settings=optimizer,
            convention=None,
        )
        for result, curve, x, y in (
            (b_crit_fit, "L -> B_noise", points.loss[:, None], points.noise_scale),
            (ns_fit, "N, S_min", np.stack([points.n_params, s_min], axis=1), points.loss),
        )
    ]
