"""benchmarks/accuracy_latency.py on a tiny runs directory: every kind of point, dense winners among the dense
runtimes, skipped runs named, the JSON schema, the tables and the plots."""

import json
import os
import shutil
import warnings

import pytest
import torch

from manidp.bench import fashion_mnist_available
from manidp.bench.frontier import is_dense_runtime
from manidp.bench.runtimes import RUNTIMES, missing_reason
from manidp.checkpoint import CHECKPOINT_FORMAT, atomic_save, read_checkpoint, rebuild_model, with_digest
from manidp.data import build_dataset, eval_batches
from manidp.deploy import compile as compile_engine
from manidp.deploy.backends import available_backends
from manidp.flops import dense_macs
from manidp.models import build_model, load_dense_state_dict
from manidp.static_pruning import StaticPrunedResNet, static_pruned_like
from manidp.train import train

from conftest import load_script, threads

DATASET = "fashion-mnist" if fashion_mnist_available() else "synthetic"
DATA = dict(dataset=DATASET, train_subset=64, test_subset=64, batch_size=32, ngpu=0, quiet=True)
STATIC_KEEP = 0.5


def _tool():
    """A fresh copy of the script as a module (registered, as its dataclasses need)."""
    return load_script("accuracy_latency")


# ---------------------------------------------------------------------------- a tiny runs directory
@torch.no_grad()
def _top1(net, test_ds) -> float:
    net.eval()
    correct = total = 0
    for x, y in eval_batches(test_ds, 64):
        correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def _write_static_run(path: str, dense_dir: str, keep: float) -> None:
    """A static run as a checkpoint with ``widths`` and a log line, written with manidp-train's writers.

    The narrow network is cut from the dense one and not fine-tuned (its accuracy is what it is).
    """
    ckpt = read_checkpoint(os.path.join(dense_dir, "last.pth"))
    dense = build_model("resnet20", num_classes=10, in_channels=ckpt["dataset"]["in_channels"])
    load_dense_state_dict(dense, ckpt["state_dict"])
    net = static_pruned_like(dense.eval(), keep).eval()
    data = build_dataset(DATASET, train_subset=DATA["train_subset"], test_subset=DATA["test_subset"])
    size = data.info.input_size
    macs = net.macs(size)
    os.makedirs(path)
    atomic_save(with_digest({"format": CHECKPOINT_FORMAT, "arch": "resnet20", "dense": True,
                             "widths": list(net.widths), "state_dict": net.state_dict(),
                             "args": dict(ckpt["args"], save_path=path), "dataset": ckpt["dataset"]}),
                os.path.join(path, "last.pth"))
    line = {"epoch": 0, "top1": _top1(net, data.test), "flops_reduction": 1.0 - macs / dense_macs(dense, size),
            "mean_macs": float(macs), "dense_macs": dense_macs(dense, size)}
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.write(json.dumps(line) + "\n")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> str:
    """resnet20_s1: dense, manidp_t0.5, fbs_t0.5 (one epoch each), static_k0.5, and an unfinished
    manidp_t0.4; resnet20_s2: no dense run, one unfinished FBS-like run."""
    root = tmp_path_factory.mktemp("runs")
    base = root / "resnet20_s1"
    with warnings.catch_warnings(), threads(1):
        warnings.simplefilter("ignore")
        train(arch="resnet20", dense=True, epochs=1, lr=0.1, save_path=str(base / "dense"), manualSeed=1, **DATA)
        for tag, graph in (("manidp", 1.0), ("fbs", 0.0)):
            train(arch="dyresnet20", epochs=1, lr=0.02, target_remain_rate=0.5, lambda_graph=graph,
                  pretrain_path=str(base / "dense"), save_path=str(base / f"{tag}_t0.5"), manualSeed=1, **DATA)
        _write_static_run(str(base / f"static_k{STATIC_KEEP}"), str(base / "dense"), STATIC_KEEP)
    unfinished = base / "manidp_t0.4"
    unfinished.mkdir()
    shutil.copy(base / "manidp_t0.5" / "log.jsonl", unfinished / "log.jsonl")
    (root / "resnet20_s2" / "fbs_t0.5").mkdir(parents=True)
    return str(root)


