"""Export a pruned checkpoint: ``sliced`` (smaller, custom code travels along), ``uniform`` (stock
architecture) or ``masked`` (same shapes, the oracle).

Export streams the source tensor by tensor into an atomic temporary directory; verification runs on
that directory before it is renamed into place, so the result it writes describes exactly the files
that land. A plan selected with compensation has it folded into the weights as they stream
(``export.folding``). The exporter itself is ``export.checkpoint``; names here load on first use
(``prune_heads.lazy``), so importing a sibling module (a stage's config) does not import torch.
"""

from prune_heads.lazy import lazy_exports

_EXPORTS = {
    "FORMATS": "prune_heads.export.checkpoint",
    "PROVENANCE_FILE": "prune_heads.export.source",
    "ExportRecord": "prune_heads.export.record",
    "VerificationRecord": "prune_heads.export.record",
    "EvaluationRow": "prune_heads.export.record",
    "ExportResult": "prune_heads.export.checkpoint",
    "export_checkpoint": "prune_heads.export.checkpoint",
    "resolve_source": "prune_heads.export.source",
    "source_license": "prune_heads.export.checkpoint",
    "register_auto_classes": "prune_heads.export.registration",
    "verify_export": "prune_heads.export.verify",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
