"""The lines the commands print about their results (kept out of the stages, which return typed results)."""

from __future__ import annotations

from typing import Any


def plan_line(plan: Any, out: Any) -> str:
    """The one line ``select`` prints."""
    s = plan.selection
    fixed = getattr(s.details, "fixed", False)
    msg = f"{s.method}{' (fixed count, no budget)' if fixed else ''}: removing {len(plan.removed_heads)} of " \
          f"{s.heads_total} heads"
    if s.baseline and s.result:
        msg += f"; {s.baseline['metric']} {s.baseline['value']:.4f} -> {s.result['value']:.4f} on the search split"
    if s.compensated:
        msg += f" (compensated: {s.compensation['mode']}{', sequential' if s.compensation.get('sequential') else ''})"
    v = s.verification
    if v is not None:
        verdict = v.verdict or ("within" if v.within_budget else "OUTSIDE")
        msg += f"; held out {v.baseline['value']:.4f} -> {v.result['value']:.4f} " + \
            ("(measured)" if fixed else f"({verdict} budget)")
        if s.accepted_unverified:
            msg += ", ACCEPTED UNVERIFIED"
    for g in s.guards:
        if not g.result:
            continue
        where = f" at {g.seq_len} tokens" if g.seq_len else ""
        msg += (f"; guard {(g.task or {}).get('task')}{where} {g.baseline['value']:.4f} -> {g.result['value']:.4f} "
                f"({'within' if g.within_budget else 'OUTSIDE'} budget"
                f"{f', refused {len(g.refused)} probe(s)' if g.refused else ''})")
    if s.cost.evaluations:
        msg += f"; {s.cost.evaluations} evaluations"
    return f"{msg} -> {out}"


__all__ = ["plan_line"]