def test_static_checkpoint_rebuilds_as_a_narrow_network(runs_dir):
    path = os.path.join(runs_dir, "resnet20_s1", f"static_k{STATIC_KEEP}", "last.pth")
    assert isinstance(rebuild_model(read_checkpoint(path), path), StaticPrunedResNet)


@pytest.fixture(scope="module")
def engine_file(runs_dir, tmp_path_factory) -> str:
    """The ManiDP run compiled and saved as an engine file (an --engine point)."""
    path = str(tmp_path_factory.mktemp("engines") / "manidp_t0.5.pt")
    compile_engine(os.path.join(runs_dir, "resnet20_s1", "manidp_t0.5", "last.pth")).save(path)
    return path


@pytest.fixture(scope="module")
def result(runs_dir, engine_file, tmp_path_factory):
    """The tool run once on ``runs_dir`` and ``engine_file`` with tiny iteration counts: (exit status, out
    directory, results)."""
    tool = _tool()
    out = tmp_path_factory.mktemp("out")
    backends = [b for b in ("cpu", "reference") if b in available_backends(torch.device("cpu"))][:1]
    argv = ["--runs", runs_dir, "--out", str(out), "--batch-sizes", "1,4", "--threads", "1", "--data", DATASET,
            "--backends", ",".join(backends), "--warmup", "1", "--iters", "2", "--min-iters", "1",
            "--time-budget", "0", "--num-batches", "2", "--engine", engine_file]
    status = tool.main(argv)
    with open(out / "results.json") as f:
        return status, out, json.load(f)


# ---------------------------------------------------------------------------- the tool
def test_every_kind_of_point_at_every_batch_size(result):
    status, _, doc = result
    assert status == 0
    assert doc["format"] == "manidp.accuracy_latency/1"
    assert doc["settings"]["batch_sizes"] == [1, 4]
    for bs in (1, 4):
        methods = sorted(p["method"] for p in doc["points"] if p["batch_size"] == bs)
        assert methods == ["dense", "fbs", "manidp", "manidp", "static"]
    for p in doc["points"]:
        assert set(p) >= {"batch_size", "run", "arch", "seed", "method", "kind", "top1", "mac_fraction", "latency_ms",
                          "runtime", "load_average", "timings", "best_dense", "speedup_vs_best_dense"}
        assert p["latency_ms"] > 0 and 0.0 <= p["top1"] <= 100.0
        assert len(p["load_average"]) == 3
        for r in p["timings"].values():  # two rounds (the default), each row its best
            assert len(r["round_medians_ms"]) == 2
            if r["status"] == "ok":
                assert r["median_ms"] == min(v for v in r["round_medians_ms"] if v is not None)


def test_dense_and_static_points_are_won_by_a_dense_runtime(result):
    _, _, doc = result
    for p in doc["points"]:
        if p["kind"] in ("dense", "static"):
            assert is_dense_runtime(p["runtime"]), p["runtime"]
            assert p["latency_ms"] == min(r["median_ms"] for r in p["timings"].values() if r["status"] == "ok")
            for name, r in p["timings"].items():
                if r["status"] == "ok" and name != "pytorch-eager":
                    assert r["argmax_agreement"] == 1.0 and r["max_abs_diff"] < 1e-3, name
        else:
            assert p["runtime"].startswith("engine-") and not is_dense_runtime(p["runtime"])
    dense = [p for p in doc["points"] if p["kind"] == "dense"]
    assert all(any(n.startswith("engine-open-") for n in p["timings"]) for p in dense)


def test_onnx_runtimes_are_timed_or_skipped_with_the_reason(result):
    _, _, doc = result
    for p in (p for p in doc["points"] if p["kind"] != "gated"):
        for rt in RUNTIMES:
            r = p["timings"][rt.dist]
            if missing_reason(rt) is None:
                assert r["status"] == "ok", r["reason"]
            else:
                assert r["status"] == "skipped" and rt.module in r["reason"]


