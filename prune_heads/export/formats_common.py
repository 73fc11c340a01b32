"""What the three formats share: a config dict without stale keys."""

from __future__ import annotations

from typing import Any

#: keys of a source config.json the exporter never carries over
DROP_KEYS = ("architectures", "auto_map", "_name_or_path", "transformers_version", "quantization_config")


def base_config_dict(src_config: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    d = {k: v for k, v in src_config.items() if k not in DROP_KEYS}
    if dtype is not None:
        d["dtype"] = dtype
        d.pop("torch_dtype", None)
    return d
