"""``export_checkpoint``: write a plan applied to a model as a ``sliced``, ``uniform`` or ``masked`` checkpoint.

Export streams the source tensor by tensor into an atomic temporary directory; verification runs on
that directory before it is renamed into place, so the result it writes describes exactly the files
that land. A plan selected with compensation has it folded into the weights as they stream
(``export.folding``): the kept heads' ``o_proj`` columns change and ``o_proj`` gains a bias.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError
from prune_heads.export import masked, model_card, sliced, uniform
from prune_heads.export.folding import CompensationFold
from prune_heads.export.folding import provenance as compensation_provenance
from prune_heads.export.registration import register_auto_classes
from prune_heads.export.slicing import layer_heads, predicted_removed_params, slicing_rules
from prune_heads.export.source import PROVENANCE_FILE, as_model_config, resolve_source
from prune_heads.export.streaming import copy_aux_files, iter_tensors, open_source, parse_size
from prune_heads.export.verify import verify_export
from prune_heads.io_utils import atomic_dir, check_output_dir, file_record, write_json_atomic
from prune_heads.model.adapters import get_adapter
from prune_heads.model.fingerprint import FingerprintCheck, require_finite_weight
from prune_heads.plan import Plan

log = logging.getLogger(__name__)

FORMATS = {"sliced": sliced, "uniform": uniform, "masked": masked}


@dataclass
class ExportResult:
    out_dir: Path
    params_before: int
    params_after: int
    verification: dict | None
    files: list[str] = field(default_factory=list)
    predicted_params_after: int | None = None
    bytes_written: int = 0
    peak_buffer_bytes: int = 0
    #: the plan's compensation was folded into the weights (and verification compared with it)
    compensated: bool = False

    @property
    def passed(self) -> bool:
        """False only when verification ran, was exact by design, and exceeded its tolerance."""
        v = self.verification
        return v is None or bool(v["passed"]) or bool(v.get("approximate_norms"))


def _finite_cast(name: str, t: Any, dtype: Any) -> Any:
    """``t`` in the export's dtype, refused when that (or the folded compensation) made it NaN/Inf."""
    from prune_heads.finite import require_finite

    out = _cast(t, dtype)
    require_finite(out, f"the exported tensor {name}" + (f" in {str(dtype).removeprefix('torch.')}" if dtype else ""),
                   "it overflows that dtype or the compensation is not finite: export with --dtype float32, or "
                   "select again")
    return out


