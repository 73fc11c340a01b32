"""The select stage: its config (CLI options and the recipe's ``select:`` section) and its function.

The method is a typed variant of the config (``StaticMethod``, ``IterativeMethod``, ``GatesMethod``) and
``run_select`` dispatches on its type through ``SELECTORS`` (torchao's ``quantize_(model, config)`` pattern):
a new selector is one ``register_selector`` call, with no ``if method == ...`` anywhere.

The sweep's stage is in ``selection.sweep_stage``, the plots of a search in ``selection.trace_plot`` and the
line ``select`` prints in ``cli.messages``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.cli.messages import plan_line  # noqa: F401  (moved; re-exported)
from prune_heads.errors import PruneHeadsError
from prune_heads.schema import Config, ConfigError, option
from prune_heads.scoring.stage import check_score_ids
from prune_heads.selection.sweep_stage import SweepConfig, run_sweep_stage  # noqa: F401  (moved; re-exported)

POLICY_CHOICES = ("free", "kv-groups", "uniform")


def _ranking_score(v: Any) -> str | None:
    return None if v == "random" else check_score_ids([v])


# ---- method variants --------------------------------------------------------------------------
@dataclass
class StaticMethod(Config):
    """Rank heads once by a score; search the most heads within budget (ascending under a confidence level,
    else gallop + bisection)."""

    score: str | None = option(None, check=_ranking_score,
                               help="Ranking score (default: lsq_error with --compensate lsq, lsq_error_group for "
                                    "--gqa kv-groups, else ahon_ln; 'random' for a seeded random ranking).")


@dataclass
class IterativeMethod(Config):
    """Remove heads in measured rounds, re-measuring the rest given what is gone (Michel et al.)."""

    score: str = option("ablation_kl", choices=("ablation_kl", "ablation_loss"))
    round_size: int = option(4, ge=1, help="iterative: units (heads, or KV groups) removed per round.")
    candidates_fraction: float | None = option(None, gt=0, le=1,
                                               help="iterative: after the first measurement, re-measure only this "
                                                    "fraction of the units (least harmful first).")


@dataclass
class GatesMethod(Config):
    """Hard-concrete L0 gates trained by distillation with frozen weights (Voita et al.)."""

    target_fraction: float | None = option(None, gt=0, lt=1, help="gates: fraction of all heads to remove.")
    l0_penalty: float | None = option(None, gt=0, help="gates: fixed L0 penalty (instead of --target-fraction).")
    steps: int = option(200, ge=1, help="gates: training steps.")
    lr: float = option(0.05, gt=0, help="gates: learning rate of the gate parameters.")
    gate_batch_size: int = option(4, ge=1, help="gates: sequences per training step.")

    def check(self) -> None:
        if (self.target_fraction is None) == (self.l0_penalty is None):
            raise ConfigError("target_fraction", "the gates method needs exactly one of target_fraction "
                              "(--target-fraction) and l0_penalty (--l0-penalty)")


#: method name -> its config class (the CLI's --method choices and the recipe's select.method values)
METHODS: dict[str, type] = {"static": StaticMethod, "iterative": IterativeMethod, "gates": GatesMethod}


# ---- the stage config -------------------------------------------------------------------------
@dataclass
class SelectConfig(Config):
    method: Any = option(default_factory=StaticMethod, variants=METHODS, key="method",
                         help="How heads are chosen.")
    task: str | None = option(None, help="Budget task: an lm-eval task (arc_easy, hellaswag, mmlu, ...), "
                                         "mc:FILE.jsonl, ppl:DATA, kl:DATA or passkey:LEN[:NEEDLES] (gates: "
                                         "optional, evaluation only).")
    max_drop: float | None = option(None, ge=0,
                                    help="Allowed loss: 0.01 = one accuracy point; a fraction of the baseline with "
                                         "--relative; perplexity/KL units for ppl:/kl: tasks.")
    relative: bool = option(False, help="--max-drop is a fraction of the baseline value.")
    confidence: float = option(0.9, ge=0, lt=1,
                               help="A k passes only if the upper bound of its paired drop at this one-sided "
                                    "confidence is within --max-drop (0: the point estimate, fewest evaluations).")
    allow_underpowered: bool = option(False, help="Search even when the documents cannot resolve --max-drop.")
    accept_unverified: bool = option(False, help="Write the plan even when it fails its held-out verification "
                                                 "(it is marked so).")
    strict_verification: bool = option(False, help="Fail also when the held-out verification is inconclusive "
                                                   "(its interval straddles the budget).")
    surrogate: str | None = option(None, choices=("margin", "choice_kl"),
                                   help="static, multiple-choice tasks: a low-variance per-document signal that "
                                        "sizes the search's steps (every step is still judged on the metric).")
    search: str | None = option(None, choices=("ascend", "bisect"),
                                help="static: ascend (confidence holds for the returned k) or bisect (fewest "
                                     "evaluations); default bisect at --confidence 0 without a surrogate.")
    limit: int | None = option(None, ge=1, help="Documents of the search split to evaluate.")
    num_fewshot: int | None = option(None, ge=0, help="Few-shot examples (default: the task's own).")
    verify: bool = option(True, help="Check the plan on the held-out half of the task's documents.")
    verify_task: str | None = option(None, help="Task to verify on (default: the held-out split of --task).")
    verify_limit: int | None = option(None, ge=1, help="Documents to verify on (default: --limit).")
    seq_len: int | None = option(None, ge=2, help="ppl:/kl: budget and verify tasks: tokens per window (default "
                                                  "256; at most the model's context).")
    score_last: int | None = option(None, ge=1, help="ppl:/kl: score only the last N tokens of each window (the "
                                                     "same tokens at every --seq-len).")
    guard_task: str | None = option(None, help="Second constraint at the serving length, e.g. passkey:2048 (or "
                                               "ppl:DATA with --guard-seq-len): a probe (and so the plan) must also "
                                               "stay within --guard-max-drop there.")
    guard_max_drop: float | None = option(None, ge=0, help="Allowed loss on --guard-task (as --max-drop: 0.1 = ten "
                                                           "accuracy points; a fraction with --guard-relative).")
    guard_relative: bool = option(False, help="--guard-max-drop is a fraction of the guard's baseline value.")
    guard_limit: int | None = option(None, ge=1, help="Documents of --guard-task per split (search and held out).")
    guard_seq_len: int | None = option(None, ge=2, help="ppl:/kl: guard tasks: tokens per window.")
    guard_score_last: int | None = option(None, ge=1, help="ppl:/kl: guard tasks (and --guard-ppl-max-drop): score "
                                                           "the last N tokens of each window (default for "
                                                           "--guard-ppl-max-drop: a quarter of the window).")
    guard_ppl_max_drop: float | None = option(None, gt=0, help="A second guard beside --guard-task: perplexity in "
                                                               "windows of the guard's length (of the search task's "
                                                               "ppl:/kl: data, else wikitext2) may rise at most this "
                                                               "fraction (0.1 = +10%), by the same paired rule.")
    policy: str = option("free", choices=POLICY_CHOICES, cli="gqa",
                         help="free: any head; kv-groups: whole KV groups (the KV cache shrinks); uniform: the same "
                              "number of heads from every group (stock architecture on export).")
    min_heads_per_layer: int = option(1, ge=0, help="Heads every layer keeps.")
    allow_empty_layers: bool = option(False, help="Let a layer lose every head.")
    compensate: str = option("lsq", choices=("none", "mean", "lsq"),
                             help="How removed heads' output is made up for: lsq folds the least-squares prediction "
                                  "into the kept heads' o_proj and a bias; mean adds their mean as a bias; none zeroes.")
    sequential: bool = option(False, help="Compensation statistics of each layer taken from the model whose earlier "
                                          "layers are already pruned and compensated.")
    data: str | None = option(None, help="Calibration data for measured methods (default: the scores' own tokens).")
    data_dir: str | None = option(None, help="Folder of offline task data (default: found automatically).")
    batch_size: int = option(8, ge=1, help="Batch size of evaluations and measurements.")
    seed: int = option(0, ge=0, help="Seed of the search/verify split and of the random ranking.")
    engine: str = option("auto", choices=("auto", "memory", "sequential"),
                         help="memory: load the whole model; sequential: every probe is one pass over the documents "
                              "with one decoder layer at a time read from the shards (the static method on ppl:/kl: "
                              "tasks; the same plan and numbers); auto: memory when the model fits with headroom.")
    heads: int | None = option(None, ge=1, help="static: remove exactly this many query heads, the first of the "
                                                "ranking the search would walk (kv-groups: a multiple of a group's "
                                                "heads; uniform: of layers x KV groups); no budget, the held-out "
                                                "check reports the measured cost.")
    fraction: float | None = option(None, gt=0, lt=1, help="static: remove this fraction of all heads (rounded to "
                                                           "the nearest whole --gqa unit) instead of searching; no "
                                                           "budget.")

    @property
    def fixed(self) -> bool:
        """A fixed-count selection (``heads`` or ``fraction``): no search, no budget."""
        return self.heads is not None or self.fraction is not None

    def _check_fixed(self) -> None:
        if self.heads is not None and self.fraction is not None:
            raise ConfigError("heads", "give at most one of heads (--heads) and fraction (--fraction)")
        if not isinstance(self.method, StaticMethod):
            raise ConfigError("heads", "a fixed count (--heads/--fraction) ranks like the static method: use --method "
                                       "static (gates: --target-fraction; iterative searches within a budget)")
        search_only = {"max_drop": self.max_drop is not None, "relative": self.relative,
                       "surrogate": self.surrogate is not None, "search": self.search is not None,
                       "allow_underpowered": self.allow_underpowered, "accept_unverified": self.accept_unverified,
                       "strict_verification": self.strict_verification}
        for name, given in search_only.items():
            if given:
                raise ConfigError(name, "applies to a search within a budget, and a fixed count (heads/fraction, "
                                        "--heads/--fraction) claims none: give one or the other")

    def check(self) -> None:
        if self.sequential and self.compensate == "none":
            raise ConfigError("sequential", "sequential compensation needs --compensate lsq or mean (none zeroes)")
        if self.fixed:
            self._check_fixed()
            return
        needs_budget = not isinstance(self.method, GatesMethod)
        if needs_budget and not self.task:
            raise ConfigError("task", "this method needs a budget task (e.g. arc_easy, ppl:wikitext2)")
        if needs_budget and self.max_drop is None:
            raise ConfigError("max_drop", "this method needs a budget (0.01 = one accuracy point)")
        label_free = bool(self.task) and self.task.startswith(("ppl:", "kl:"))
        if self.max_drop is not None and not label_free and not self.relative and self.max_drop >= 1:
            raise ConfigError("max_drop", f"must be below 1 for an accuracy task (0.01 = one point), got {self.max_drop}")
        self._check_guard()
        if isinstance(self.method, IterativeMethod) and self.policy == "uniform":
            raise ConfigError("policy", "iterative selection supports free and kv-groups (select a uniform plan with "
                                        "the static method)")
        for key, why in _unused_options(self):  # an option the chosen method would ignore is refused
            raise ConfigError(key, f"has no effect {why}; remove it")

    def _check_guard(self) -> None:
        if self.guard_task is None:
            for name in ("guard_max_drop", "guard_ppl_max_drop"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, f"--{name.replace('_', '-')} needs --guard-task (e.g. passkey:2048)")
            return
        if self.guard_max_drop is None:
            raise ConfigError("guard_max_drop", "--guard-task needs --guard-max-drop (0.1 = ten accuracy points)")
        if not isinstance(self.method, StaticMethod):
            raise ConfigError("guard_task", "the guard is checked by the static method's search; use --method static")
        label_free = self.guard_task.startswith(("ppl:", "kl:"))
        if not label_free and not self.guard_relative and self.guard_max_drop >= 1:
            raise ConfigError("guard_max_drop", f"must be below 1 for an accuracy task (0.1 = ten points), got "
                                                f"{self.guard_max_drop}")
        from prune_heads.evaluation.passkey import task_length

        if self.guard_ppl_max_drop is not None and not (task_length(self.guard_task) or self.guard_seq_len):
            raise ConfigError("guard_ppl_max_drop", f"the length of --guard-task {self.guard_task} is unknown: give "
                                                    "--guard-seq-len for the perplexity guard's windows")
        if self.guard_ppl_max_drop is not None and label_free:
            raise ConfigError("guard_ppl_max_drop", f"--guard-task {self.guard_task} already guards perplexity at "
                                                    "its length; give --guard-ppl-max-drop with a passkey: or "
                                                    "accuracy guard")

    def guard_tasks(self) -> list[str]:
        """The tasks the guards evaluate: ``--guard-task``, and the perplexity guard at its length."""
        ppl = ppl_guard(self)
        return [t for t in (self.guard_task, ppl and ppl["task"]) if t]

    @property
    def method_name(self) -> str:
        from prune_heads.schema import variant_name

        return variant_name(METHODS, self.method)

    @property
    def ranking(self) -> str:
        """The static ranking score: the configured one, else the one that fits the compensation and policy."""
        score = getattr(self.method, "score", None)
        if score:
            return score
        if self.compensate == "lsq":
            return "lsq_error_group" if self.policy == "kv-groups" else "lsq_error"
        return "ahon_ln"

    def compensation_spec(self) -> Any:
        from prune_heads.compensation.spec import CompensationSpec

        return CompensationSpec(mode=self.compensate, sequential=self.sequential)


def select_memory(cfg: SelectConfig) -> dict[str, Any]:
    """What sets select's peak memory (``sequential_engine.engine_for``'s keywords).

    Layer by layer runs the static method on ``ppl:``/``kl:`` tasks; anything else needs the whole model.
    """
    from prune_heads.evaluation.passkey import task_length
    from prune_heads.evaluation.perplexity import DEFAULT_DOCS, DEFAULT_SEQ_LEN

    tasks = [t for t in (cfg.task, cfg.verify_task) if t]
    whole_only = None
    if not isinstance(cfg.method, StaticMethod):
        whole_only = f"the {cfg.method_name} method"
    elif cfg.sequential:
        whole_only = "sequential compensation (--sequential)"
    elif not tasks or not all(t.startswith(("ppl:", "kl:")) for t in tasks):
        whole_only = f"the task {next((t for t in tasks if not t.startswith(('ppl:', 'kl:'))), None)}"
    elif cfg.guard_task and not cfg.guard_task.startswith(("ppl:", "kl:")):
        whole_only = f"the guard task {cfg.guard_task}"
    docs = cfg.limit or max(DEFAULT_DOCS.values())
    # the longest window any evaluation runs (a guard at the serving length is the long one)
    length = max(DEFAULT_SEQ_LEN, cfg.guard_seq_len or 0, *(task_length(t) or 0 for t in (*tasks, cfg.guard_task)))
    return {"batch_tokens": cfg.batch_size * length, "all_tokens": docs * length,
            "moments": "solve" if cfg.compensate != "none" else "none", "whole_only": whole_only,
            "instead": "select with the static method on a ppl:DATA or kl:DATA task runs layer by layer"}


def select_engine(cfg: SelectConfig, model: Any, notify: Any = None, estimate: Any = None) -> str:
    """``memory`` or ``sequential`` for ``cfg.engine`` and ``model`` (a ``ModelConfig``), before loading it;
    what needs the whole model is refused, with the memory it needs, when the model does not fit."""
    from prune_heads.model.sequential_engine import engine_for

    return engine_for(cfg.engine, model, what="select", notify=notify, estimate=estimate, **select_memory(cfg))


def _unused_options(cfg: SelectConfig) -> list[tuple[str, str]]:
    """(option, why) for each option set away from its default that the chosen method never reads."""
    static, gates = isinstance(cfg.method, StaticMethod), isinstance(cfg.method, GatesMethod)
    out = [(k, "outside the static method") for k in ("surrogate", "search") if getattr(cfg, k) is not None and not static]
    if gates and cfg.policy != "free":
        out.append(("policy", "with the gates method (it removes single heads)"))
    if gates and cfg.allow_underpowered:
        out.append(("allow_underpowered", "with the gates method (it runs no power check)"))
    if static and cfg.data and not cfg.sequential:
        out.append(("data", "with the static method without sequential compensation (it reads no calibration data)"))
    return out


# ---- what a selector gets -------------------------------------------------------------------
@dataclass
class SelectContext:
    """Everything a selector needs, built once from the config by ``run_select``."""

    model: Any
    tokenizer: Any
    scores: Any
    search: Any
    verify: Any
    progress: bool = True
    _seqs: list[list[int]] | None = field(default=None, repr=False)
    data: str | None = None
    #: the ``Compensator`` every evaluation applies (None: removed heads are zeroed)
    compensation: Any = None
    #: the constraints at the serving length (``selection.guard.Guards``), when configured
    guard: Any = None

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id) if self.tokenizer.pad_token_id is not None else 0

    def calibration_tokens(self) -> list[list[int]]:
        """``--data`` tokenised like the scores' own calibration data, else the scores' own tokens."""
        if self._seqs is None:
            if self.data:
                from prune_heads.data import DataSpec, calibration_sequences

                rec = self.scores.meta.get("data") or {}
                spec = DataSpec(source=self.data, num_samples=rec.get("num_samples") or 64,
                                seq_len=rec.get("seq_len") or 256, seed=rec.get("seed") or 0)
                self._seqs = calibration_sequences(spec, self.tokenizer, self.model)
            else:
                self._seqs = self.scores.require_tokens()
        return self._seqs


Selector = Callable[[SelectConfig, SelectContext], Any]


def _static(cfg: SelectConfig, ctx: SelectContext) -> Any:
    from prune_heads.selection.static import select_fixed, select_static

    if cfg.fixed:
        return select_fixed(ctx.model, ctx.scores, ctx.search, score_id=cfg.ranking, heads=cfg.heads,
                            fraction=cfg.fraction, policy=cfg.policy, min_heads_per_layer=cfg.min_heads_per_layer,
                            allow_empty_layers=cfg.allow_empty_layers, verify_evaluator=ctx.verify,
                            confidence=cfg.confidence, seed=cfg.seed, compensation=ctx.compensation)
    return select_static(ctx.model, ctx.scores, ctx.search, score_id=cfg.ranking, max_drop=cfg.max_drop,
                         relative=cfg.relative, policy=cfg.policy, min_heads_per_layer=cfg.min_heads_per_layer,
                         allow_empty_layers=cfg.allow_empty_layers, verify_evaluator=ctx.verify,
                         progress=ctx.progress, seed=cfg.seed, **budget_options(cfg), surrogate=cfg.surrogate,
                         search=cfg.search, guard=ctx.guard)


def budget_options(cfg: SelectConfig) -> dict[str, Any]:
    """The budget rule's options, the same for every budgeted selector."""
    return {"confidence": cfg.confidence, "allow_underpowered": cfg.allow_underpowered,
            "accept_unverified": cfg.accept_unverified, "strict_verification": cfg.strict_verification}


