"""The stages of ``prune-heads run``: one short declaration each, calling the same stage functions as the CLI.

calibrate -> select -> export -> verify -> evaluate -> report (-> push). Each declaration says what its
output depends on (``key``: recipe sections, signatures of the local files it reads) and which stages it
reads (``needs``); the generic ``Runner`` does the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.pipeline.recipe import Recipe, dump_recipe, load_recipe
from prune_heads.pipeline.runner import Runner, Stage, locked_workdir
from prune_heads.pipeline.signatures import (
    data_signature,
    local_data_path,
    local_model_path,
    model_signature,
    signature_cache,
    task_signature,
)
from prune_heads.pipeline.summary import Summary, build_summary


@dataclass
class RunContext:
    """The recipe, the work directory and what earlier stages produced, shared by the stage declarations."""

    recipe: Recipe
    workdir: Path
    runner: Runner
    progress: bool = True
    push: bool = False
    _loaded: Any = field(default=None, repr=False)
    _streamed: Any = field(default=None, repr=False)

    def model(self) -> Any:
        """The original model and tokenizer, loaded once and only when a stage needs them."""
        if self._loaded is None:
            self._loaded = self.recipe.model.load()
        return self._loaded

    def model_for(self, engine: str) -> Any:
        """The original loaded for ``engine``: whole (shared with the other stages) or as a streamed skeleton."""
        if engine != "sequential":
            return self.model()
        if self._streamed is None:
            from prune_heads.model.sequential_engine import load_streamed

            self._streamed = load_streamed(self.recipe.model)
        return self._streamed

    def dir(self, stage: str) -> Path:
        return self.workdir / stage

    def outputs(self, stage: str) -> dict[str, Any]:
        o = self.runner.outcomes.get(stage)
        return o.outputs if o is not None else {}

    def scores(self) -> Any:
        from prune_heads.scoring.head_scores import HeadScores

        return HeadScores.load(self.dir("calibrate") / "scores")

    def plan(self) -> Any:
        from prune_heads.plan import Plan

        return Plan.load(self.dir("select") / "plan.json")

    def export_dir(self) -> Path:
        return self.dir("export") / "model"


# ---- stage bodies -----------------------------------------------------------------------------
def _calibrate(ctx: RunContext, out: Path) -> dict[str, Any]:
    from prune_heads.scoring.stage import calibrate_engine, run_calibrate, run_calibrate_sequential

    m = ctx.recipe.model
    if ctx._loaded is None and calibrate_engine(ctx.recipe.calibration, m) == "sequential":
        res = run_calibrate_sequential(ctx.recipe.calibration, m, m.id, out / "scores", progress=ctx.progress)
    else:
        res = run_calibrate(ctx.recipe.calibration, ctx.model(), m.id, out / "scores", revision=m.revision,
                            progress=ctx.progress)
    return {**res.to_dict(), "scores": "scores", "data": ctx.recipe.calibration.data_now()}


def _select(ctx: RunContext, out: Path) -> dict[str, Any]:
    from prune_heads.selection.stage import plot_search, run_select, select_engine

    engine = "memory" if ctx._loaded is not None else select_engine(ctx.recipe.select, ctx.recipe.model)
    plan = run_select(ctx.recipe.select, ctx.model_for(engine), ctx.scores(), out / "plan.json", model_id=ctx.recipe.model.id,
                      recipe=ctx.recipe.name, progress=ctx.progress,
                      keep_unverified=ctx.workdir / "plan.unverified.json")  # the stage's own folder is discarded
    plot_search(plan, out / "search.png")
    s = plan.selection
    return {"plan": "plan.json", "heads_removed": len(plan.removed_heads), "heads_total": s.heads_total,
            "method": s.method}


def _export(ctx: RunContext, out: Path) -> dict[str, Any]:
    from prune_heads.export.stage import run_export

    res = run_export(ctx.recipe.export, ctx.recipe.model, ctx.plan(), out / "model", verify=None, progress=ctx.progress)
    # the card names its Hub repository when it is pushed (``run_push``), whichever front end pushes it
    return {"model": "model", "format": ctx.recipe.export.format, "params_before": int(res.params_before),
            "params_after": int(res.params_after), "files": sorted(Path(f).name for f in res.files)}


def _verify(ctx: RunContext, out: Path) -> dict[str, Any]:
    from prune_heads.errors import PruneHeadsError
    from prune_heads.export.model_card import refresh_card
    from prune_heads.export.stage import run_verify
    from prune_heads.io_utils import write_json_atomic

    res = run_verify(ctx.recipe.verify, ctx.recipe.model, ctx.export_dir(), ctx.plan())
    write_json_atomic(out / "verification.json", res.record)
    refresh_card(ctx.export_dir(), verification=res.record)  # the card says what this stage checked
    if not res.acceptable:
        raise PruneHeadsError(
            f"the exported model differs from the masked original by {res.max_abs_logit_diff:.3g} > {res.tolerance:g} "
            f"(details in {ctx.dir('verify')}); the export is kept in {ctx.dir('export')} for inspection")
    return {"verification": "verification.json", **{k: res.record[k] for k in ("max_abs_logit_diff", "tolerance", "passed")}}


def _evaluate(ctx: RunContext, out: Path) -> dict[str, Any]:
    import dataclasses

    from prune_heads.evaluation.stage import evaluate_export

    cfg = dataclasses.replace(ctx.recipe.evaluate, tasks=ctx.recipe.eval_tasks())
    # ppl:/kl: tasks leave out the calibration documents the plan records (as `eval --plan` does)
    from prune_heads.evaluation.stage import evaluate_engine

    engine = "memory" if ctx._loaded is not None else evaluate_engine(cfg, ctx.recipe.model)
    res = evaluate_export(cfg, ctx.model_for(engine), ctx.recipe.model.id, ctx.export_dir(), out / "results.json",
                          plan=ctx.plan())
    return {"results": "results.json", "tasks": len(res.tasks)}


def _report(ctx: RunContext, out: Path) -> dict[str, Any]:
    from prune_heads.report.stage import run_report

    run_report(ctx.recipe.report, ctx.scores(), out / "plots", plan=ctx.plan())
    return {"report": "plots/report.md"}


def _push(ctx: RunContext, out: Path) -> dict[str, Any]:
    from prune_heads.io_utils import write_json_atomic
    from prune_heads.publish.stage import run_push

    res = run_push(ctx.recipe.hub, ctx.export_dir())
    write_json_atomic(out / "push.json", res.to_dict())
    return res.to_dict()


# ---- declarations -----------------------------------------------------------------------------
def _section(name: str) -> Callable[[RunContext], Any]:
    return lambda ctx: _same_result(getattr(ctx.recipe, name).to_dict())


def _same_result(section: dict[str, Any]) -> dict[str, Any]:
    """A section without ``engine``: the whole-model and layer-by-layer paths give the same result, so
    switching between them (or letting ``auto`` pick another on a machine with more memory) reruns nothing."""
    return {k: v for k, v in section.items() if k != "engine"}


def stages() -> list[Stage]:
    return [
        Stage("calibrate", _calibrate, lambda ctx: {
            "model": ctx.recipe.model.identity(), "model_files": model_signature(ctx.recipe.model),
            "calibration": _same_result(ctx.recipe.calibration.to_dict()), "data": data_signature(ctx.recipe.calibration.data_now())}),
        Stage("select", _select, lambda ctx: {
            "select": _same_result(ctx.recipe.select.to_dict()), "tasks": [task_signature(t) for t in _select_tasks(ctx.recipe)],
            "data": data_signature(ctx.recipe.select.data) if ctx.recipe.select.data else None},
            needs=("calibrate",)),
        Stage("export", _export, lambda ctx: {"export": ctx.recipe.export.to_dict(),
                                              "model_files": model_signature(ctx.recipe.model)}, needs=("select",)),
        Stage("verify", _verify, _section("verify"), needs=("export",),
              skip=lambda ctx: None if ctx.recipe.verify.enabled else "verify.enabled is false"),
        Stage("evaluate", _evaluate, lambda ctx: {
            "evaluate": _same_result(ctx.recipe.evaluate.to_dict()), "tasks": [t.to_dict() for t in ctx.recipe.eval_tasks()],
            "task_files": [task_signature(t.task) for t in ctx.recipe.eval_tasks()]}, needs=("export",)),
        Stage("report", _report, _section("report"), needs=("calibrate", "select"),
              skip=lambda ctx: None if ctx.recipe.report.enabled else "report.enabled is false"),
        Stage("push", _push, _section("hub"), needs=("export",),
              skip=lambda ctx: None if ctx.push else "no --push"),
    ]


STAGES: tuple[str, ...] = tuple(s.name for s in stages())


def _select_tasks(recipe: Recipe) -> list[str]:
    return [t for t in (recipe.select.task, recipe.select.verify_task, *recipe.select.guard_tasks()) if t]


# ---- entry point ------------------------------------------------------------------------------
def run(recipe_or_path: Recipe | str | os.PathLike | Mapping[str, Any], workdir: str | os.PathLike | None = None,
        overrides: Iterable[str] | Mapping[str, Any] | None = None, *, force: bool = False, push: bool | None = None,
        stop_after: str | None = None, progress: bool = True, echo: Callable[[str], None] | None = print
        ) -> Summary | None:
    """Run (or resume) a recipe in ``workdir`` (default ``runs/<name>``) and return its ``Summary``.

    Under ``torchrun``/``accelerate launch`` every process shares the calibration pass and rank 0 does the
    rest; the other processes return None.

    Args:
        recipe_or_path: a recipe YAML path, a mapping, or a ``Recipe``.
        overrides: ``["select.limit=50", ...]`` or ``{"select.limit": 50}``, applied before validation.
        force: rerun every stage even when its inputs are unchanged.
        push: push to ``hub.repo_id`` at the end (default: the recipe's ``hub.push``).
        stop_after: stop once this stage is done (the next call continues from there).
        echo: where stage progress lines go (``None`` for silence).
    """
    from prune_heads.errors import PruneHeadsError
    from prune_heads.pipeline.preflight import check_inputs

    recipe = load_recipe(recipe_or_path, overrides)
    do_push = recipe.hub.push if push is None else push
    if do_push and not recipe.hub.repo_id:
        raise PruneHeadsError("--push needs a Hub target: set hub.repo_id in the recipe or --set hub.repo_id=NAME/REPO")
    from prune_heads.pipeline.distributed import (
        follow_calibration,
        join_process_group,
        share_calibration_decision,
    )

    rank = join_process_group(recipe.model)
    if rank > 0:  # other processes of `torchrun ... run` only help calibrate; rank 0 owns the work directory
        return follow_calibration(recipe, progress=False)
    runner = Runner(stages(), force=force, stop_after=stop_after, echo=echo)
    with share_calibration_decision() as decide:
        check_inputs(recipe)
        inputs = (local_model_path(recipe.model), local_data_path(recipe.calibration.data_now()),
                  recipe_or_path if isinstance(recipe_or_path, (str, os.PathLike)) else None)
        with locked_workdir(workdir or Path("runs") / recipe.name, inputs) as wd, signature_cache(wd):
            from prune_heads.pipeline.preflight import check_memory

            check_memory(recipe, echo)  # before any stage: each one's estimated peak, and what cannot fit at all
            for stale in ("summary.md", "summary.json"):
                (wd / stale).unlink(missing_ok=True)
            (wd / "recipe.yaml").write_text(dump_recipe(recipe))
            ctx = RunContext(recipe, wd, runner, progress=progress, push=do_push)
            decide(runner.would_run(stages()[0], ctx, wd))
            complete = runner.run(ctx, wd)
            summary = build_summary(recipe, wd, runner.outcomes, complete)
            if complete:
                from prune_heads.io_utils import write_json_atomic

                (wd / "summary.md").write_text(summary.to_markdown())
                write_json_atomic(wd / "summary.json", summary.to_dict())
            return summary