def test_gated_points_carry_the_best_dense_time_of_the_same_run(result):
    _, _, doc = result
    dense = {p["batch_size"]: p for p in doc["points"] if p["kind"] == "dense"}
    for p in (p for p in doc["points"] if p["kind"] == "gated"):
        ref = dense[p["batch_size"]]
        assert p["best_dense"]["run"] == "resnet20_s1/dense"
        assert p["best_dense"]["median_ms"] == ref["latency_ms"]
        assert p["speedup_vs_best_dense"] == pytest.approx(ref["latency_ms"] / p["latency_ms"])


def test_gated_runs_are_evaluated_with_the_deployed_engine(result):
    _, _, doc = result
    gated = [r for r in doc["runs"] if r["kind"] == "gated" and r["run"] != "manidp_t0.5.pt"]
    assert len(gated) == 2
    for r in gated:
        assert r["engine_images"] == DATA["test_subset"]
        assert abs(r["engine_top1"] - r["top1"]) <= 100.0 / DATA["test_subset"] + 1e-9  # at most one image apart
    static = next(r for r in doc["runs"] if r["kind"] == "static")
    assert static["widths"] and static["mac_fraction"] < 1.0


def test_engine_file_point_is_the_deployed_engine_on_the_whole_test_split(result, engine_file):
    _, _, doc = result
    [rec] = [r for r in doc["runs"] if r["run"] == "manidp_t0.5.pt"]
    assert rec["path"] == engine_file and rec["method"] == "manidp" and rec["arch"] == "resnet20"
    assert rec["engine_images"] == len(build_dataset(DATASET).test)
    assert rec["top1"] == rec["engine_top1"] and rec["mac_fraction"] == pytest.approx(rec["engine_mac_fraction"])
    points = [p for p in doc["points"] if p["run"] == "manidp_t0.5.pt"]
    assert [p["batch_size"] for p in points] == [1, 4]
    for p in points:  # its seed (0) has no dense run: another seed's is the reference
        assert p["runtime"].startswith("engine-") and p["best_dense"]["run"] == "resnet20_s1/dense"


def test_engine_argument_that_is_not_an_engine_is_a_usage_error(runs_dir, tmp_path):
    bad = tmp_path / "not_an_engine.pt"
    bad.write_bytes(b"not a torch file")
    tool = _tool()
    for spec in (str(bad), str(tmp_path / "missing.pt")):
        assert tool.main(["--runs", runs_dir, "--out", str(tmp_path / "out"), "--engine", spec]) == 2


def test_missing_and_unfinished_runs_are_skipped_with_a_note(result):
    _, out, doc = result
    reasons = {n["run"]: n["reason"] for n in doc["skipped"]}
    assert reasons["resnet20_s1/manidp_t0.4"].startswith("unfinished")
    assert reasons["resnet20_s2/dense"].startswith("missing")
    assert reasons["resnet20_s2/fbs_t0.5"].startswith("missing")
    assert "resnet20_s1/manidp_t0.4" in (out / "README.md").read_text()


