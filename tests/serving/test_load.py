"""A small bounded run of benchmarks/load_test.py: concurrent clients, none of their requests lost."""
from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", os.path.join(REPO, "benchmarks", "load_test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concurrent_clients_each_get_an_answer_or_an_error(served):
    lt = _load_test_module()
    bodies = lt.make_bodies(served["model"], served["images"][:3], requests=12, max_tokens=4, bad_every=4)
    r = lt.run_load(served["url"], bodies, clients=4, timeout=60)
    assert (r["answered"], r["refused"], r["failed"], r["lost"]) == (9, 3, 0, 0)
    assert 0 < r["p50_s"] <= r["p95_s"] and r["requests_per_s"] > 0 and r["tokens_per_s"] > 0


def test_percentile_is_nearest_rank():
    lt = _load_test_module()
    values = [float(v) for v in range(1, 21)]
    assert (lt._percentile(values, 50), lt._percentile(values, 95), lt._percentile(values, 100)) == (10.0, 19.0, 20.0)
    assert lt._percentile([], 50) == 0.0
