"""``sliced`` format: removed heads are cut out of the weights; modelling code travels via ``auto_map``.

Layers may keep different numbers of query and KV heads; the config records the kept heads of every
layer and the modelling code in ``remote/`` rebuilds the smaller projections from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prune_heads.errors import UnsupportedArchitectureError
from prune_heads.export.formats_common import base_config_dict
from prune_heads.export.slicing import LayerHeads, pruned_layout
from prune_heads.model.adapters import FamilyAdapter, HeadLayout

MODE = "slice"
REMOTE_CODE = True
REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_pruned.py", "modeling_pruned.py")


def supported_model_types() -> tuple[str, ...]:
    from prune_heads.export.remote.configuration_pruned import PRUNED_CONFIGS

    return tuple(PRUNED_CONFIGS)


def check(adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], src_config: dict[str, Any], *,
          o_bias: bool = False) -> None:
    model_type = src_config.get("model_type")
    if model_type not in supported_model_types():
        raise UnsupportedArchitectureError(
            f"the sliced format has modelling code for {', '.join(supported_model_types())}, not {model_type!r}; "
            "use --format masked (exact, no speed-up)"
        )


def class_names(model_type: str) -> tuple[str, str]:
    from prune_heads.export.remote.configuration_pruned import PRUNED_CONFIGS
    from prune_heads.export.remote.modeling_pruned import PRUNED_MODELS

    return PRUNED_CONFIGS[model_type].__name__, PRUNED_MODELS[model_type].__name__


def output_config(src_config: dict[str, Any], adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], *,
                  dtype: str | None, approximate_norms: bool, o_bias: bool = False) -> dict[str, Any]:
    base_type = src_config["model_type"]
    config_cls, model_cls = class_names(base_type)
    d = base_config_dict(src_config, dtype)
    d.update(
        model_type=f"pruned_{base_type}",
        architectures=[model_cls],
        auto_map={"AutoConfig": f"configuration_pruned.{config_cls}",
                  "AutoModelForCausalLM": f"modeling_pruned.{model_cls}"},
        base_model_type=base_type,
        kept_heads=[list(h.kept) for h in heads],
        pruned_layout=pruned_layout(adapter),
        approximate_norms=bool(approximate_norms and adapter.qk_norm == "full_width"),
    )
    if o_bias:
        d["pruned_o_bias"] = True  # every layer's o_proj gets a bias (the compensation's; zeros elsewhere)
    return d


def write_extras(out_dir: Path) -> list[str]:
    """Ship the modelling code with the checkpoint."""
    for name in REMOTE_FILES:
        shutil.copy2(REMOTE_DIR / name, out_dir / name)
    return list(REMOTE_FILES)
