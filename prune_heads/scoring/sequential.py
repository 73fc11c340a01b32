"""Layer-sequential calibration: every forward score and the moments of a model larger than memory.

The loops of ``calibrate()`` are swapped (``model.sequential_engine``): decoder layer ``j`` is read from the
shards once, runs the hidden states of every batch through the same registered attention function (so the
per-sequence statistics are the ones the whole model gives), its ``o_proj`` moments accumulate in the same
``MomentsCollector``, and it is freed. The layer's raw statistics and moments are then written to
``layer-<j>.safetensors`` in a work directory, and the hidden states entering layer ``j + 1`` to
``hidden.safetensors`` (both atomically, in that order), so a killed run resumes from the last finished layer.
At the end the scores are derived per batch exactly as in ``calibrate()`` and ``moments.safetensors`` is
written tensor by tensor from the layer files (``StreamedMoments``): the float64 moments of the whole model
(8.6 GB for an 8B model) are never in memory at once.

The work directory is keyed by everything the result depends on (the checkpoint's tensor headers, the token
sequences, the scores, the dtype, the moment options): another run's layers are never reused. Only forward
scores and moments run this way; ``grad`` and the measured ablation scores need the whole model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prune_heads.errors import PruneHeadsError

STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.safetensors"
_MOMENT_KEYS = ("count", "sum", "gram", "resid_sq", "resid_inv", "sum_rel", "gram_rel")


def layer_file(work: Path, j: int) -> Path:
    return work / f"layer-{j:05d}.safetensors"


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    from prune_heads.io_utils import write_bytes_atomic

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(path, data)


def _key(src: Any, seqs: list[list[int]], record: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    h.update(json.dumps(src.fingerprint(), sort_keys=True).encode())
    for s in seqs:
        h.update(struct.pack(f"<{len(s)}q", *s))
        h.update(b"|")
    return h.hexdigest()[:24]


class LayerState:
    """The work directory of one run: which layers are finished, and the hidden states after the last one."""

    def __init__(self, work: Path, key: str, notify: Any = None) -> None:
        self.work = work
        state = work / STATE_FILE
        if state.is_file():
            try:
                old = json.loads(state.read_text()).get("key")
            except (OSError, json.JSONDecodeError):
                old = None
            if old != key:
                (notify or print)(f"calibrate: {work} holds another run's layers (other model, data or options); "
                                  "starting over")
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not state.is_file():
            from prune_heads.io_utils import write_json_atomic

            write_json_atomic(state, {"key": key})

    def resume_point(self, num_batches: int) -> tuple[int, list[torch.Tensor] | None]:
        """``(first layer to run, hidden states entering it)``; ``(0, None)`` for a fresh run."""
        from safetensors import safe_open

        hidden = self.work / HIDDEN_FILE
        if not hidden.is_file():
            return 0, None
        try:
            with safe_open(str(hidden), framework="pt") as f:
                done = int((f.metadata() or {})["next_layer"])
                states = [f.get_tensor(f"batch.{b}") for b in range(num_batches)]
        except Exception:  # a damaged state file: the layers are recomputed, nothing wrong is reused
            return 0, None
        if not all(layer_file(self.work, j).is_file() for j in range(done)):
            return 0, None
        return done, states

    def finish_layer(self, j: int, raw: list[dict[str, torch.Tensor]], moments: dict[str, torch.Tensor],
                     hidden: list[torch.Tensor]) -> None:
        tensors = {f"raw.{b}.{k}": v for b, r in enumerate(raw) for k, v in r.items()}
        tensors.update({f"moments.{k}": v for k, v in moments.items()})
        _write_atomic(layer_file(self.work, j), tensors)
        _write_atomic(self.work / HIDDEN_FILE, {f"batch.{b}": h for b, h in enumerate(hidden)},
                      {"next_layer": str(j + 1)})

    def raw(self, j: int, num_batches: int) -> list[dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        t = load_file(str(layer_file(self.work, j)))
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(num_batches)]
        for k, v in t.items():
            if k.startswith("raw."):
                _, b, name = k.split(".", 2)
                out[int(b)][name] = v
        return out


class StreamedMoments:
    """The moments of a layer-sequential run, kept in the per-layer files until saved.

    Quacks like ``Moments`` where ``HeadScores.save`` needs it (``summary()``, ``save()``, ``meta``);
    ``load()`` gives the real ``Moments`` once it is saved.
    """

    def __init__(self, work: Path, num_layers: int, width: int, relative: bool, meta: dict[str, Any]) -> None:
        self.work, self.num_layers, self.width, self.relative, self.meta = work, num_layers, width, relative, meta
        self._fingerprint: str | None = None
        self.saved: Path | None = None

    def _get(self, j: int, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(layer_file(self.work, j)), framework="pt") as f:
            return f.get_tensor(f"moments.{key}").to(torch.float64)

    def _scalars(self, key: str) -> torch.Tensor:
        return torch.stack([self._get(j, key).reshape(()) for j in range(self.num_layers)])

    def _order(self) -> list[tuple[str, Any]]:
        """``Moments._tensors()``'s order, as (file name, how to get it)."""
        L = self.num_layers
        out: list[tuple[str, Any]] = [("count", lambda: self._scalars("count")),
                                      ("resid_sq", lambda: self._scalars("resid_sq")),
                                      ("resid_inv", lambda: self._scalars("resid_inv"))]
        keys = [("sum", "sum"), ("gram", "gram")] + ([("sum_rel", "sum_rel"), ("gram_rel", "gram_rel")]
                                                     if self.relative else [])
        for file_key, key in keys:
            out += [(f"layers.{j}.{file_key}", lambda j=j, key=key: self._get(j, key)) for j in range(L)]
        return out

    @property
    def num_tokens(self) -> int:
        return int(self._scalars("count").max())

    def fingerprint(self) -> str:
        from prune_heads.compensation.moments import fingerprint_of

        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(get() for _, get in self._order())
        return self._fingerprint

    def summary(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint(), "num_tokens": self.num_tokens, "data": self.meta.get("data"),
                "sequential": False}

    def save(self, path: str | os.PathLike) -> Path:
        """``moments.safetensors`` written one tensor at a time (``moments.write_moments_file``)."""
        from prune_heads.compensation.moments import MOMENTS_FILE, write_moments_file

        p = Path(path)
        if p.is_dir():
            p = p / MOMENTS_FILE
        write_moments_file(p, self._order(), self.num_layers, self.width,
                           {**self.meta, "fingerprint_moments": self.fingerprint()})
        self.saved = p
        return p

    def load(self) -> Any:
        from prune_heads.compensation.moments import Moments

        if self.saved is None:
            raise PruneHeadsError("these moments are not saved yet")
        return Moments.load(self.saved)


