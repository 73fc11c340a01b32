"""``prune-heads report``: figures and a markdown summary of one scores file, or a comparison of two."""

from __future__ import annotations

import click

from prune_heads.cli.options import check_output, output_option
from prune_heads.report.stage import ReportConfig
from prune_heads.schema import click_options


@click.command()
@click.argument("scores_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click_options(ReportConfig)
@click.option("--plan", "plan_path", default=None, type=click.Path(exists=True, dir_okay=False), help="Mark this plan's heads in the heatmaps.")
@click.option("--compare", is_flag=True, help="Compare two scores files A B (Wasserstein-1 per score, per-head differences).")
@click.option("--labels", default=None, help="With --compare: two comma-separated names for A and B.")
@output_option("Report directory to write.")
def report(scores_dirs, plan_path, compare, labels, output, overwrite, **kw):
    """Write heatmaps, distributions, threshold and overlap tables of SCORES_DIR to a report directory.

    With --compare, give two scores directories A B instead.
    """
    from prune_heads.errors import PruneHeadsError
    from prune_heads.plan import Plan
    from prune_heads.report import write_compare
    from prune_heads.report.stage import run_report
    from prune_heads.schema import from_cli
    from prune_heads.scoring.head_scores import HeadScores

    cfg = from_cli(ReportConfig, kw)
    check_output(output, overwrite, inputs=(*scores_dirs, plan_path))
    if compare and len(scores_dirs) != 2:
        raise PruneHeadsError(f"--compare needs two scores directories A B, got {len(scores_dirs)}")
    if not compare and len(scores_dirs) != 1:
        raise PruneHeadsError(f"give one scores directory (or two with --compare), got {len(scores_dirs)}")
    pair = tuple(s.strip() for s in labels.split(",")) if labels else None
    if pair is not None and (not compare or len(pair) != 2):
        raise PruneHeadsError("--labels takes two comma-separated names (e.g. base,instruct) and only with --compare")
    hs = [HeadScores.load(d) for d in scores_dirs]
    if compare:
        out = write_compare(hs[0], hs[1], output, score_ids=cfg.scores, fraction=cfg.fraction, labels=pair,
                            overwrite=overwrite)
        click.echo(f"comparison -> {out / 'compare.md'}")
        return
    out = run_report(cfg, hs[0], output, plan=Plan.load(plan_path) if plan_path else None, overwrite=overwrite)
    click.echo(f"report -> {out / 'report.md'}")