def export_checkpoint(model: Any, plan: Plan, out_dir: str | os.PathLike, *, format: str = "sliced", dtype: str | None = None,
           shard_size: str | int = "5GB", verify: bool = True, overwrite: bool = False, approximate_norms: bool = False,
           scores_summary: dict | None = None, gguf_file: str | None = None,
           progress: bool = True, verify_tol: float = 1e-4, verify_num_sequences: int = 4, verify_seq_len: int = 64,
           verify_engine: str = "auto", compensation: Any = None, moments: Any = None) -> ExportResult:
    """Write ``plan`` applied to ``model`` as a checkpoint in ``out_dir``; see the module docstring.

    ``model``: a ``ModelConfig`` (its revision, GGUF file and trust flag are honoured) or a model spec
    string (a directory, Hub id, GGUF file or ``smollm2``; ``gguf_file`` then names the GGUF file).

    A plan whose ``compensation`` is ``mean``/``lsq`` needs either ``compensation`` (a ``Compensation``, or
    a file saved with one: required for sequential plans) or ``moments`` (a scores directory, a
    ``HeadScores`` or a ``Moments``) to rebuild it; both are checked against the plan.
    """
    from prune_heads.model.loading import parse_dtype

    if format not in FORMATS:
        raise PruneHeadsError(f"unknown format {format!r}; choose sliced, uniform or masked")
    fmt = FORMATS[format]
    max_bytes = parse_size(shard_size)
    torch_dtype = parse_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else None
    model = as_model_config(model)
    if gguf_file is not None:
        if model.gguf_file not in (None, gguf_file):
            raise PruneHeadsError(f"two GGUF files given: {model.gguf_file!r} (the model's) and {gguf_file!r}")
        model = dataclasses.replace(model, gguf_file=gguf_file)
    src = open_source(resolve_source(model))
    check_output_dir(out_dir, overwrite, inputs=[src.path, model.id if Path(model.id).exists() else None])
    out = Path(out_dir)

    from prune_heads.model.remote_code import pretrained

    register_auto_classes()
    config = pretrained("config", src.path, trust_remote_code=model.trust_remote_code)
    from prune_heads.model.attention import is_sliced_export

    if is_sliced_export(config):
        raise PruneHeadsError(f"{model.id} is already a sliced prune-heads export ({config.model_type}): exporting "
                              "from a sliced model is not supported; apply the plans to the original model")
    adapter = get_adapter(config)
    layout = plan.validate(config)
    heads = layer_heads(plan, layout)
    comp = _plan_compensation(plan, config, compensation, moments)
    o_bias = comp is not None and bool(comp.layers)
    fmt.check(adapter, layout, heads, src.config, o_bias=o_bias)
    approximate = bool(approximate_norms and adapter.qk_norm_spans_heads)
    if approximate_norms and not approximate:
        log.warning("--approximate-norms has no effect on %s (no full-width q/k norm)", adapter.name)
    out_config = fmt.output_config(src.config, adapter, layout, heads, dtype=dtype_name, approximate_norms=approximate,
                                   o_bias=o_bias)
    rules = slicing_rules(adapter, layout, heads, mode=fmt.MODE, approximate_norms=approximate)
    fold = None
    if o_bias:
        stock_bias = format != "sliced" and adapter.o_bias is not None
        fold = CompensationFold(adapter, layout, comp, src, bias_every_layer=True,
                                zero_biases=adapter.o_bias.also_biased if stock_bias else ())
        rules = fold.wrap(rules)

    from prune_heads.export.streaming import ShardWriter

    # the plan must have been made on these very weights: every tensor is checked as it streams by
    same_weights = FingerprintCheck(plan.selection.fingerprint, "this plan") if plan.selection.fingerprint else None
    with atomic_dir(out, overwrite=overwrite, inputs=[src.path]) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        tied_head = adapter.tied_lm_head(src.config, set(src.weight_map))  # skipped: checkpoints store it once
        params_before = 0
        for name, source in iter_tensors(src, progress=progress):
            require_finite_weight(name, source)  # a NaN/Inf weight would be exported, and verified as NaN
            if same_weights is not None:
                same_weights.add(name, source)
            if name == tied_head:
                continue
            params_before += source.numel()
            rule = rules.get(name)
            tensor = rule(source) if rule is not None else source
            if tensor is not None:
                writer.add(name, _finite_cast(name, tensor, torch_dtype))
            for extra_name, extra in fold.extras(name, tensor, source) if fold is not None else ():
                writer.add(extra_name, _finite_cast(extra_name, extra, torch_dtype))
            del tensor, source
        if same_weights is not None:
            same_weights.finish()
        files = writer.close()
        write_json_atomic(tmp / "config.json", out_config)
        files.append("config.json")
        files += copy_aux_files(src.path, tmp)
        if fmt.REMOTE_CODE:
            files += fmt.write_extras(tmp, out_config)

        verification = None
        if verify:
            verification = verify_export(dataclasses.replace(model, id=str(src.path), gguf_file=None, revision=None),
                                         tmp, plan, tol=verify_tol, dtype=dtype_name, approximate=approximate,
                                         num_sequences=verify_num_sequences, seq_len=verify_seq_len,
                                         compensation=comp, engine=verify_engine, progress=progress)
        predicted = params_before - (predicted_removed_params(layout, adapter, heads, approximate_norms=approximate)
                                     if fmt.MODE == "slice" else 0) + (fold.added_params if fold is not None else 0)
        removed_per_layer = [layout.num_heads - len(h.kept) for h in heads]
        from prune_heads.export.record import ExportRecord, VerificationRecord

        record = ExportRecord(
            format=format,
            source=model_card.source_info(model.id, model.gguf_file, src.fingerprint(), revision=model.revision),
            family=adapter.name,
            plan=plan.to_dict(),
            removed_per_layer=removed_per_layer,
            heads_total=layout.total_heads,
            heads_removed=len(plan.removed_heads),
            kv_heads_removed=sum(layout.num_kv_heads - len(h.kept_kv) for h in heads),
            params_before=params_before,
            params_after=writer.total_params,
            params_after_predicted=predicted,
            dtype=dtype_name or "source",
            approximate_norms=approximate,
            compensation=compensation_provenance(comp),
            scores_summary=scores_summary,
            evaluation=model_card.selection_rows(plan.selection),
            verification=VerificationRecord.from_dict(verification) if verification is not None else None,
            license=source_license(src.path),
        )
        # never a local path in what gets published
        record = ExportRecord.from_dict(model_card.scrub_local_paths(record.to_dict()))
        files.append(model_card.write_model_card(tmp, model_card.card_info(record)).name)
        files.append(PROVENANCE_FILE)
        # the export's own files, so `push` uploads exactly these (the card and this record change later)
        # with their content hashes: push refuses a file changed since, whatever its size
        record.files = {f: None if f in ("README.md", PROVENANCE_FILE) else file_record(tmp / f) for f in sorted(files)}
        record.save(tmp)

    return ExportResult(out, params_before, writer.total_params, verification, sorted(files), predicted,
                        writer.total_bytes, writer.peak_buffer_bytes, compensated=o_bias)


def _cast(tensor: Any, dtype: Any) -> Any:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _plan_compensation(plan: Plan, config: Any, compensation: Any, moments: Any) -> Any:
    """The plan's ``Compensation``, rebuilt and checked (None when the plan zeroes)."""
    from prune_heads.compensation.plans import compensation_for_plan
    from prune_heads.compensation.spec import CompensationSpec

    spec = CompensationSpec.from_dict(plan.selection.compensation)
    if not spec.active:
        if compensation is not None:
            raise PruneHeadsError("a compensation was given but the plan records none (it was selected with "
                                  "--compensate none); select again with --compensate lsq")
        return None
    travels = bool((plan.selection.compensation or {}).get("file")) and plan.path is not None
    if compensation is None and moments is None and not travels:
        raise PruneHeadsError(
            f"this plan was selected with --compensate {spec.mode}: export needs the scores directory it was selected "
            "with (its moments.safetensors) to fold the compensation into the weights"
            + (", or the compensation file saved with the plan (sequential)" if spec.sequential else ""))
    return compensation_for_plan(plan, moments=moments, compensation=compensation, config=config)


def source_license(path: Path) -> str | None:
    """The ``license:`` of the source's model card front matter, if any."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    from prune_heads.bounded import load_yaml

    try:
        meta = load_yaml(text.split("---", 2)[1], "the source model card's metadata") or {}
    except (yaml.YAMLError, IndexError, PruneHeadsError):
        return None  # unreadable or hostile metadata: no license is copied, the card says so
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value)[:100] if isinstance(value, (str, int, float)) and value else None

