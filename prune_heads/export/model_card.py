"""The model card (``README.md``) of an exported checkpoint, rendered from its record.

A pruned checkpoint is only trustworthy if it says what was removed, what that cost, and how it was
checked, right where people find it: on the Hub page. The card is rendered from ``prune_heads.json``
(``card_info``), and is deterministic (no dates, sorted keys) so that exports are reproducible and the
card is testable. Stages that run after the export (verification, evaluation) record their results
with ``refresh_card``, which rewrites both files, so the card always says what really happened.

What goes into the record (the source, the evaluation rows, local paths scrubbed) is kept in
``export.provenance``; this module renders it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from prune_heads.export.provenance import (  # (re-exported: they were defined here)
    MEASURED_ON,
    gguf_quantization,
    hub_base_model,
    is_local_path,
    merge_evaluation,
    result_rows,
    scrub_local_paths,
    scrub_text,
    selection_rows,
    source_info,
)
from prune_heads.io_utils import apply_umask

PAPER_URL = "https://arxiv.org/abs/2504.03889"
TAGS = ["pruned", "attention-heads", "prune-heads"]

CITATION = """\
@inproceedings{sandovalsegura2026inactive,
  title         = {Identifying and Evaluating Inactive Heads in Pretrained {LLM}s},
  author        = {Sandoval-Segura, Pedro and Wang, Xijun and Panda, Ashwinee and Goldblum, Micah and
                   Basri, Ronen and Goldstein, Tom and Jacobs, David},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2504.03889},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2504.03889}
}"""

#: plan metadata shown first, with a readable label; other scalar keys follow in sorted order
_PLAN_KEYS = {
    "method": "selection method",
    "score_id": "score",
    "score": "score",
    "policy": "GQA policy",
    "task": "selection task",
    "max_drop": "budget (max drop)",
    "budget": "budget",
    "relative": "relative budget",
    "k": "heads chosen (k)",
    "min_heads_per_layer": "min heads per layer",
    "allow_empty_layers": "empty layers allowed",
    "verify_task": "verification task",
    "tool_version": "plan made with prune-heads",
}
#: ``model`` is where the selection loaded the model from (a cache folder, say): the card names the base model
_PLAN_SKIP = {"fingerprint", "trace", "per_layer_counts", "removed_heads", "wall_seconds", "created", "timestamp",
              "model"}


def write_model_card(out_dir: Path, info: dict) -> Path:
    """Render the card for ``info`` (see ``render_model_card``) to ``out_dir/README.md``, atomically."""
    out = Path(out_dir) / "README.md"
    text = render_model_card(info)
    fd, tmp = tempfile.mkstemp(prefix=".README.md.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    apply_umask(tmp)  # mkstemp makes 0600
    os.replace(tmp, out)
    return out


def refresh_card(export_dir: str | os.PathLike, *, verification: Any = None, evaluation: Any = None,
                 repo_id: str | None = None) -> Path:
    """Record a later stage's results in ``prune_heads.json`` and render the card again from it.

    ``verification``: a ``VerificationRecord`` (or the dict ``verify_export`` returns, parsed strictly).
    ``evaluation``: the evaluate stage's ``EvaluationResult``; its rows replace earlier rows measured on the
    same thing. ``repo_id`` fills the loading snippet. Returns the card.
    """
    from prune_heads.export.record import ExportRecord, VerificationRecord

    record = ExportRecord.load(export_dir)
    if verification is not None:
        if not isinstance(verification, VerificationRecord):
            verification = VerificationRecord.from_dict(dict(verification))
        record.verification = VerificationRecord.from_dict(scrub_local_paths(verification.to_dict()))
    if evaluation is not None:  # task specs name the user's data files: never published
        rows = [dataclasses.replace(r, task=scrub_text(r.task)) for r in result_rows(evaluation)]
        record.evaluation = merge_evaluation(record.evaluation, rows)
    if repo_id is not None:
        record.repo_id = repo_id
    record.save(export_dir)
    return write_model_card(Path(export_dir), card_info(record))


def card_info(record: Any) -> dict[str, Any]:
    """The card's ``info`` (see ``render_model_card``) from an ``ExportRecord``."""
    source = record.source or {}
    per_layer = record.removed_per_layer or []
    total = record.heads_total
    return {
        "base_model": source.get("hub_id") or source.get("model"),
        "gguf": source.get("gguf"),
        "format": record.format,
        "family": record.family,
        "plan": record.plan,
        "removed_per_layer": per_layer,
        "num_heads_per_layer": total // len(per_layer) if total and per_layer else None,
        "heads_total": total,
        "heads_removed": record.heads_removed,
        "params_before": record.params_before,
        "params_after": record.params_after,
        "evaluation": record.evaluation,
        "verification": record.verification,
        "license": record.license,
        "tool_version": record.tool_version,
        "trust_remote_code": record.format == "sliced",
        "repo_id": record.repo_id,
        "compensation": record.compensation,
    }


