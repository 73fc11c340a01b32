"""No checkpoint code runs without the user's consent: the one door every transformers load goes through.

transformers asks "run the custom code? [y/N]" on the terminal when ``trust_remote_code`` is left ``None`` and
the checkpoint's ``config.json`` (or ``tokenizer_config.json``) maps its classes to Python files (``auto_map``)
for a ``model_type`` it does not know. A ``y`` runs that Python; with no terminal the prompt ends in a traceback.
So every load passes the user's flag as a bool (``pretrained`` requires it: there is no default to forget),
a local folder that would need its code is refused before transformers reads it, with one line naming
``--trust-remote-code``, and transformers' own refusal (Hub ids, nested configs) is turned into the same line.
``tests/test_remote_code.py`` greps the package so that a new ``from_pretrained`` outside this module fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError

#: the files whose ``auto_map`` makes transformers import a checkpoint's Python
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


class RemoteCodeRefused(PruneHeadsError):
    """Loading would run the checkpoint's own Python and the user did not pass ``--trust-remote-code``."""


def refusal(location: str | Path) -> RemoteCodeRefused:
    return RemoteCodeRefused(f"{location} ships its own modelling code (auto_map in its config) for a model type "
                           "transformers does not know; prune-heads runs it only with --trust-remote-code "
                           "(trust_remote_code: true in a recipe): read that code first")


def _known_model_type(model_type: Any) -> bool:
    """transformers (or prune-heads' registered pruned types) has a class for ``model_type``."""
    if not isinstance(model_type, str) or not model_type:
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from prune_heads.export.registration import register_auto_classes

    register_auto_classes()
    return model_type in CONFIG_MAPPING


def needs_remote_code(directory: str | Path) -> bool:
    """True when loading the local folder ``directory`` would import Python from it: an ``auto_map`` in one of
    its configs and a ``model_type`` transformers has no class for. Unreadable files are left to the loader."""
    d = Path(directory)
    if not d.is_dir():
        return False
    model_type: Any = None
    try:
        model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        pass
    for name in AUTO_MAP_FILES:
        try:
            cfg = json.loads((d / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and cfg.get("auto_map") and not _known_model_type(model_type):
            return True
    return False


def check_remote_code(location: str | Path, trust_remote_code: bool) -> None:
    """Refuse (one line) a local folder whose loading would run its code, unless the user trusts it."""
    if not trust_remote_code and needs_remote_code(location):
        raise refusal(location)


def pretrained(kind: str, location: str | Path, *, trust_remote_code: bool, **kwargs: Any) -> Any:
    """``Auto{Config,ModelForCausalLM,Tokenizer}.from_pretrained(location, trust_remote_code=<bool>, **kwargs)``.

    ``kind`` is ``config``, ``model`` or ``tokenizer``. ``trust_remote_code`` has no default on purpose: every
    caller states the user's flag, so transformers never prompts.
    """
    import transformers

    cls = {"config": transformers.AutoConfig, "model": transformers.AutoModelForCausalLM,
           "tokenizer": transformers.AutoTokenizer}[kind]
    trust = bool(trust_remote_code)
    check_remote_code(location, trust)
    try:
        return cls.from_pretrained(str(location), trust_remote_code=trust, **kwargs)
    except ValueError as e:
        if not trust and "trust_remote_code" in str(e):
            raise refusal(location) from None
        raise