def test_plots_and_tables_are_written(result):
    _, out, _ = result
    for bs in (1, 4):
        assert (out / f"b{bs}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "README.md").read_text()
    for bs in (1, 4):
        assert f"## Batch {bs}" in text and f"(b{bs}.png)" in text
    assert text.count("| resnet20 | ManiDP t0.5 | 1 |") == 2
    assert "**ahead**" in text or "**behind**" in text


def test_recorded_static_runs_are_timed_at_their_widths(result, runs_dir, tmp_path):
    """--static-from: static runs of an earlier results.json whose checkpoints are gone are cut to their
    recorded widths from this run's dense network, timed, and placed at their recorded top-1."""
    _, _, earlier = result
    [rec] = [r for r in earlier["runs"] if r["kind"] == "static"]
    narrower = dict(rec, run="resnet20_s1/static_k0.3", setting="k0.3", top1=12.5,
                    widths=[max(1, w * 3 // 5) for w in rec["widths"]])
    earlier_file = tmp_path / "earlier.json"
    earlier_file.write_text(json.dumps(dict(earlier, runs=earlier["runs"] + [narrower])))
    only_dense = tmp_path / "runs" / "resnet20_s1"
    shutil.copytree(os.path.join(runs_dir, "resnet20_s1", "dense"), only_dense / "dense")
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--batch-sizes", "1", "--threads", "1",
            "--data", DATASET, "--warmup", "0", "--iters", "1", "--min-iters", "1", "--time-budget", "0",
            "--num-batches", "1", "--static-from", str(earlier_file)]
    assert _tool().main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    recorded = {r["run"]: r for r in doc["runs"] if r["recorded_in"]}
    assert sorted(recorded) == sorted([rec["run"], "resnet20_s1/static_k0.3"])
    for r in (rec, narrower):
        assert recorded[r["run"]]["widths"] == r["widths"] and recorded[r["run"]]["top1"] == r["top1"]
        assert recorded[r["run"]]["mac_fraction"] == pytest.approx(r["mac_fraction"])
        [p] = [p for p in doc["points"] if p["run"] == r["run"]]
        assert p["latency_ms"] > 0 and is_dense_runtime(p["runtime"]) and p["recorded_in"] == str(earlier_file)
        assert p["best_dense"]["run"] == "resnet20_s1/dense"
    assert "(recorded)" in (out / "README.md").read_text()


def test_static_from_a_file_that_is_not_a_results_file_is_a_usage_error(runs_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else", "runs": []}))
    tool = _tool()
    for path in (bad, tmp_path / "missing.json"):
        assert tool.main(["--runs", runs_dir, "--out", str(tmp_path / "out"), "--static-from", str(path)]) == 2


def test_missing_runs_directory_is_a_usage_error(tmp_path):
    assert _tool().main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2


def test_run_names_with_a_threshold_window(tmp_path):
    """manidp_t0.6_w50 and its static match static_t0.6_w50 (fashion_mnist.py --thre-window) are runs too."""
    seed_dir = tmp_path / "resnet20_s1"
    for name in ("dense", "manidp_t0.6", "manidp_t0.6_w50", "fbs_t0.6_w50", "static_t0.6_w50", "static_k0.5",
                 "manidp_t0.6_wx"):
        (seed_dir / name).mkdir(parents=True)
    runs, notes = _tool().find_runs(str(tmp_path))
    assert sorted((r.method, r.setting or "") for r in runs) == [
        ("dense", ""), ("fbs", "t0.6_w50"), ("manidp", "t0.6"), ("manidp", "t0.6_w50"),
        ("static", "k0.5"), ("static", "t0.6_w50")]
    assert notes == []


# ---------------------------------------------------------------------------- the reading
def _pt(run, kind, ms, top1):
    return {"run": run, "kind": kind, "arch": "resnet20", "batch_size": 1, "latency_ms": ms, "top1": top1}


def test_reading_names_the_point_that_beats_manidp():
    tool = _tool()
    points = [_pt("dense", "dense", 2.0, 90.0), _pt("static", "static", 1.0, 89.0), _pt("manidp", "gated", 1.5, 88.0)]
    [line] = tool.reading(points, 1)
    assert "**behind**" in line and line.index("static") > line.index("manidp")
    points[-1]["top1"] = 89.5
    [line] = tool.reading(points, 1)
    assert "**ahead**" in line and "static" in line
    points[-1]["latency_ms"] = 0.5
    [line] = tool.reading(points, 1)
    assert "faster than every dense and static network" in line


def test_static_frontier_keeps_the_points_no_faster_one_matches():
    points = [_pt("k0.3", "static", 1.0, 88.0), _pt("k0.5", "static", 2.0, 87.5), _pt("k0.7", "static", 3.0, 90.0)]
    assert [p["run"] for p in _tool().static_frontier(points)] == ["k0.3", "k0.7"]
