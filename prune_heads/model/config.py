"""Which model to load and how: the ``model:`` section of a recipe and every command's model options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prune_heads.schema import Config, option


def _nonempty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


@dataclass
class ModelConfig(Config):
    id: str = option("", required=True, cli=False, check=_nonempty,
                     help="Hub id, local directory, GGUF file or folder, or 'smollm2' (the packaged demo model)")
    dtype: str = option("auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="Weights dtype (auto: the checkpoint's own, e.g. bfloat16 for most released models); "
                             "statistics accumulate in float32/float64 whatever it is.")
    device: str | None = option(None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    device_map: str | None = option(None, help="'auto' to spread a large model over GPUs (accelerate).")
    revision: str | None = option(None, help="Hub revision (branch, tag or commit) of the model.")
    gguf_file: str | None = option(None, help="GGUF file name inside the model's directory.")
    trust_remote_code: bool = option(False, help="Allow modelling code from the checkpoint.")

    def resolved_device(self) -> str | None:
        """The device to load on: the given one, else cuda when available (None with a device map)."""
        if self.device is not None or self.device_map is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load(self) -> Any:
        """``LoadedModel`` (model in eval mode, gradients off, tokenizer with a pad token)."""
        from prune_heads.model.loading import load_model

        return load_model(self.id, dtype=self.dtype, device=self.resolved_device(), device_map=self.device_map,
                          gguf_file=self.gguf_file, revision=self.revision, trust_remote_code=self.trust_remote_code)

    def identity(self) -> dict[str, Any]:
        """What the model's outputs depend on (placement only moves the work, so it is left out)."""
        return {"id": self.id, "dtype": self.dtype, "revision": self.revision, "gguf_file": self.gguf_file,
                "trust_remote_code": self.trust_remote_code}
