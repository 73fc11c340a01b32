"""``prune-heads report``: figures and a markdown summary of one scores file, or a comparison of two."""

from __future__ import annotations

import click


@click.command()
@click.argument("scores_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(), help="Report directory to write.")
@click.option("--scores", "score_ids", default=None,
              help="Comma-separated score ids (default: awft, ahon_ln, lthon_ln, aeqd_ln and grad/ablation scores present).")
@click.option("--fraction", default=0.1, show_default=True, type=float,
              help="Fraction of heads in each inactive set (overlap tables, per-layer counts).")
@click.option("--compare", is_flag=True, help="Compare two scores files A B (Wasserstein-1 per score, per-head differences).")
@click.option("--labels", default=None, help="With --compare: two comma-separated names for A and B.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def report(scores_dirs, output, score_ids, fraction, compare, labels, overwrite):
    """Write heatmaps, distributions, threshold and overlap tables of SCORES_DIR to a report directory.

    With --compare, give two scores directories A B instead.
    """
    from prune_heads.errors import PruneHeadsError
    from prune_heads.io_utils import check_output_dir
    from prune_heads.report import write_compare, write_report
    from prune_heads.scoring.head_scores import HeadScores

    check_output_dir(output, overwrite)
    ids = [s.strip() for s in score_ids.split(",") if s.strip()] if score_ids else None
    if compare:
        if len(scores_dirs) != 2:
            raise PruneHeadsError(f"--compare needs two scores directories A B, got {len(scores_dirs)}")
        pair = tuple(s.strip() for s in labels.split(",")) if labels else None
        if pair is not None and len(pair) != 2:
            raise PruneHeadsError("--labels needs two comma-separated names, e.g. --labels base,instruct")
        a, b = HeadScores.load(scores_dirs[0]), HeadScores.load(scores_dirs[1])
        out = write_compare(a, b, output, score_ids=ids, fraction=fraction, labels=pair, overwrite=overwrite)
        if (a.num_layers, a.num_heads) != (b.num_layers, b.num_heads):
            click.echo(f"note: different head grids ({a.num_layers}x{a.num_heads} vs {b.num_layers}x{b.num_heads}); "
                       "only the pooled per-score distances were compared", err=True)
        click.echo(f"comparison -> {out / 'compare.md'}")
        return
    if len(scores_dirs) != 1:
        raise PruneHeadsError(f"give one scores directory (or two with --compare), got {len(scores_dirs)}")
    if labels:
        raise PruneHeadsError("--labels only applies with --compare")
    out = write_report(HeadScores.load(scores_dirs[0]), output, score_ids=ids, fraction=fraction, overwrite=overwrite)
    click.echo(f"report -> {out / 'report.md'}")
