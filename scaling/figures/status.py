"""Tables of what the store holds: run status, for people (text) and programs (JSON)."""

from __future__ import annotations

from scaling.store import Store


def status_rows(store: Store, sweep: str | None = None) -> list[dict]:
    """One dict per run: run_id, status, step, eval_loss (last), and the run's size."""
    rows = []
    for run in store.runs(sweep):
        last = store.last_eval(run.run_id)
        rows.append(
            {
                "run_id": run.run_id,
                "sweep": run.config.get("sweep_name"),
                "status": run.status,
                "step": run.step,
                "steps": run.config["train"]["steps"],
                "eval_loss": None if last is None else last[1],
                "n_params": run.n_params,
                "tokens": run.tokens,
                "reason": run.reason,
            }
        )
    return rows


def status_table(rows: list[dict]) -> str:
    if not rows:
        return "no runs in this store"
    lines = [
        f"{'run_id':<13}{'sweep':<14}{'status':<10}{'step':>12}{'eval_loss':>11}"
        f"{'N':>12}{'tokens':>12}  reason"
    ]
    for r in rows:
        loss = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        lines.append(
            f"{r['run_id']:<13}{(r['sweep'] or '-')[:13]:<14}{r['status']:<10}"
            f"{str(r['step']) + '/' + str(r['steps']):>12}{loss:>11}{r['n_params']:>12,}"
            f"{r['tokens']:>12,}  {' '.join((r['reason'] or '').split())}"  # one line a run
        )
    return "\n".join(lines)