def render_model_card(info: Mapping[str, Any]) -> str:
    """The card text.

    ``info`` keys: base_model, format, family, plan (dict), removed_per_layer (list[int]),
    num_heads_per_layer (int), heads_total, heads_removed, params_before, params_after, evaluation
    (``EvaluationRow`` list), verification (``VerificationRecord`` or None), license (str|None), tool_version,
    trust_remote_code (bool); optional gguf (``{"file", "quantization"}`` when the source was dequantised
    from GGUF) and repo_id (used in the loading snippet).
    """
    rows = info.get("evaluation") or []
    parts = [
        _front_matter(info),
        _summary(info),
        _heads_section(info),
        compensation_section(info.get("compensation")),
        budget_section(info.get("plan")),
        _eval_section(rows),
        _verification_section(info.get("verification"), info.get("compensation")),
        _loading_section(info),
        _provenance_section(info),
        "## Citation\n\nThe heads were found with the scores of:\n\n```bibtex\n" + CITATION + "\n```\n",
    ]
    return "\n".join(p for p in parts if p)


# ---- compensation ---------------------------------------------------------------------------------
def compensation_section(comp: Any) -> str:
    """How the removed heads were compensated (``info["compensation"]``, from ``export.folding.provenance``)."""
    if not isinstance(comp, Mapping) or comp.get("mode", "none") == "none":
        return ""
    stats = comp.get("moments") or {}
    how = {"lsq": "the kept heads' `o_proj` columns were refitted by least squares to reproduce each layer's "
                  "full attention output on the calibration data, and `o_proj` gained a bias",
           "mean": "the removed heads' mean output on the calibration data became an `o_proj` bias (as in FLAP)"}
    lines = ["## Compensation", "",
             f"The removed heads were not just zeroed: {how.get(comp['mode'], comp['mode'])}. It is folded into the "
             "weights, so the model needs nothing extra at run time.", "",
             "| | |", "|---|---|", f"| mode | `{comp['mode']}` |",
             f"| sequential | {'yes' if comp.get('sequential') else 'no'} |", f"| ridge | {_scalar(comp.get('ridge'))} |"]
    if stats.get("num_tokens"):
        lines.append(f"| calibration tokens | {_int(stats['num_tokens'])} |")
    if stats.get("fingerprint"):
        lines.append(f"| statistics fingerprint | `{stats['fingerprint']}` |")
    if comp.get("layers") is not None:
        lines.append(f"| layers with an o_proj bias from compensation | {len(comp['layers'])} |")
    return "\n".join(lines + [""])