@torch.no_grad()
def calibrate_sequential(path: str | os.PathLike, seqs: Sequence[Sequence[int]], work: str | os.PathLike, *,
                         scores: Sequence[str] | None = None, batch_size: int = 8, pad_id: int = 0,
                         block_size: int | None = None, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu", moments: bool = True, relative: bool = True,
                         progress: bool = True, model_name: str | None = None, revision: str | None = None,
                         data_meta: dict[str, Any] | None = None, stop_after: int | None = None) -> Any:
    """``HeadScores`` of the checkpoint at ``path`` on ``seqs``, one decoder layer at a time.

    ``work``: the directory that holds finished layers (resumed from when it matches this run).
    ``stop_after``: stop after that many layers (a test's stand-in for a kill). The scores equal
    ``calibrate(model, seqs, ...)``'s; ``moments`` is a ``StreamedMoments`` (saved with the scores).
    """
    from tqdm.auto import tqdm

    from prune_heads.compensation.moments import MomentsCollector
    from prune_heads.data import batches
    from prune_heads.model.attention import HeadControl, attach
    from prune_heads.model.sequential_engine import StreamedModel
    from prune_heads.scoring.calibrate import ScoreCollector, default_scores
    from prune_heads.scoring.score_defs import (
        ABLATION,
        COMPENSATION,
        CUSTOM_SCORES,
        GRADIENT,
        validate_score_ids,
    )

    wanted = validate_score_ids(list(scores or default_scores()))
    slow = [s for s in wanted if s in GRADIENT or s in ABLATION or s in COMPENSATION]
    if slow:
        raise PruneHeadsError(f"{', '.join(slow)} need the whole model; layer by layer calibrate scores only the forward "
                              "scores and moments: drop them, or use --engine memory on a machine that holds the model")
    seqs = [list(map(int, s)) for s in seqs]
    if not seqs:
        raise PruneHeadsError("no calibration sequences")
    src_dtype = dtype or _checkpoint_dtype(path)
    sm = StreamedModel(path, load_dtype=src_dtype, compute=src_dtype, device=device)
    layout = sm.layout
    record = {"scores": wanted, "dtype": str(src_dtype), "moments": moments, "relative": relative,
              "batch_size": batch_size, "pad_id": pad_id, "block_size": block_size}
    state = LayerState(Path(work), _key(sm.reader.src, seqs, record))
    plan = list(batches(seqs, batch_size, pad_id))
    fp = _Fingerprint(sm)

    collector = ScoreCollector(layout.num_layers)
    control = HeadControl(sink=collector, block_size=block_size,
                          need_fhon=any(s.startswith("fhon") for s in wanted) or bool(CUSTOM_SCORES))
    stats = MomentsCollector(sm.model, relative=relative) if moments else None
    start, hidden = state.resume_point(len(plan))
    bar = tqdm(total=layout.num_layers, initial=start, desc="calibrating (layer by layer)", unit="layer",
               disable=not progress)
    try:
        with attach(sm.model, control):
            if stats is not None:
                stats.enabled = False  # the pass-through capture must not count
            inputs = [sm.start(ids, mask) for _, ids, mask in plan]
            if stats is not None:
                stats.enabled = True
            if hidden is None:
                hidden = [h for h, _ in inputs]
            hidden = [h.to(sm.device) for h in hidden]
            for j in range(layout.num_layers):
                if j < start:
                    fp.skip(j)
                    continue
                if stop_after is not None and j >= stop_after:
                    raise _Killed(j)
                with sm.layer(j) as layer:
                    fp.loaded(j)
                    raw = []
                    for b, (_, _, mask) in enumerate(plan):
                        if stats is not None:
                            stats.set_mask(mask)
                        hidden[b] = sm.run_layer(layer, hidden[b], inputs[b][1][j])
                        raw.append(collector.layers.pop(j))
                state.finish_layer(j, raw, _layer_moments(stats, j) if stats is not None else {}, hidden)
                bar.update(1)
    finally:
        bar.close()
        if stats is not None:
            stats.remove()
    return _result(sm, state, plan, wanted, seqs, moments, relative, fp.result(), model_name, revision,
                   data_meta, src_dtype)


