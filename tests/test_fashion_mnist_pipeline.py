"""benchmarks/fashion_mnist.py end to end on a few hundred images: every method trains, the
engine is evaluated, a rerun reuses the finished runs, and the summary lists every row."""

import json
import os

import pytest
from conftest import load_script

from manidp.bench import fashion_mnist_available

pytestmark = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")


def _pipeline():
    return load_script("fashion_mnist")


def test_pipeline_tiny(tmp_path):
    fm = _pipeline()
    out = tmp_path / "r.json"
    argv = ["--arch", "resnet20", "--seeds", "3", "--train-subset", "256", "--test-subset", "200",
            "--dense-epochs", "1", "--epochs", "2", "--targets", "0.5", "--runs", str(tmp_path / "runs"),
            "--out", str(out), "--no-timing"]
    assert fm.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    methods = sorted(r["method"] for r in rows)
    assert methods == ["dense", "manidp", "no-manifold (FBS-like)", "static (L1, uniform)"]
    for r in rows:
        assert 0.0 <= r["top1"] <= 100.0 and 0.0 <= r["flops_reduction"] < 1.0
    manidp = next(r for r in rows if r["method"] == "manidp")
    assert manidp["engine_top1"] == manidp["top1"]  # the deployed engine, same test split: equal, as the README says
    static = next(r for r in rows if r["method"].startswith("static"))
    assert static["flops_reduction"] == pytest.approx(manidp["flops_reduction"], abs=0.05)

    logs = tmp_path / "r_logs" / "resnet20_s3"  # every run's training log beside the result JSON
    assert sorted(f.name for f in logs.iterdir()) == ["dense.jsonl", "fbs_t0.5.jsonl", "manidp_t0.5.jsonl",
                                                      "static_t0.5.jsonl"]
    assert json.loads((logs / "dense.jsonl").read_text().splitlines()[-1])["epoch"] == 0

    mtime = os.path.getmtime(tmp_path / "runs" / "resnet20_s3" / "manidp_t0.5" / "last.pth")
    assert fm.main(argv) == 0  # finished runs are reused, not retrained
    assert os.path.getmtime(tmp_path / "runs" / "resnet20_s3" / "manidp_t0.5" / "last.pth") == mtime

    md = tmp_path / "r.md"
    fm.main(["summarize", str(md), str(out)])
    text = md.read_text()
    assert text.count("| resnet20 |") == 2 * len(rows)  # the per-seed summary and the per-run table
    assert "CPU speedup b1" in text