# ---- selection budget -----------------------------------------------------------------------------
def budget_section(plan: Any) -> str:
    """The budget the heads were selected under and what the held-out verification found (with its interval).

    A plan written with ``--accept-unverified`` after failing its verification says so first, in bold:
    readers of the card must not take it for a verified plan.
    """
    if isinstance(plan, Mapping) and (plan.get("details") or {}).get("search") == "fixed":
        return _fixed_count_section(plan)
    if not isinstance(plan, Mapping) or not isinstance(plan.get("budget"), Mapping):
        return ""
    b = plan["budget"]
    rel = bool(b.get("relative"))
    fmt = (lambda x: f"{100 * float(x):.2f}%") if rel else (lambda x: f"{float(x):.4g}")
    metric = b.get("metric") or "metric"
    lines = ["## Selection budget", ""]
    if plan.get("accepted_unverified"):
        lines += ["**This plan failed its held-out verification and was written anyway (`--accept-unverified`).**", ""]
    conf = float(b.get("confidence") or 0)
    rule = (f"the one-sided {100 * conf:g}% upper bound of the paired drop" if conf else "the measured drop")
    lines += [f"Heads were removed while {rule} in {metric} stayed within {fmt(b['max_drop'])}"
              f"{' of the baseline' if rel else ''}.", ""]
    v = plan.get("verification")
    drop = v.get("drop") if isinstance(v, Mapping) else None
    if isinstance(drop, Mapping):
        verdict = v.get("verdict") or ("within" if v.get("within_budget") else "over")
        interval = (f", {100 * float(drop['confidence']):g}% one-sided bounds {fmt(drop['lower'])} .. "
                    f"{fmt(drop['bound'])}" if drop.get("confidence") else "")
        se = f", standard error {fmt(drop['stderr'])}" if drop.get("stderr") is not None else ""
        lines += [f"Held-out verification ({_int(drop.get('n') or 0)} documents not used by the search): drop "
                  f"{fmt(drop['estimate'])}{se}{interval}; verdict **{verdict}**.", ""]
    task = plan.get("task") if isinstance(plan.get("task"), Mapping) else {}
    if task.get("seq_len"):
        lines += [f"The budget was shown to hold at {_int(task['seq_len'])} tokens of context (`{task.get('task')}`)"
                  f"{'' if guard_records(plan) else '; longer contexts were not checked'}.", ""]
    return "\n".join(lines + [line for g in guard_records(plan) for line in guard_lines(g)])


def guard_records(plan: Mapping[str, Any]) -> list[Any]:
    """The plan's guards: ``guards`` (a list), or the single ``guard`` of plans written before several guards."""
    guards = plan.get("guards")
    if guards is None:
        guards = [plan["guard"]] if plan.get("guard") else []
    return list(guards) if isinstance(guards, list) else []


def guard_lines(guard: Any) -> list[str]:
    """The guard at the serving length (``select --guard-task``): its length, budget, result and held-out check."""
    if not isinstance(guard, Mapping) or not isinstance(guard.get("budget"), Mapping):
        return []
    b = guard["budget"]
    rel = bool(b.get("relative"))
    fmt = (lambda x: f"{100 * float(x):.2f}%") if rel else (lambda x: f"{float(x):.4g}")
    task = (guard.get("task") or {}).get("task", "the guard task")
    length = f" at {_int(guard['seq_len'])} tokens" if guard.get("seq_len") else ""
    base, res = guard.get("baseline") or {}, guard.get("result") or {}
    lines = [f"Guard{length} (`{task}`): every probe of the search also had to stay within {fmt(b['max_drop'])}"
             f"{' of the baseline' if rel else ''} there, by the same rule; {b.get('metric') or 'metric'} "
             f"{float(base.get('value', float('nan'))):.4g} -> {float(res.get('value', float('nan'))):.4g} for this plan"
             f" ({'within' if guard.get('within_budget') else 'NOT within'} budget)."]
    if guard.get("refused"):
        lines[-1] += f" The guard refused {len(guard['refused'])} probe(s) the search budget had passed."
    v = guard.get("verification")
    drop = v.get("drop") if isinstance(v, Mapping) else None
    if isinstance(drop, Mapping):
        verdict = v.get("verdict") or ("within" if v.get("within_budget") else "over")
        lines.append(f"Guard on held-out documents ({_int(drop.get('n') or 0)} the guard's search never saw): drop "
                     f"{fmt(drop['estimate'])}, one-sided bound {fmt(drop['bound'])}; verdict **{verdict}**.")
    return lines + [""]


