"""Where an export's source checkpoint is on disk, and the name of the record every export carries.

Every stage that reads a source checkpoint (export, verify, the compensation check, evaluate of an export)
resolves it here from the whole ``ModelConfig``, so its revision, GGUF file and trust flag are honoured
everywhere: an export of ``--revision v2`` streams v2's weights, not the default branch's. This module
imports neither the exporter nor the model card, so both can use it without an import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError

#: the export's own record (plan, source, verification, evaluation); the model card is rendered from it
PROVENANCE_FILE = "prune_heads.json"

#: what an export needs from a Hub repository (weights, configs, tokenizer, licence)
SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "LICENSE*", "NOTICE*"]


def as_model_config(model: Any) -> Any:
    """``model`` as a ``ModelConfig``: a local checkpoint path or spec string becomes one with defaults."""
    from prune_heads.model.config import ModelConfig

    return model if isinstance(model, ModelConfig) else ModelConfig(id=str(model))


def resolve_source(model: Any, gguf_file: str | None = None) -> Path:
    """A local checkpoint directory for ``model`` (a ``ModelConfig``: a directory, a Hub id at its
    ``revision``, a GGUF file converted once, or ``smollm2``). With ``trust_remote_code`` a Hub checkpoint's
    modelling code (``*.py``) is fetched too. ``gguf_file`` names the GGUF file of a spec string."""
    import dataclasses

    from prune_heads.model.loading import gguf_to_plain, resolve_model_spec

    model = as_model_config(model)
    if gguf_file is not None:
        model = dataclasses.replace(model, gguf_file=gguf_file)
    location, gguf = resolve_model_spec(model.id, model.gguf_file)
    if gguf:
        return Path(gguf_to_plain(location, gguf))
    p = Path(location)
    if p.is_dir():
        return p
    if p.exists() or location.startswith((".", "/")):
        raise PruneHeadsError(f"{location} is not a model directory")
    patterns = SOURCE_PATTERNS + (["*.py"] if model.trust_remote_code else [])
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(location, revision=model.revision, allow_patterns=patterns))
    except Exception as e:
        at = f" at revision {model.revision!r}" if model.revision else ""
        raise PruneHeadsError(f"cannot fetch {location!r}{at} from the Hub ({e}); pass a local checkpoint "
                              "directory") from e


def source_config(model: Any) -> Any:
    """The source's transformers config (its revision, GGUF conversion and trust flag honoured)."""
    from prune_heads.export.registration import register_auto_classes
    from prune_heads.model.remote_code import pretrained

    model = as_model_config(model)
    register_auto_classes()
    return pretrained("config", resolve_source(model), trust_remote_code=model.trust_remote_code)