def _iterative(cfg: SelectConfig, ctx: SelectContext) -> Any:
    from prune_heads.selection.iterative import select_iterative

    m: IterativeMethod = cfg.method
    return select_iterative(ctx.model, ctx.calibration_tokens(), ctx.search, max_drop=cfg.max_drop,
                            relative=cfg.relative, round_size=m.round_size, score_id=m.score, policy=cfg.policy,
                            min_heads_per_layer=cfg.min_heads_per_layer, allow_empty_layers=cfg.allow_empty_layers,
                            candidates_fraction=m.candidates_fraction, verify_evaluator=ctx.verify,
                            batch_size=cfg.batch_size, pad_id=ctx.pad_id, progress=ctx.progress,
                            compensation=ctx.compensation, **budget_options(cfg))


def _gates(cfg: SelectConfig, ctx: SelectContext) -> Any:
    from prune_heads.selection.gates import select_gates

    m: GatesMethod = cfg.method
    return select_gates(ctx.model, ctx.calibration_tokens(), target_fraction=m.target_fraction,
                        l0_penalty=m.l0_penalty, steps=m.steps, lr=m.lr, batch_size=m.gate_batch_size,
                        pad_id=ctx.pad_id, min_heads_per_layer=cfg.min_heads_per_layer,
                        allow_empty_layers=cfg.allow_empty_layers, evaluator=ctx.search, progress=ctx.progress,
                        seed=cfg.seed, compensation=ctx.compensation, max_drop=cfg.max_drop, relative=cfg.relative,
                        confidence=cfg.confidence, verify_evaluator=ctx.verify,
                        accept_unverified=cfg.accept_unverified, strict_verification=cfg.strict_verification)


