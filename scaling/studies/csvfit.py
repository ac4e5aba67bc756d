"""Fit a law to the rows of any CSV file: one curve, one JSON-ready dict.

    fit_csv("chinchilla_fig4_epoch.csv", "chinchilla",
            ["Model Size", "[Training FLOP] / (6 * [Model Size])"], "loss",
            exclude_top=5, bootstrap=1000)

Each x column is a column name, or arithmetic (+ - * / **, parentheses,
numbers) over column names in square brackets, so an input the file lacks
can be computed from the ones it has (above: D = C / 6N).  Every value used
must be a number; rows are all used, except the `exclude_top` with the
highest y.
"""

from __future__ import annotations

import ast
import csv
import operator
import re
from pathlib import Path

import numpy as np

from scaling.errors import UserError
from scaling.fitting.fit import fit
from scaling.fitting.laws import get_law

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
}
_BRACKETED = re.compile(r"\[([^\]]+)\]")
# The fitter's search runs in float32: past this, powers of the losses overflow and a fit
# can report convergence on a wrong answer. Inputs (x) go further: the fitter rescales
# inputs far from 1 itself (scaling.fitting.fit.RESCALE_BEYOND), short of float64's end.
MAX_MAGNITUDE = 1e30
MAX_INPUT = 1e300
MAX_EXPRESSION = 1000


def fit_csv(
    path,
    law_name: str,
    x_cols: list[str],
    y_col: str,
    *,
    bootstrap: int = 0,
    objective: str = "huber",
    fixed: dict | None = None,
    exclude_top: int = 0,
    seed: int = 0,
    varpro: bool = False,
    keep_starts: int | None = None,
) -> dict:
    """Fit `law_name` to y_col against x_cols of the CSV at `path`.

    Returns {"law", "params": {name: value}, "intervals": {name: [low, high]}
    (empty without bootstrap), "objective", "converged", "n_points"}, plus
    "derived" and "derived_intervals" for laws with derived quantities
    (chinchilla: a, b).  Values are natural units; see `scaling.fitting.fit.fit`.
    """
    x, y = csv_arrays(path, law_name, x_cols, y_col, exclude_top)
    result = fit(
        law_name,
        x,
        y,
        bootstrap=bootstrap,
        objective=objective,
        fixed=fixed,
        seed=seed,
        varpro=varpro,
        keep_starts=keep_starts,
    )
    out = result.curve(0)
    if result.varpro is not None:
        out["varpro"] = {
            "objective": float(result.varpro["objective"][0]),
            "n_starts": result.varpro["n_starts"],
            "n_starts_converged": int(result.varpro["n_starts_converged"][0]),
        }
    return out


def csv_arrays(path, law_name: str, x_cols: list[str], y_col: str, exclude_top: int = 0):
    """The rows `fit_csv` fits: x [n, n_inputs], y [n]."""
    law = get_law(law_name)
    if len(x_cols) != law.n_inputs:
        raise UserError(
            f"law {law.name!r} ({law.formula}) takes {law.n_inputs} x column(s), "
            f"got {len(x_cols)}: {x_cols}"
        )
    rows, columns = _read(Path(path))
    y = _column(rows, columns, y_col, path, MAX_MAGNITUDE)
    x = np.stack([_column(rows, columns, spec, path, MAX_INPUT) for spec in x_cols], axis=1)
    if int(exclude_top) != exclude_top or not 0 <= exclude_top < len(y):
        raise UserError(
            f"exclude_top = {exclude_top} must be a whole number from 0 to "
            f"{len(y) - 1} (the file has {len(y)} rows)"
        )
    keep = np.sort(np.argsort(y, kind="stable")[: len(y) - exclude_top])
    return x[keep], y[keep]


def _read(path: Path) -> tuple[list[dict], list[str]]:
    if not path.is_file():
        raise UserError(f"no CSV file at {path}; check the path")
    try:
        # utf-8-sig: a byte-order mark (as spreadsheets write) is not part of the first name.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as e:
        raise UserError(f"{path} is not a readable CSV file ({e})") from None
    if not rows:
        raise UserError(f"{path} has no data rows; it needs a header line and one row per point")
    for i, row in enumerate(rows):
        # DictReader files extra fields under None and fills missing ones with None.
        if None in row or None in row.values():
            n = len(row.get(None) or []) + sum(v is not None for k, v in row.items() if k)
            raise UserError(
                f"{path}, data row {i + 1} has {n} fields but the header has "
                f"{len(columns)}; decimal commas (1,5) split a number in two: "
                "write decimals with '.'"
            )
    return rows, columns


def _column(rows, columns, spec: str, path, limit: float) -> np.ndarray:
    """Values of one column name or bracketed expression, one per row."""
    names = _BRACKETED.findall(spec) if spec not in columns else [spec]
    missing = [n for n in names or [spec] if n not in columns]
    if missing:
        raise UserError(
            f"{path} has no column {missing[0]!r}; its columns are {columns} "
            "(write expressions as e.g. '[Training FLOP] / (6 * [Model Size])')"
        )
    if spec in columns:
        return np.array([_number(row, spec, i, path, limit) for i, row in enumerate(rows)])
    if len(spec) > MAX_EXPRESSION:
        raise UserError(
            f"x column expression is {len(spec):,} characters long; keep it under "
            f"{MAX_EXPRESSION:,} (compute long inputs into a column of the file)"
        )
    variables = {f"_{j}": n for j, n in enumerate(dict.fromkeys(names))}
    source = spec
    for var, name in variables.items():
        source = source.replace(f"[{name}]", var)
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, RecursionError):
        raise UserError(
            f"cannot read x column {spec!r}: give a column name or arithmetic "
            "over [bracketed] column names"
        ) from None
    values = np.array(
        [
            _evaluate(
                tree,
                {var: _number(row, name, i, path, limit) for var, name in variables.items()},
                spec,
            )
            for i, row in enumerate(rows)
        ]
    )
    bad = np.flatnonzero(~(np.abs(values) <= limit))
    if len(bad):
        raise UserError(
            f"{path}, data row {bad[0] + 1}: x column {spec!r} evaluates to "
            f"{values[bad[0]]:g}, outside +-{limit:g}; rescale its inputs"
        )
    return values


def _number(row, name, index, path, limit: float) -> float:
    try:
        value = float(row[name])
    except (TypeError, ValueError):
        raise UserError(
            f"{path}, data row {index + 1}: column {name!r} holds {row[name]!r}, "
            "not a number; fix or remove the row"
        ) from None
    if not abs(value) <= limit:  # also NaN and inf
        raise UserError(
            f"{path}, data row {index + 1}: column {name!r} holds {row[name]!r}, "
            f"outside +-{limit:g}, which the fitter cannot represent; "
            "rescale the column (e.g. FLOPs in units of 1e18)"
        )
    return value


def _evaluate(node, values: dict, spec: str) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id in values:
        return values[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left, values, spec), _evaluate(node.right, values, spec)
        with np.errstate(all="ignore"):
            return float(_OPERATORS[type(node.op)](np.float64(left), np.float64(right)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return -_evaluate(node.operand, values, spec)
    raise UserError(
        f"x column {spec!r} may only use numbers, [bracketed] column names, "
        "+ - * / ** and parentheses"
    )
