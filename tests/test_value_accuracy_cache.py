"""The report's value-model accuracies on disk (``report/value_accuracy.py``), and the rule by
which the pipeline's workers measure a model early (``commands/pipeline_prefetch.py``): a
cached number is read only where this process would compute the same digits, and a model is
measured only once the stage that writes it has finished."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dvpo_lightning.commands.pipeline_prefetch import Prefetch, measure
from dvpo_lightning.report.build import CACHE, value_model_dirs
from dvpo_lightning.report.value_accuracy import (
    accuracy_key,
    cached_pair_accuracies,
    pair_accuracies,
)


@pytest.fixture
def pairs(task_data):
    return [os.path.join(task_data, "eval_pairs.jsonl")]


@pytest.fixture
def gvm(artifacts, tmp_path):
    """A copy of the session's GVM (its files' times are this test's to change)."""
    return str(shutil.copytree(artifacts.gvm, tmp_path / "gvm"))


def test_cached_equals_computed_and_is_read_back(gvm, pairs, tmp_path):
    cache = tmp_path / "cache"
    first = cached_pair_accuracies(gvm, pairs, cache)
    assert first == pair_accuracies(gvm, pairs)
    (path,) = cache.glob("*.json")
    assert path.name == f"{accuracy_key(gvm, pairs)}.json"
    # the second call reads the file: a result written there is what it returns
    doc = json.loads(path.read_text())
    doc["result"][pairs[0]]["accuracy"] = {"final": 0.125}
    path.write_text(json.dumps(doc))
    assert cached_pair_accuracies(gvm, pairs, cache)[pairs[0]]["accuracy"] == {"final": 0.125}
    assert not list(cache.glob("*.tmp"))


def test_the_key_changes_with_what_changes_the_digits(gvm, pairs, tmp_path):
    key = accuracy_key(gvm, pairs)
    assert accuracy_key(gvm, pairs) == key
    assert accuracy_key(gvm, pairs, batch_size=8) != key
    assert accuracy_key(gvm, pairs, dtype="bfloat16") != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert accuracy_key(gvm, pairs) != key
    finally:
        torch.set_num_threads(threads)
    head = Path(gvm) / "value_head.safetensors"
    st = head.stat()
    os.utime(head, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a retrained model
    assert accuracy_key(gvm, pairs) != key
    other = tmp_path / "pairs.jsonl"
    other.write_text(Path(pairs[0]).read_text() + "\n")  # another pairs file's bytes
    assert accuracy_key(gvm, [str(other)]) != accuracy_key(gvm, pairs)


def test_a_worker_measures_into_the_cache_and_returns_failures(gvm, pairs, tmp_path):
    cache = str(tmp_path / "cache")
    assert measure(gvm, pairs, cache) is None
    assert len(list(Path(cache).glob("*.json"))) == 1
    (tmp_path / "policy").mkdir()  # a directory without a value head
    error = measure(str(tmp_path / "policy"), pairs, cache)
    assert error.startswith("FileNotFoundError") and "value-head artifact" in error


def test_a_model_is_measured_once_and_only_after_its_stage(gvm, pairs, tmp_path):
    run = tmp_path / "runs/ppo/seed0/model"
    shutil.copytree(gvm, run / "critic")
    runs = {"ppo": {0: str(run)}}
    dirs = value_model_dirs(runs, gvm={0: gvm}, reward_model=None)
    assert dirs == [gvm, f"{run}/critic", f"{run}/gvm", f"{run}/reward_model"]
    report = {"out": str(tmp_path / "report"), "gvm": {0: gvm}, "eval_pairs": pairs[0]}
    prefetch = Prefetch.for_report(report, runs)
    assert prefetch.cache_dir == str(tmp_path / "report" / CACHE)
    assert prefetch.ready(set()) == []  # nothing has finished: a stage may rewrite any
    assert prefetch.ready({str(run)}) == [f"{run}/critic"]  # the run's export, not absent ones
    assert prefetch.ready({str(run)}) == []  # handed out once
    assert prefetch.ready({str(run), gvm}) == [gvm]
    assert Prefetch.for_report({"gvm": gvm}, runs) is None  # no pairs: nothing to measure