SELECTORS: dict[type, Selector] = {StaticMethod: _static, IterativeMethod: _iterative, GatesMethod: _gates}


def register_selector(name: str, config_cls: type, fn: Selector) -> None:
    """Add a selection method: ``--method NAME`` / ``select.method: NAME`` with ``config_cls``'s options."""
    METHODS[name] = config_cls
    SELECTORS[config_cls] = fn


# ---- the stage --------------------------------------------------------------------------------
def calibration_documents(scores: Any) -> list[str]:
    """The document ids the scores were calibrated on (empty for scores that do not record them)."""
    from prune_heads.data.tokens import recorded_documents

    return recorded_documents((getattr(scores, "meta", None) or {}).get("data"))


def window_options(task: str | None, seq_len: int | None, score_last: int | None) -> dict[str, Any]:
    """``make_evaluator``'s ``seq_len``/``score_last`` for a ``ppl:``/``kl:`` task (others take no window)."""
    if not task or not task.startswith(("ppl:", "kl:")):
        return {}
    return {k: v for k, v in (("seq_len", seq_len), ("score_last", score_last)) if v is not None}


def evaluators(cfg: SelectConfig, model: Any, tokenizer: Any, scores: Any = None) -> tuple[Any, Any]:
    """The search evaluator and the verification one (held-out half of the task, or --verify-task).

    ``ppl:``/``kl:`` tasks on the calibration source leave the calibration documents out of both: the
    compensation is fitted on them, so a search judged on them would be optimistic.
    """
    from prune_heads.evaluation import make_evaluator

    if not cfg.task:
        return None, None
    exclude = calibration_documents(scores)

    def make(task: str, split: str, limit: int | None) -> Any:
        return make_evaluator(model, tokenizer, task, limit=limit, num_fewshot=cfg.num_fewshot, split=split,
                              data_dir=cfg.data_dir, batch_size=cfg.batch_size, seed=cfg.seed, exclude_docs=exclude,
                              **window_options(task, cfg.seq_len, cfg.score_last))

    other_task = cfg.verify_task is not None and cfg.verify_task != cfg.task
    search = make(cfg.task, "all" if other_task else "search", cfg.limit)
    verify = None
    if cfg.verify:
        verify = make(cfg.verify_task, "all", cfg.verify_limit or cfg.limit) if other_task else \
            make(cfg.task, "verify", cfg.verify_limit or cfg.limit)
    return search, verify