def _fixed_count_section(plan: Mapping[str, Any]) -> str:
    """A fixed-count plan: what was asked for, and the held-out cost measured (no budget is claimed)."""
    d = plan.get("details") or {}
    asked = f"{d['heads']} heads" if d.get("heads") is not None else \
        f"{100 * float(d['fraction']):g}% of the heads" if d.get("fraction") is not None else "a fixed count"
    lines = ["## Selection", "",
             f"A fixed count was asked for ({asked}): the first {_int(plan.get('heads_removed'))} heads of the "
             f"`{plan.get('score_id')}` ranking under the `{plan.get('policy')}` policy were removed. No budget was "
             "searched or claimed.", ""]
    v = plan.get("verification")
    drop = v.get("drop") if isinstance(v, Mapping) else None
    if isinstance(drop, Mapping):
        metric = (v.get("result") or {}).get("metric") or "metric"
        interval = (f", {100 * float(drop['confidence']):g}% one-sided bounds {float(drop['lower']):.4g} .. "
                    f"{float(drop['bound']):.4g}" if drop.get("confidence") else "")
        se = f", standard error {float(drop['stderr']):.4g}" if drop.get("stderr") is not None else ""
        lines += [f"Measured cost on held-out documents ({_int(drop.get('n') or 0)} documents): {metric} drop "
                  f"{float(drop['estimate']):.4g}{se}{interval}.", ""]
    return "\n".join(lines)


# ---- front matter ---------------------------------------------------------------------------------
def front_matter(info: Mapping[str, Any]) -> dict[str, Any]:
    """The card metadata the Hub indexes (base model link, tags, license)."""
    meta: dict[str, Any] = {}
    base = hub_base_model(info.get("base_model"))
    if base:
        meta["base_model"] = base
    meta["tags"] = list(TAGS)
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    if info.get("license"):
        meta["license"] = str(info["license"])
    return meta


