"""The resumable end-to-end run: calibrate -> select -> export -> verify -> evaluate -> report -> push.

Each stage writes into ``WORKDIR/<stage>/`` through ``atomic_dir`` and finishes with a ``stage.json``
that holds a hash of everything the stage's output depends on: its recipe section, the hashes of the
stages it reads, and the tool version. A rerun skips a stage whose recorded hash matches, so an
interrupted run continues where it stopped and a changed input reruns exactly the stages downstream
of it. Because a downstream hash contains the upstream hashes, a stale stage directory can never be
mistaken for a current one, and because each directory is renamed into place whole, no directory
ever mixes outputs of different inputs.

A work directory is marked with ``.prune-heads-workdir.json``; a non-empty directory without the
marker is refused rather than written into.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.__about__ import __version__
from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import atomic_dir, write_json_atomic
from prune_heads.pipeline.recipe import EvalTaskSection, Recipe, dump_recipe, load_recipe

MARKER = ".prune-heads-workdir.json"
LOCK = ".prune-heads.lock"
STAGE_FILE = "stage.json"
STAGES: tuple[str, ...] = ("calibrate", "select", "export", "verify", "evaluate", "report", "push")


class WorkdirError(PruneHeadsError):
    """The work directory cannot be used (unwritable, foreign, or busy)."""


# ---- results ---------------------------------------------------------------------------------
@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "cached" | "skipped"
    hash: str | None = None
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    """What a run produced; ``to_markdown()`` is the table printed at the end and kept in summary.md."""

    recipe: str
    model: str
    workdir: str
    complete: bool
    stages: dict[str, str] = field(default_factory=dict)
    heads_total: int | None = None
    heads_removed: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # {task, split, metric, baseline, pruned, ...}
    speed: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    export_dir: str | None = None
    plan: str | None = None
    report: str | None = None
    hub_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"# prune-heads run: {self.recipe}", "",
                 f"Model `{self.model}`; work directory `{self.workdir}`.", "",
                 "| | original | pruned | change |", "|---|---|---|---|"]
        for m in self.metrics:
            b, p = m.get("baseline") or {}, m.get("pruned") or {}
            label = f"{m['task']} {b.get('metric', p.get('metric', ''))} ({m.get('split', 'all')}, n={b.get('n', p.get('n', '?'))})"
            change = ""
            if b.get("value") is not None and p.get("value") is not None:
                change = f"{p['value'] - b['value']:+.4f}"
            lines.append(f"| {label} | {_fmt_metric(b)} | {_fmt_metric(p)} | {change} |")
        if self.heads_total is not None and self.heads_removed is not None:
            frac = self.heads_removed / self.heads_total if self.heads_total else 0.0
            lines.append(f"| attention heads | {self.heads_total} | {self.heads_total - self.heads_removed} | "
                         f"-{self.heads_removed} ({frac:.1%}) |")
        if self.params_before and self.params_after:
            d = self.params_before - self.params_after
            lines.append(f"| parameters | {self.params_before:,} | {self.params_after:,} | -{d:,} ({d / self.params_before:.2%}) |")
        if self.speed.get("original") and self.speed.get("pruned"):
            o, p = self.speed["original"], self.speed["pruned"]
            lines.append(f"| prefill tokens/s ({o['seq_len']} tokens, {o['device']}) | {o['tokens_per_s']:.0f} | "
                         f"{p['tokens_per_s']:.0f} | x{p['tokens_per_s'] / o['tokens_per_s']:.2f} |")
        lines.append("")
        if self.selection:
            s = self.selection
            lines.append(f"Selection: method `{s.get('method')}`, score `{s.get('score')}`, policy `{s.get('policy')}`, "
                         f"budget {s.get('budget')}, task `{s.get('task')}`.")
        if self.verification is not None:
            v = self.verification
            lines.append(f"Export check: max |logit difference| {v.get('max_abs_diff')} (tolerance {v.get('tol')}), "
                         f"{'passed' if v.get('passed') else 'NOT passed'}.")
        for key, label in (("export_dir", "Exported model"), ("plan", "Plan"), ("report", "Score report"),
                           ("hub_url", "Pushed to")):
            if getattr(self, key):
                lines.append(f"{label}: {getattr(self, key)}")
        lines.append("")
        lines.append("Stages: " + ", ".join(f"{k} {v}" for k, v in self.stages.items()))
        if not self.complete:
            lines.append("")
            lines.append("The run stopped early; rerun the same command to continue.")
        return "\n".join(lines) + "\n"


def _fmt_metric(r: Mapping[str, Any]) -> str:
    if not r or r.get("value") is None:
        return "-"
    s = f"{r['value']:.4f}"
    if r.get("stderr") is not None:
        s += f" ± {r['stderr']:.4f}"
    return s


# ---- work directory ----------------------------------------------------------------------------
def prepare_workdir(path: str | os.PathLike) -> Path:
    """Create or adopt ``path`` as a work directory; refuse unwritable and foreign directories."""
    wd = Path(path).expanduser()
    if wd.exists() and not wd.is_dir():
        raise WorkdirError(f"work directory {wd} exists and is a file; choose another -o WORKDIR")
    if wd.is_dir() and not (wd / MARKER).exists() and any(wd.iterdir()):
        raise WorkdirError(
            f"{wd} is not empty and was not made by `prune-heads run` (no {MARKER}); choose an empty or new -o WORKDIR "
            "so that nothing in it is overwritten"
        )
    try:
        wd.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=wd, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise WorkdirError(f"cannot write to work directory {wd} ({e.strerror or e}); choose a writable -o WORKDIR") from e
    if not (wd / MARKER).exists():
        write_json_atomic(wd / MARKER, {"tool": "prune-heads", "version": __version__,
                                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    for leftover in wd.iterdir():  # temp dirs of an interrupted stage (ours: the directory is marked)
        if leftover.name.startswith(".") and (".tmp-" in leftover.name or ".old-" in leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    return wd


@contextlib.contextmanager
def _locked(wd: Path) -> Iterator[None]:
    with open(wd / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise WorkdirError(f"another `prune-heads run` is using {wd}; wait for it or choose another -o WORKDIR") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def input_hash(obj: Any) -> str:
    text = json.dumps({"inputs": obj, "tool_version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_stage(wd: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((wd / name / STAGE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


# ---- the run -----------------------------------------------------------------------------------
class Pipeline:
    """One run of a recipe in a work directory; stage methods return the JSON outputs of their stage."""

    def __init__(self, recipe: Recipe, workdir: str | os.PathLike, *, force: bool = False, push: bool | None = None,
                 stop_after: str | None = None, progress: bool = True, echo: Callable[[str], None] | None = print) -> None:
        if stop_after is not None and stop_after not in STAGES:
            raise PruneHeadsError(f"--stop-after {stop_after!r}: choose one of {', '.join(STAGES)}")
        self.recipe = recipe
        self.workdir = Path(workdir)
        self.force = force
        self.push = recipe.hub.push if push is None else push
        if self.push and not recipe.hub.repo_id:
            raise PruneHeadsError("--push needs a Hub target: set hub.repo_id in the recipe or --set hub.repo_id=NAME/REPO")
        self.stop_after = stop_after
        self.progress = progress
        self.echo = echo or (lambda s: None)
        self.outcomes: dict[str, StageOutcome] = {}
        self._loaded: Any = None

    # -- helpers ---------------------------------------------------------------------------------
    def model(self) -> Any:
        """The original model and tokenizer, loaded once and only when a stage needs them."""
        if self._loaded is None:
            import torch

            from prune_heads.model.loading import load_model

            m = self.recipe.model
            device = m.device
            if device is None and m.device_map is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._loaded = load_model(m.id, dtype=m.dtype, device=device, device_map=m.device_map, gguf_file=m.gguf_file,
                                      revision=m.revision, trust_remote_code=m.trust_remote_code)
        return self._loaded

    def stage_dir(self, name: str) -> Path:
        return self.workdir / name

    def _hash_of(self, name: str) -> str:
        return self.outcomes[name].hash or ""

    def stage_inputs(self, name: str) -> dict[str, Any]:
        """Everything the stage's output depends on (device placement is left out: it only moves work)."""
        r = self.recipe
        model = {k: v for k, v in r.section("model").items() if k not in ("device", "device_map")}
        if name == "calibrate":
            cal = r.section("calibration")
            cal["data_used"] = r.calibration_data()
            cal["scores_used"] = self._calibration_scores()
            return {"model": model, "calibration": cal}
        if name == "select":
            return {"calibrate": self._hash_of("calibrate"), "select": r.section("select")}
        if name == "export":
            return {"select": self._hash_of("select"), "model": model, "export": r.section("export")}
        if name == "verify":
            e = r.export
            return {"export": self._hash_of("export"), "tol": e.verify_tol, "num_sequences": e.verify_num_sequences,
                    "seq_len": e.verify_seq_len}
        if name == "evaluate":
            return {"export": self._hash_of("export"), "tasks": [asdict(t) for t in self.eval_tasks()],
                    "evaluate": r.section("evaluate")}
        if name == "report":
            return {"calibrate": self._hash_of("calibrate"), "report": r.section("report")}
        if name == "push":
            return {"export": self._hash_of("export"), "hub": r.section("hub")}
        raise KeyError(name)

    def _enabled(self, name: str) -> str | None:
        """None when the stage runs, else why it is skipped."""
        if name == "verify" and not self.recipe.export.verify:
            return "export.verify is false"
        if name == "report" and not self.recipe.report.enabled:
            return "report.enabled is false"
        if name == "report":
            try:
                from prune_heads.report import write_report  # noqa: F401
            except ImportError:
                return "prune_heads.report is not available"
        if name == "push" and not self.push:
            return "no --push"
        return None

    def _calibration_scores(self) -> list[str] | None:
        from prune_heads.scoring.score_defs import ABLATION

        wanted = self.recipe.calibration.scores
        if wanted is None:
            return None
        s = self.recipe.select
        extra = [s.score] if s.method == "static" and s.score != "random" and s.score not in ABLATION else []
        return list(dict.fromkeys([*wanted, *extra]))

    def eval_tasks(self) -> list[EvalTaskSection]:
        if self.recipe.evaluate.tasks:
            return list(self.recipe.evaluate.tasks)
        s = self.recipe.select
        if s.verify_task:
            return [EvalTaskSection(task=s.verify_task, num_fewshot=s.num_fewshot, limit=s.verify_limit, split="all")]
        return [EvalTaskSection(task=s.task, num_fewshot=s.num_fewshot, limit=s.verify_limit or s.limit,
                                split="verify" if s.verify else "all")]

    # -- driver ----------------------------------------------------------------------------------
    def run(self) -> Summary:
        wd = prepare_workdir(self.workdir)
        with _locked(wd):
            for stale in ("summary.md", "summary.json"):
                (wd / stale).unlink(missing_ok=True)
            (wd / "recipe.yaml").write_text(dump_recipe(self.recipe))
            for name in STAGES:
                self._run_stage(name)
                if name == self.stop_after:
                    self.echo(f"stopped after {name} (--stop-after); rerun without it to continue")
                    return self.summary(complete=False)
            summary = self.summary(complete=True)
            (wd / "summary.md").write_text(summary.to_markdown())
            write_json_atomic(wd / "summary.json", summary.to_dict())
            return summary

    def _run_stage(self, name: str) -> StageOutcome:
        why = self._enabled(name)
        if why is not None:
            self.outcomes[name] = StageOutcome(name, "skipped")
            self.echo(f"[{name}] skipped ({why})")
            return self.outcomes[name]
        inputs = self.stage_inputs(name)
        h = input_hash(inputs)
        rec = read_stage(self.workdir, name)
        if not self.force and rec is not None and rec.get("hash") == h:
            self.outcomes[name] = StageOutcome(name, "cached", h, rec.get("seconds", 0.0), rec.get("outputs", {}))
            self.echo(f"[{name}] up to date ({self.stage_dir(name)})")
            return self.outcomes[name]
        self.echo(f"[{name}] running" + (" (inputs changed)" if rec is not None else ""))
        t0 = time.time()
        with atomic_dir(self.stage_dir(name), overwrite=True) as tmp:
            outputs = getattr(self, f"stage_{name}")(tmp)
            seconds = round(time.time() - t0, 2)
            write_json_atomic(tmp / STAGE_FILE, {"stage": name, "hash": h, "inputs": inputs, "tool_version": __version__,
                                                 "seconds": seconds, "outputs": outputs,
                                                 "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        self.outcomes[name] = StageOutcome(name, "ran", h, seconds, outputs)
        self.echo(f"[{name}] done in {seconds:.1f}s")
        return self.outcomes[name]

    # -- stages ----------------------------------------------------------------------------------
    def stage_calibrate(self, out: Path) -> dict[str, Any]:
        from prune_heads.data import DataSpec, iter_documents, tokenize_documents
        from prune_heads.scoring.calibrate import calibrate

        loaded = self.model()
        cal = self.recipe.calibration
        data = self.recipe.calibration_data()
        spec = DataSpec(source=data, num_samples=cal.num_samples, seq_len=cal.seq_len, seed=cal.seed)
        config = loaded.model.config
        ctx = getattr(getattr(config, "get_text_config", lambda: config)(), "max_position_embeddings", None)
        seqs = tokenize_documents(iter_documents(data), loaded.tokenizer, spec, ctx)
        hs = calibrate(loaded.model, seqs, scores=self._calibration_scores(), batch_size=cal.batch_size,
                       tokenizer=loaded.tokenizer, block_size=cal.block_size, progress=self.progress,
                       model_name=self.recipe.model.id, revision=self.recipe.model.revision)
        hs.meta["data"] = spec.to_dict()
        hs.save(out / "scores")
        write_json_atomic(out / "seqs.json", seqs)
        return {"scores": "scores", "data": data, "num_samples": len(seqs), "num_tokens": int(sum(map(len, seqs))),
                "score_ids": hs.score_ids}

    def _evaluator(self, model: Any, tokenizer: Any, task: str, *, limit: int | None, num_fewshot: int | None,
                   split: str, batch_size: int) -> Any:
        from prune_heads.evaluation import make_evaluator

        return make_evaluator(model, tokenizer, task, limit=limit, num_fewshot=num_fewshot, split=split,
                              batch_size=batch_size, seed=self.recipe.select.seed)

    def stage_select(self, out: Path) -> dict[str, Any]:
        from prune_heads.scoring.head_scores import HeadScores

        loaded = self.model()
        s = self.recipe.select
        cal_dir = self.stage_dir("calibrate")
        scores = HeadScores.load(cal_dir / "scores")
        seqs = json.loads((cal_dir / "seqs.json").read_text())
        pad_id = int(loaded.tokenizer.pad_token_id or 0)
        same_task_verify = s.verify and not s.verify_task
        ev = self._evaluator(loaded.model, loaded.tokenizer, s.task, limit=s.limit, num_fewshot=s.num_fewshot,
                             split="search" if same_task_verify else "all", batch_size=s.batch_size)
        verify_ev = None
        if s.verify_task:
            verify_ev = self._evaluator(loaded.model, loaded.tokenizer, s.verify_task, limit=s.verify_limit,
                                        num_fewshot=s.num_fewshot, split="all", batch_size=s.batch_size)
        elif s.verify:
            verify_ev = self._evaluator(loaded.model, loaded.tokenizer, s.task, limit=s.verify_limit or s.limit,
                                        num_fewshot=s.num_fewshot, split="verify", batch_size=s.batch_size)
        common = {"min_heads_per_layer": s.min_heads_per_layer, "allow_empty_layers": s.allow_empty_layers,
                  "progress": self.progress}
        if s.method == "static":
            from prune_heads.selection import select_static

            plan = select_static(loaded.model, scores, ev, score_id=s.score, max_drop=s.max_drop, relative=s.relative,
                                 policy=s.policy, verify_evaluator=verify_ev, **common)
        elif s.method == "iterative":
            from prune_heads.scoring.score_defs import ABLATION
            from prune_heads.selection.iterative import select_iterative

            plan = select_iterative(loaded.model, seqs, ev, max_drop=s.max_drop, relative=s.relative,
                                    round_size=s.round_size, score_id=s.score if s.score in ABLATION else "ablation_kl",
                                    policy=s.policy, candidates_fraction=s.candidates_fraction,
                                    verify_evaluator=verify_ev, batch_size=s.batch_size, pad_id=pad_id, **common)
        else:
            from prune_heads.selection.gates import select_gates

            plan = select_gates(loaded.model, seqs, target_fraction=s.target_fraction, l0_penalty=s.l0_penalty,
                                steps=s.steps, lr=s.lr, batch_size=s.batch_size, pad_id=pad_id, evaluator=ev, **common)
        if plan.selection.scores is None:
            plan.selection.scores = scores.summary()
        plan.selection.recipe = self.recipe.name
        plan.save(out / "plan.json")
        layout = _layout(loaded.model)
        return {"plan": "plan.json", "heads_removed": len(plan.removed_heads), "heads_total": layout.total_heads,
                "method": s.method, "score": s.score, "policy": s.policy,
                "budget": {"max_drop": s.max_drop, "relative": s.relative}, "task": s.task,
                "baseline": plan.selection.baseline, "result": plan.selection.result,
                "verification": plan.to_dict()["verification"]}

    def _plan(self) -> Any:
        from prune_heads.plan import Plan

        return Plan.load(self.stage_dir("select") / "plan.json")

    def stage_export(self, out: Path) -> dict[str, Any]:
        from prune_heads.export import export_checkpoint as export

        e, m = self.recipe.export, self.recipe.model
        sel = self.outcomes["select"].outputs
        eval_results = {k: sel.get(k) for k in ("baseline", "result", "verification") if sel.get(k) is not None}
        res = export(m.id, self._plan(), out / "model", format=e.format, dtype=e.dtype, shard_size=e.shard_size,
                     verify=False, overwrite=False, approximate_norms=e.approximate_norms,
                     eval_results=eval_results or None, scores_summary=_scores_summary(self.stage_dir("calibrate")),
                     gguf_file=m.gguf_file, progress=self.progress)
        return {"model": "model", "format": e.format, "params_before": int(res.params_before),
                "params_after": int(res.params_after),
                "files": sorted(Path(f).name for f in (getattr(res, "files", None) or []))}

    def stage_verify(self, out: Path) -> dict[str, Any]:
        from prune_heads.export import verify_export

        e = self.recipe.export
        result = dict(verify_export(self.recipe.model.id, str(self.stage_dir("export") / "model"), self._plan(),
                                    num_sequences=e.verify_num_sequences, seq_len=e.verify_seq_len, tol=e.verify_tol))
        diff = result.get("max_abs_diff", result.get("max_abs_logit_diff"))
        passed = result.get("passed", result.get("ok"))
        if passed is None and diff is not None:
            passed = float(diff) <= e.verify_tol
        result.update({"passed": bool(passed), "tol": e.verify_tol, "max_abs_diff": diff})
        write_json_atomic(out / "verification.json", result)
        if not passed and not e.approximate_norms:
            write_json_atomic(self.workdir / "verify-failed.json", result)
            raise PruneHeadsError(
                f"the exported model differs from the masked original by {diff} > {e.verify_tol} (details in "
                f"{self.workdir / 'verify-failed.json'}); the export is kept in {self.stage_dir('export')} for inspection"
            )
        return result

    def stage_evaluate(self, out: Path) -> dict[str, Any]:
        loaded = self.model()
        ev_cfg = self.recipe.evaluate
        tasks = self.eval_tasks()
        rows: list[dict[str, Any]] = []
        for t in tasks:
            ev = self._evaluator(loaded.model, loaded.tokenizer, t.task, limit=t.limit, num_fewshot=t.num_fewshot,
                                 split=t.split, batch_size=ev_cfg.batch_size)
            rows.append({"task": t.task, "split": t.split, "num_fewshot": t.num_fewshot, "limit": t.limit,
                         "task_config": _jsonable(getattr(ev, "task_config", {})), "baseline": ev(None).to_dict()})
        speed: dict[str, Any] = {}
        if ev_cfg.speed_seq_len:
            speed["original"] = prefill_speed(loaded.model, ev_cfg.speed_seq_len, ev_cfg.speed_repeats)
        pruned_model = load_exported(self.stage_dir("export") / "model", self.recipe)
        evaluated_as = "exported model"
        for row, t in zip(rows, tasks):
            try:
                ev = self._evaluator(pruned_model, loaded.tokenizer, t.task, limit=t.limit, num_fewshot=t.num_fewshot,
                                     split=t.split, batch_size=ev_cfg.batch_size)
                row["pruned"] = ev(None).to_dict()
            except PruneHeadsError as err:  # e.g. an evaluator that needs a family adapter for the new model type
                evaluated_as = f"masked original (exact per the verify stage; exported model not evaluable: {err})"
                ev = self._evaluator(loaded.model, loaded.tokenizer, t.task, limit=t.limit, num_fewshot=t.num_fewshot,
                                     split=t.split, batch_size=ev_cfg.batch_size)
                row["pruned"] = ev(self._plan().mask(_layout(loaded.model))).to_dict()
        if ev_cfg.speed_seq_len:
            speed["pruned"] = prefill_speed(pruned_model, ev_cfg.speed_seq_len, ev_cfg.speed_repeats)
        del pruned_model
        result = {"metrics": rows, "speed": speed, "pruned_evaluated_as": evaluated_as}
        write_json_atomic(out / "results.json", result)
        return result

    def stage_report(self, out: Path) -> dict[str, Any]:
        from prune_heads.report import write_report
        from prune_heads.scoring.head_scores import HeadScores

        rep = self.recipe.report
        scores = HeadScores.load(self.stage_dir("calibrate") / "scores")
        ids = [s for s in rep.scores if s in scores.score_ids] if rep.scores else None
        write_report(scores, out / "plots", score_ids=ids or None, fraction=rep.fraction)
        return {"report": "plots/report.md"}

    def stage_push(self, out: Path) -> dict[str, Any]:
        from prune_heads.publish.hub import push

        h = self.recipe.hub
        assert h.repo_id is not None
        url = push(self.stage_dir("export") / "model", h.repo_id, private=h.private, revision=h.revision,
                   commit_message=f"prune-heads {__version__}: recipe {self.recipe.name}")
        write_json_atomic(out / "push.json", {"url": url, "repo_id": h.repo_id})
        return {"url": url, "repo_id": h.repo_id}

    # -- summary ---------------------------------------------------------------------------------
    def summary(self, complete: bool) -> Summary:
        o = {k: v.outputs for k, v in self.outcomes.items() if v.status != "skipped"}
        sel, exp, ev = o.get("select", {}), o.get("export", {}), o.get("evaluate", {})
        wd = self.workdir
        s = Summary(recipe=self.recipe.name, model=self.recipe.model.id, workdir=str(wd), complete=complete,
                    stages={k: v.status for k, v in self.outcomes.items()})
        if sel:
            s.heads_total, s.heads_removed = sel.get("heads_total"), sel.get("heads_removed")
            s.selection = {k: sel.get(k) for k in ("method", "score", "policy", "budget", "task")}
            s.plan = str(wd / "select" / "plan.json")
        if exp:
            s.params_before, s.params_after = exp.get("params_before"), exp.get("params_after")
            s.export_dir = str(wd / "export" / "model")
        if ev:
            s.metrics = [{k: r.get(k) for k in ("task", "split", "baseline", "pruned")} for r in ev.get("metrics", [])]
            s.speed = ev.get("speed", {})
        if "verify" in o:
            s.verification = {k: o["verify"].get(k) for k in ("max_abs_diff", "tol", "passed")}
        if "report" in o:
            s.report = str(wd / "report" / o["report"]["report"])
        if "push" in o:
            s.hub_url = o["push"].get("url")
        return s


# ---- helpers -----------------------------------------------------------------------------------
def _layout(model: Any) -> Any:
    from prune_heads.model.adapters import get_adapter

    return get_adapter(model).layout(model.config)


def _scores_summary(cal_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((cal_dir / "scores" / "scores.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {k: meta.get(k) for k in ("scores", "num_samples", "num_tokens", "data", "model")}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def load_exported(path: Path, recipe: Recipe) -> Any:
    """The exported checkpoint as a user would load it (pruned model types registered by prune_heads)."""
    import torch
    from transformers import AutoModelForCausalLM

    from prune_heads.model.loading import parse_dtype

    with contextlib.suppress(ImportError, AttributeError):
        from prune_heads.export import register_auto_classes

        register_auto_classes()
    kwargs: dict[str, Any] = {"trust_remote_code": True}
    dtype = parse_dtype(recipe.export.dtype or recipe.model.dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if recipe.model.device_map is not None:
        kwargs["device_map"] = recipe.model.device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if recipe.model.device_map is None:
        model.to(recipe.model.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    model.requires_grad_(False)
    return model


def prefill_speed(model: Any, seq_len: int, repeats: int) -> dict[str, Any]:
    """Median wall time of one forward pass over ``seq_len`` tokens (batch 1, no cache), after a warm-up."""
    import torch

    device = next(model.parameters()).device
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    seq_len = min(seq_len, int(getattr(config, "max_position_embeddings", seq_len) or seq_len))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (1, seq_len), generator=gen).to(device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"seq_len": seq_len, "repeats": repeats, "seconds": med, "tokens_per_s": seq_len / med,
            "device": str(device), "threads": torch.get_num_threads()}


def run(recipe_or_path: Recipe | str | os.PathLike | Mapping[str, Any], workdir: str | os.PathLike,
        overrides: Iterable[str] | Mapping[str, Any] | None = None, *, force: bool = False, push: bool | None = None,
        stop_after: str | None = None, progress: bool = True, echo: Callable[[str], None] | None = print) -> Summary:
    """Run (or resume) a recipe in ``workdir`` and return its ``Summary``.

    Args:
        recipe_or_path: a recipe YAML path, a mapping, or a ``Recipe``.
        overrides: ``["select.limit=50", ...]`` or ``{"select.limit": 50}``, applied before validation.
        force: rerun every stage even when its inputs are unchanged.
        push: push to ``hub.repo_id`` at the end (default: the recipe's ``hub.push``).
        stop_after: stop once this stage is done (the next call continues from there).
        echo: where stage progress lines go (``None`` for silence).
    """
    recipe = load_recipe(recipe_or_path, overrides)
    return Pipeline(recipe, workdir, force=force, push=push, stop_after=stop_after, progress=progress, echo=echo).run()
