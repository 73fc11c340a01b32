"""Register the ``sliced`` format's pruned classes with transformers' Auto classes.

Apart from the exporter so that the import hook in ``prune_heads/__init__.py`` (which fires when
transformers is imported) loads only this and the remote modelling code, not the whole export pipeline.
"""

from __future__ import annotations

from prune_heads.export import sliced

_registered: set[str] = set()


def register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModelForCausalLM`` load sliced checkpoints without ``trust_remote_code``.

    The classes are built from the family adapters (``sliced.family_table``), so a family added with
    ``register_adapter()`` is registered on the next call.
    """
    table = {t: e for t, e in sliced.family_table().items() if t not in _registered}
    if not table:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from prune_heads.export.remote import configuration_pruned as remote_config
    from prune_heads.export.remote import modeling_pruned as remote_model

    for model_type, entry in table.items():
        config_cls = remote_config.PRUNED_CONFIGS.get(model_type) or remote_config.make_config_class(model_type, entry)
        model_cls = remote_model.PRUNED_MODELS.get(model_type) or remote_model.make_model_class(model_type, entry)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        _registered.add(model_type)