class _Killed(PruneHeadsError):
    """``stop_after`` reached (tests simulate a kill with it)."""


def _layer_moments(stats: Any, j: int) -> dict[str, torch.Tensor]:
    out = {"count": stats.count[j], "sum": stats.sums[j], "gram": stats.grams[j], "resid_sq": stats.resid_sq[j],
           "resid_inv": stats.resid_inv[j]}
    if stats.relative:
        out.update(sum_rel=stats.sums_rel[j], gram_rel=stats.grams_rel[j])
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise PruneHeadsError(f"layer {j} produced no o_proj statistics ({', '.join(missing)}); its family cannot "
                              "be calibrated layer by layer")
    # written now, and dropped from memory: the moments of finished layers live in their files
    for attr in ("count", "sums", "grams", "resid_sq", "resid_inv", "sums_rel", "grams_rel"):
        getattr(stats, attr)[j] = None
    return out


def _checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    from prune_heads.model.sequential_engine import checkpoint_dtype

    return checkpoint_dtype(path)


#: the largest block (as float32) of a non-layer tensor the fingerprint reads at once
FINGERPRINT_BLOCK_BYTES = 64 << 20


class _Fingerprint:
    """The model fingerprint ``calibrate()`` records, built from the tensors as the layers stream by."""

    def __init__(self, sm: Any) -> None:
        from prune_heads.model.fingerprint import FingerprintBuilder

        self.sm = sm
        self.builder = FingerprintBuilder(sm.model.config)
        self.layer_names = {n for j in range(sm.layout.num_layers) for n in self._names(j)}

    def _names(self, j: int) -> list[str]:
        prefix = self.sm.adapter.layer_prefix(j)
        return [n for n in self.sm.reader.src.weight_map if n.startswith(prefix)]

    def _add(self, names: list[str]) -> None:
        for name, t in self.sm.reader.read(names).items():  # as the model loaded whole holds it (its dtype)
            self.builder.add(name, t.to(self.sm.load_dtype) if t.is_floating_point() else t)

    def _add_rows(self, name: str) -> None:
        """A large 2-D tensor (the embedding, the LM head) fingerprinted in row blocks, never read whole."""
        reader, dtype = self.sm.reader, self.sm.load_dtype
        rows, cols = reader.shape(name)
        step = max(1, FINGERPRINT_BLOCK_BYTES // max(1, cols * 4))
        blocks = (reader.rows(name, a, min(rows, a + step)).to(dtype) for a in range(0, rows, step))
        self.builder.add_chunks(name, dtype, [rows, cols], blocks)

    def loaded(self, j: int) -> None:
        self._add(self._names(j))  # the shards' pages are warm: reading them again costs little

    skip = loaded

    def result(self) -> dict[str, Any]:
        for name in self.sm.reader.src.weight_map:
            if name in self.layer_names:
                continue
            shape = self.sm.reader.shape(name)
            big = len(shape) == 2 and math.prod(shape) * 4 > FINGERPRINT_BLOCK_BYTES
            if big and self.sm.reader.rows(name, 0, 1).is_floating_point():
                self._add_rows(name)
            else:
                self._add([name])
        return self.builder.result()


def _result(sm: Any, state: LayerState, plan: list, wanted: list[str], seqs: list[list[int]], moments: bool,
            relative: bool, fingerprint: dict[str, Any], model_name: str | None, revision: str | None,
            data_meta: dict[str, Any] | None, dtype: torch.dtype) -> Any:
    from prune_heads.compensation.moments import FORMAT
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.scoring.score_defs import derive

    layout = sm.layout
    L = layout.num_layers
    per_layer = [state.raw(j, len(plan)) for j in range(L)]
    forward_ids = list(wanted)
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for b, (idx, _, _) in enumerate(plan):
        raw = {k: torch.stack([per_layer[j][b][k] for j in range(L)], dim=1) for k in per_layer[0][b]}
        for sid, v in derive(raw, forward_ids).items():
            rows.setdefault(sid, []).extend((i, v[r]) for r, i in enumerate(idx))
    stacked = {k: torch.stack([t for _, t in sorted(r, key=lambda x: x[0])]) for k, r in rows.items()}
    data_meta = data_meta or {"source": "pre-tokenised", "num_samples": len(seqs)}
    meta = {
        "model": model_name or str(sm.path), "revision": revision, "model_type": sm.model.config.model_type,
        "family": sm.adapter.name, "fingerprint": fingerprint, "num_layers": L, "num_heads": layout.num_heads,
        "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim, "data": data_meta,
        "num_samples": len(seqs), "num_tokens": int(sum(len(s) for s in seqs)),
        "dtype": str(dtype).replace("torch.", ""), "world_size": 1, "engine": "sequential",
    }
    result = HeadScores(stacked, meta)
    if moments:
        mmeta = {"format": FORMAT, "fingerprint": fingerprint, "num_layers": L, "num_heads": layout.num_heads,
                 "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
                 "statistic": "o_proj input (concatenated head outputs), real tokens only", "data": data_meta,
                 "num_samples": len(seqs)}
        result.moments = StreamedMoments(state.work, L, layout.num_heads * layout.head_dim, relative, mmeta)
    return result
