"""Pinned parameters and sensitivity: how the exponents move when one parameter is held.

`scaling fit ... --fix E=1.69` pins a parameter; `--sensitivity E=1.5:2.0:11`
refits across 11 values of E from 1.5 to 2.0.  All the refits are one batched
fit: the data is repeated once per value, and the pinned parameter takes one
value per curve.
"""

from __future__ import annotations

import math

import numpy as np

from scaling.errors import UserError
from scaling.fitting.fit import fit
from scaling.fitting.laws import get_law


def parse_fix(items: list[str] | None) -> dict[str, float]:
    """`["E=1.69", "A=400,B=400"]` -> {"E": 1.69, "A": 400.0, "B": 400.0}."""
    fixed = {}
    for item in items or []:
        for part in item.split(","):
            name, eq, value = part.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not eq or not name.strip() or not math.isfinite(number):
                raise UserError(
                    f"--fix {part!r} must look like NAME=VALUE with a finite number, "
                    "e.g. --fix E=1.69"
                )
            fixed[name.strip()] = number
    return fixed


def parse_range(text: str) -> tuple[str, np.ndarray]:
    """`"E=1.5:2.0:11"` -> ("E", 11 evenly spaced values from 1.5 to 2.0)."""
    name, eq, spec = text.partition("=")
    parts = spec.split(":")
    try:
        low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
        ok = (
            eq
            and name.strip()
            and len(parts) == 3
            and math.isfinite(low)
            and math.isfinite(high)
            and low < high
            and count >= 2
        )
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise UserError(
            f"--sensitivity {text!r} must look like NAME=LOW:HIGH:COUNT with "
            "LOW < HIGH and COUNT >= 2, e.g. E=1.5:2.0:11"
        )
    return name.strip(), np.linspace(low, high, count)


def sensitivity(
    law,
    x,
    y,
    mask,
    name: str,
    values,
    *,
    fixed: dict | None = None,
    objective: str = "huber",
    seed: int = 0,
    varpro: bool = False,
) -> dict:
    """Refit every curve of (x, y, mask) with `name` pinned at each of `values`.

    x [C, P, n_inputs], y [C, P], mask [C, P].  Returns {"param", "values",
    "fits": [value][curve] -> the curve's JSON dict}.
    """
    law = get_law(law)
    fixed = dict(fixed or {})
    if name in fixed:
        raise UserError(f"{name} is both pinned (--fix) and varied (--sensitivity); drop one")
    if name not in law.param_names:
        raise UserError(
            f"--sensitivity names {name!r}, not a parameter of law {law.name!r} {law.param_names}"
        )
    values = np.asarray(values, float)
    n_values, n_curves = len(values), len(y)
    repeat = lambda a: np.concatenate([np.asarray(a)] * n_values)  # noqa: E731
    pinned = {
        **{k: np.full(n_values * n_curves, v) for k, v in fixed.items()},
        name: np.repeat(values, n_curves),
    }
    result = fit(
        law,
        repeat(x),
        repeat(y),
        repeat(mask),
        objective=objective,
        seed=seed,
        fixed=pinned,
        varpro=varpro,
    )
    fits = [[result.curve(v * n_curves + c) for c in range(n_curves)] for v in range(n_values)]
    return {"param": name, "values": values.tolist(), "fits": fits}


def sensitivity_table(out: dict, labels: list[str] | None = None) -> str:
    """One line per pinned value (and curve): the other parameters and the objective."""
    lines = [f"sensitivity to {out['param']}:"]
    for value, curves in zip(out["values"], out["fits"], strict=True):
        for c, curve in enumerate(curves):
            label = f" {labels[c]}" if labels and len(curves) > 1 else ""
            cells = "  ".join(
                f"{k}={v:.4g}" for k, v in curve["params"].items() if k != out["param"]
            )
            flag = "" if curve["converged"] else "  (not converged)"
            lines.append(
                f"  {out['param']}={value:<8.4g}{label}  {cells}  "
                f"objective={curve['objective']:.4g}{flag}"
            )
    return "\n".join(lines)