def _front_matter(info: Mapping[str, Any]) -> str:
    body = yaml.safe_dump(front_matter(info), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"---\n{body}---\n"


# ---- summary --------------------------------------------------------------------------------------
def heads_removed_percent(info: Mapping[str, Any]) -> float | None:
    total, removed = info.get("heads_total"), info.get("heads_removed")
    if not total or removed is None:
        return None
    return 100.0 * removed / total


def params_removed_percent(info: Mapping[str, Any]) -> float | None:
    before, after = info.get("params_before"), info.get("params_after")
    if not before or after is None:
        return None
    return 100.0 * (before - after) / before


def _summary(info: Mapping[str, Any]) -> str:
    hub_id = hub_base_model(info.get("base_model"))
    base = hub_id or info.get("base_model") or "the base model"
    if is_local_path(str(base)):
        base = Path(str(base)).name or "a local model"
    fmt = info.get("format", "sliced")
    lines = [f"# {_short_name(base)}, {info.get('heads_removed', '?')} attention heads removed", ""]
    link = f"[{base}](https://huggingface.co/{base})" if hub_id else f"`{base}`"
    lines.append(
        f"This is {link} with inactive attention heads removed by prune-heads (`{fmt}` format), "
        f"following [Sandoval-Segura et al., ICLR 2026]({PAPER_URL})."
    )
    lines.append("")
    gguf = info.get("gguf")
    if isinstance(gguf, Mapping) and gguf.get("file"):
        quant = gguf.get("quantization") or "GGUF"
        lines += [f"The base weights are not the original release: they were dequantised to float32 from the "
                  f"{quant} GGUF file `{gguf['file']}`, so they carry {quant}'s rounding.", ""]
    hp, pp = heads_removed_percent(info), params_removed_percent(info)
    rows = [("model family", f"`{info['family']}`" if info.get("family") else "?"), ("format", f"`{fmt}`")]
    if hp is not None:
        rows.append(("attention heads removed", f"{info['heads_removed']} of {info['heads_total']} ({_pct(hp)})"))
    if pp is not None:
        rows.append(("parameters", f"{_int(info['params_before'])} → {_int(info['params_after'])} "
                                   f"({_pct(pp)} removed)"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines.append("")
    if fmt == "masked":
        lines.append("The `masked` format keeps every tensor's shape and zeroes the removed heads' weights: it is "
                     "exact and loads anywhere, but it is not smaller or faster.")
        lines.append("")
    return "\n".join(lines)


# ---- compensation ---------------------------------------------------------------------------------
# ---- heads per layer ------------------------------------------------------------------------------
def _heads_section(info: Mapping[str, Any]) -> str:
    per_layer = info.get("removed_per_layer")
    if not per_layer:
        return ""
    n = info.get("num_heads_per_layer")
    by_layer: dict[int, list[int]] = {}
    for layer, head in (info.get("plan") or {}).get("removed_heads", []):
        by_layer.setdefault(int(layer), []).append(int(head))
    lines = ["## Heads removed per layer", ""]
    header = "| layer | removed | kept | removed heads |" if n else "| layer | removed | removed heads |"
    lines += [header, "|---:|---:|---:|---|" if n else "|---:|---:|---|"]
    for i, r in enumerate(per_layer):
        heads = ", ".join(str(h) for h in sorted(by_layer.get(i, []))) or "–"
        kept = f" {n - r} |" if n else ""
        lines.append(f"| {i} | {r} |{kept} {heads} |")
    lines.append("")
    return "\n".join(lines)


def _eval_section(rows: list[Any]) -> str:
    lines = ["## Evaluation", ""]
    if not rows:
        lines += ["No evaluation results were recorded for this export; `prune-heads eval BASE_MODEL --plan PLAN "
                  "--task TASK` measures the plan's effect on a task.", ""]
        return "\n".join(lines)
    lines += ["| task | metric | base model | pruned | change | n | measured on |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        change = "not measured"
        if r.before is not None and r.after is not None:
            change = f"{r.after - r.before:+.4f}"
        n = r.n if r.n is not None else "not recorded"
        lines.append(f"| {r.task} | {r.metric or 'not recorded'} | {_val(r.before, r.before_stderr)} | "
                     f"{_val(r.after, r.after_stderr)} | {change} | {n} | {r.measured_on or 'as recorded'} |")
    lines += ["", "*Base model* is the model before pruning, *pruned* the model with the heads removed; *n* counts "
                  "the task's documents (or tokens, for perplexity and KL). The selection task and the held-out "
                  "check are measured on the base model with the removed heads zeroed; the verification below "
                  "compares that model with this export. Values are ± one standard error where it is "
                  "known; `prune_heads.json` holds the exact task configurations.", ""]
    return "\n".join(lines)


# ---- verification ---------------------------------------------------------------------------------
def _verification_section(verification: Any, compensation: Any = None) -> str:
    """``verification``: the export's ``VerificationRecord`` (None when nothing was checked)."""
    compensated = isinstance(compensation, Mapping) and compensation.get("mode", "none") != "none"
    reference = ("removed heads zeroed and their compensation applied" if compensated else "removed heads zeroed")
    lines = ["## Verification", ""]
    if verification is None:
        lines += ["No verification is recorded for this export: its logits have not been compared with the base "
                  f"model's with the {reference}.", ""]
        return "\n".join(lines)
    v = verification
    status = "**passed**" if v.passed else "**FAILED**"
    lines += [f"Verification {status}: the exported model's logits were compared with the base model's with the "
              f"{reference} (in float64); maximum absolute difference {_sci(v.max_abs_logit_diff)} (tolerance "
              f"{_sci(v.tolerance)}).", ""]
    skip = {"passed", "max_abs_logit_diff", "tolerance"}
    extra = {k: x for k, x in sorted(v.to_dict().items()) if k not in skip and x is not None and _is_scalar(x)}
    if extra:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_scalar(x)} |" for k, x in extra.items()] + [""]
    return "\n".join(lines)


# ---- loading --------------------------------------------------------------------------------------
def _loading_section(info: Mapping[str, Any]) -> str:
    repo = info.get("repo_id") or "path/to/this/model"
    remote = bool(info.get("trust_remote_code"))
    fmt = info.get("format", "sliced")
    lines = ["## How to load", ""]
    if remote:
        lines += [
            f"The `{fmt}` format keeps a different number of query and key/value heads in each layer, which stock "
            "transformers classes cannot express. The modelling code travels with the checkpoint (`auto_map` in "
            "`config.json`), so load it with `trust_remote_code=True`; prune-heads does not need to be installed:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)',
            "```",
            "",
            "(The tokenizer is stock; it takes `trust_remote_code=True` only because it reads the same "
            "`config.json`, and would otherwise stop to ask.) With prune-heads installed, `import prune_heads` "
            "registers the pruned model types with the transformers Auto classes, and no remote code is needed:",
            "",
            "```python",
            "import prune_heads  # noqa: F401  (registers the pruned model types)",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            "",
        ]
    else:
        what = ("a stock architecture" if fmt == "uniform" else "the base model's architecture")
        lines += [
            f"The `{fmt}` format uses {what}: it loads with plain transformers, no custom code"
            + (" (and with tools that read stock checkpoints, such as vLLM and llama.cpp's converter)."
               if fmt == "uniform" else "."),
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            "",
        ]
    return "\n".join(lines)


# ---- provenance -----------------------------------------------------------------------------------
def _provenance_section(info: Mapping[str, Any]) -> str:
    plan = info.get("plan") or {}
    meta = plan.get("meta", plan) if isinstance(plan, Mapping) else {}
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, label in _PLAN_KEYS.items():
        if key in meta and _is_scalar(meta[key]) and label not in seen:
            rows.append((label, _scalar(meta[key])))
            seen.add(label)
    for key in sorted(k for k in meta if isinstance(k, str)):
        if key in _PLAN_KEYS or key in _PLAN_SKIP or key == "meta" or not _is_scalar(meta[key]):
            continue
        rows.append((key, _scalar(meta[key])))
    baseline = meta.get("baseline")
    if isinstance(baseline, Mapping) and "value" in baseline:
        rows.append(("baseline at selection", f"{baseline.get('metric', '')} {_val(_num(baseline['value']), _num(baseline.get('stderr')))}".strip()))
    has_meta = any(k not in ("removed_heads", "tool_version") for k in meta)
    if info.get("tool_version"):
        rows.append(("exported with", f"prune-heads {info['tool_version']}"))
    lines = ["## How it was made", ""]
    lines.append(
        "prune-heads scores every head on calibration data, ranks the heads by how inactive they are, and picks the "
        "heads to remove under a budget on a task metric; the export then takes them out of the weights. The full "
        "plan, the scores summary, the evaluation trace and a hash of the source checkpoint are in "
        "`prune_heads.json`. The plan's settings:"
        if has_meta else
        "The heads to remove came from a plan without selection metadata (hand-written?); it is recorded in "
        "`prune_heads.json` with a hash of the source checkpoint."
    )
    lines.append("")
    if rows:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return "\n".join(lines)


# ---- formatting helpers ---------------------------------------------------------------------------
def _short_name(base: str) -> str:
    return str(base).rstrip("/").split("/")[-1] or str(base)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if math.isnan(x) else float(x)


def _val(v: float | None, se: float | None) -> str:
    if v is None:
        return "not measured"
    return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"


def _pct(p: float) -> str:
    return f"{p:.2f}%"


def _int(n: Any) -> str:
    return f"{int(n):,}"


def _sci(x: Any) -> str:
    return f"{x:.2e}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("|", "\\|")


__all__ = ["MEASURED_ON", "card_info", "gguf_quantization", "hub_base_model", "is_local_path", "merge_evaluation",
           "refresh_card", "render_model_card", "result_rows", "scrub_local_paths", "selection_rows", "source_info",
           "write_model_card"]