#: windows of the perplexity guard when --guard-limit does not say (each is one forward at the guard's length)
PPL_GUARD_WINDOWS = 8


def ppl_guard(cfg: SelectConfig) -> dict[str, Any] | None:
    """The perplexity guard of ``--guard-ppl-max-drop``: ``ppl:DATA`` in windows of the guard task's length.

    Why: a pass-key guard keeps retrieval at the serving length but says nothing of perplexity there (issue 18:
    a kv-groups/lsq plan guarded by ``passkey:2048`` alone kept every key and lost 16% perplexity at 2048
    tokens). The windows are cut from the joined documents and scored on their last tokens only, so every
    scored token has most of the window as context; DATA is the search task's (a ``ppl:``/``kl:`` task) so the
    guard's split leaves out the calibration documents as the search does.
    """
    from prune_heads.evaluation.passkey import task_length

    if cfg.guard_ppl_max_drop is None or not cfg.guard_task:
        return None
    length = int(task_length(cfg.guard_task) or cfg.guard_seq_len or 0)  # SelectConfig.check refuses 0
    data = cfg.task.split(":", 1)[1] if cfg.task and cfg.task.startswith(("ppl:", "kl:")) else "wikitext2"
    return {"task": f"ppl:{data}", "seq_len": length, "score_last": cfg.guard_score_last or max(1, length // 4),
            "limit": cfg.guard_limit or PPL_GUARD_WINDOWS}


def guard_check(cfg: SelectConfig, model: Any, tokenizer: Any, scores: Any = None) -> Any:
    """The ``Guards`` of ``--guard-task`` and ``--guard-ppl-max-drop`` (each with its search split, and its
    held-out split when verifying), or None without a guard."""
    if not cfg.guard_task:
        return None
    from prune_heads.evaluation import make_evaluator
    from prune_heads.selection.budget import make_budget
    from prune_heads.selection.guard import GuardCheck, Guards

    def make(task: str, split: str, limit: int | None, window: dict[str, Any]) -> Any:
        return make_evaluator(model, tokenizer, task, limit=limit, split=split, data_dir=cfg.data_dir,
                              batch_size=cfg.batch_size, seed=cfg.seed, exclude_docs=calibration_documents(scores),
                              **window)

    def check(task: str, limit: int | None, window: dict[str, Any], budget: Any, flag: str) -> GuardCheck:
        return GuardCheck(make(task, "search", limit, window), budget, allow_underpowered=cfg.allow_underpowered,
                          verify_evaluator=make(task, "verify", limit, window) if cfg.verify else None,
                          budget_flag=flag)

    checks = [check(cfg.guard_task, cfg.guard_limit,
                    window_options(cfg.guard_task, cfg.guard_seq_len, cfg.guard_score_last),
                    make_budget(cfg.guard_max_drop, cfg.guard_relative, cfg.confidence), "--guard-max-drop")]
    ppl = ppl_guard(cfg)
    if ppl is not None:
        checks.append(check(ppl["task"], ppl["limit"], {"seq_len": ppl["seq_len"], "score_last": ppl["score_last"]},
                            make_budget(cfg.guard_ppl_max_drop, True, cfg.confidence), "--guard-ppl-max-drop"))
    return Guards(checks)


def run_select(cfg: SelectConfig, loaded: Any, scores: Any, out: Path | None, *, model_id: str | None = None,
               recipe: str | None = None, overwrite: bool = False, progress: bool = True,
               keep_unverified: Path | None = None) -> Any:
    """Choose the heads to remove; write the plan to ``out`` (when given) and return it.

    A plan that fails its held-out verification raises ``VerificationFailed``; the plan is kept in
    ``keep_unverified`` (default ``PLAN.unverified.json`` beside ``out``) so the search need not be rerun.
    """
    if out is not None:
        from prune_heads.compensation.plans import check_plan_output

        check_plan_output(out, overwrite)  # the plan and its compensation file, before the search
    scores.check(loaded.model)
    search, verify = evaluators(cfg, loaded.model, loaded.tokenizer, scores)
    ctx = SelectContext(loaded.model, loaded.tokenizer, scores, search, verify, progress=progress, data=cfg.data,
                        guard=guard_check(cfg, loaded.model, loaded.tokenizer, scores))
    _compensate(cfg, ctx)
    _check_ablation_ranking(cfg, scores)
    try:
        selector = SELECTORS[type(cfg.method)]
    except KeyError:
        raise PruneHeadsError(f"no selector is registered for {type(cfg.method).__name__}") from None
    from prune_heads.selection.budget import VerificationFailed

    try:
        plan = selector(cfg, ctx)
    except VerificationFailed as e:  # keep what the search found: rerunning it would cost the whole search
        _finish(e.plan, scores, model_id, recipe)
        keep = keep_unverified or (unverified_path(out) if out is not None else None)
        if keep is not None:
            kept = _save_plan(ctx, e.plan, keep, overwrite=True)
            raise VerificationFailed(f"{e}; the rejected plan is kept in {kept}", e.plan) from None
        raise
    _finish(plan, scores, model_id, recipe)
    if out is not None:
        _save_plan(ctx, plan, out, overwrite=overwrite)
    return plan


def _check_ablation_ranking(cfg: SelectConfig, scores: Any) -> None:
    """Warn when the static ranking is an ablation score measured under another compensation than the selection's:
    it then orders heads by the effect of a different removal (zeroing, when the plan compensates). Scores that do
    not record how they were measured are not guessed at."""
    import warnings

    from prune_heads.scoring.score_defs import ABLATION

    if not isinstance(cfg.method, StaticMethod) or cfg.ranking not in ABLATION or scores is None:
        return
    measured = ((scores.meta.get("ablation") or {}).get("compensation") or {}).get("mode")
    if measured is not None and measured != cfg.compensate:
        warnings.warn(f"{cfg.ranking} was measured with compensation {measured!r} but the selection compensates with "
                      f"{cfg.compensate!r}; recalibrate with --ablation-compensate {cfg.compensate} so the ranking "
                      "measures the removal the plan makes", stacklevel=2)


def _save_plan(ctx: SelectContext, plan: Any, out: Path, *, overwrite: bool) -> Path:
    """Write the chosen plan and its compensation as one unit (``save_plan``), so export and ``eval --plan``
    apply exactly it."""
    from prune_heads.compensation.plans import check_plan_output, save_plan

    check_plan_output(out, overwrite)
    comp = None
    if ctx.compensation is not None:
        from prune_heads.model.adapters import get_adapter

        comp = ctx.compensation(plan.mask(get_adapter(ctx.model).layout(ctx.model.config)))
    return save_plan(plan, out, compensation=comp, overwrite=overwrite)


def unverified_path(out: Path) -> Path:
    """Where a plan that failed its verification is kept (beside ``out``, never in its place)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.unverified{out.suffix or '.json'}")


def _finish(plan: Any, scores: Any, model_id: str | None, recipe: str | None) -> None:
    sel = plan.selection
    sel.model = model_id or sel.model
    sel.recipe = recipe
    if sel.scores is None:
        sel.scores = scores.summary()


def _compensate(cfg: SelectConfig, ctx: SelectContext) -> None:
    """Build the compensation from the scores' moments (or, sequential, on the calibration tokens) and make
    every evaluation of the search and the verification apply it: the model judged is the model exported."""
    from prune_heads.compensation.plans import compensator_for, evaluator_with

    spec = cfg.compensation_spec()
    if not spec.active:
        return
    ctx.compensation = compensator_for(spec, scores=ctx.scores, model=ctx.model,
                                       seqs=ctx.calibration_tokens() if spec.sequential else None,
                                       batch_size=cfg.batch_size, pad_id=ctx.pad_id)
    ctx.search = evaluator_with(ctx.search, ctx.compensation)
    ctx.verify = evaluator_with(ctx.verify, ctx.compensation)
    if ctx.guard is not None:
        ctx.guard = ctx.guard.with_compensation(ctx.compensation)


def plot_search(plan: Any, path: Path) -> list[Path]:
    """``selection.trace_plot.plot_search`` (it moved there; this name stays for its callers)."""
    from prune_heads.selection.trace_plot import plot_search as plot

    return plot(plan, path)
