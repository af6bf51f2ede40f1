"""manidp-bench end to end on the CPU with tiny settings, its report files, and its errors."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from manidp import bench
from manidp.bench import main, validate_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-sizes", "1,2", "--iters", "2", "--warmup", "1", "--time-budget", "0", "--num-batches", "2",
        "--calib-images", "64", "--threads", "1", "--quiet"]


def _run(argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    threads = torch.get_num_threads()
    out_dir = tmp_path_factory.mktemp("bench")
    argv = ["--model", "dyresnet20", "--data", "synthetic", "--out", str(out_dir)] + TINY
    code, stdout, stderr = _run(argv)
    torch.set_num_threads(threads)
    assert code == 0, stderr
    with open(out_dir / "report.json") as f:
        report = json.load(f)
    return {"dir": out_dir, "stdout": stdout, "stderr": stderr, "report": report, "argv": argv}


def test_report_files_exist(tiny_run):
    for name in ("report.json", "report.md", "report.png"):
        assert (tiny_run["dir"] / name).stat().st_size > 0


def test_json_schema(tiny_run):
    report = tiny_run["report"]
    assert validate_report(report) == []
    assert report["schema"] == "manidp-bench/1"
    env, cfg = report["environment"], report["config"]
    assert env["command_line"].startswith("manidp-bench --model dyresnet20")
    assert env["argv"] == tiny_run["argv"]
    assert env["device"] == "cpu" and env["cpu_threads"] == 1 and env["torch"] == torch.__version__
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    assert cfg["batch_sizes"] == [1, 2] and cfg["arch"] == "dyresnet20" and cfg["model_source"] == "architecture"
    assert cfg["target_macs"] == 0.45 and report["model"]["calibration"]["target_macs"] == 0.45
    assert "reference" in cfg["backends"]
    names = {m["name"]: m for m in report["methods"]}
    for name in ("dense-eager", "dense-folded", "dense-folded-cl", "masked", "gated-reference", "static-folded",
                 "static-folded-cl"):
        assert names[name]["status"] == "ok", (name, names[name]["reason"])
    assert names["dense-compile"]["status"] == "skipped" and "opt-in" in names["dense-compile"]["reason"]
    for backend in cfg["backends"]:
        assert names[f"gated-{backend}"]["kind"] == "gated"
    # the schema itself catches broken reports
    broken = json.loads(json.dumps(report))
    del broken["environment"]["torch"]
    broken["methods"][0]["kind"] = "magic"
    assert len(validate_report(broken)) == 2


def test_raw_numbers_are_consistent(tiny_run):
    report = tiny_run["report"]
    dense = report["macs"]["dense"]
    assert dense == report["model"]["dense_macs"] == 40_808_576 or dense > 0
    for row in report["macs"]["per_batch_size"]:
        per = row["per_instance"]
        assert len(per) == row["batch_size"] * report["config"]["num_batches"]
        assert row["mean_dynamic"] == pytest.approx(np.mean(per))
        assert row["ideal_speedup"] == pytest.approx(dense / row["mean_dynamic"])
        assert 0.3 < row["fraction"] < 0.6
    assert abs(report["static"]["fraction"] - report["macs"]["overall_mean_fraction"]) < 0.05
    by_bs = {s["batch_size"]: s for s in report["summary"]}
    for m in report["methods"]:
        for r in m["results"]:
            if r["status"] != "ok":
                assert r["median_ms"] is None and r["times_ms"] == []
                continue
            assert len(r["times_ms"]) == r["iters"] == 2 and len(r["warmup_ms"]) == 1
            assert r["median_ms"] == pytest.approx(float(np.median(r["times_ms"])))
            assert r["p90_ms"] == pytest.approx(float(np.percentile(r["times_ms"], 90)))
            assert r["throughput_ips"] == pytest.approx(r["batch_size"] * 1e3 / r["median_ms"])
            s = by_bs[r["batch_size"]]
            assert r["speedup_vs_best_dense"] == pytest.approx(s["best_dense_median_ms"] / r["median_ms"])
            if m["kind"] == "gated":  # same outputs as the original masked forward
                assert r["max_abs_diff"] < 1e-3 and r["argmax_agreement"] == 1.0
                assert r["mean_macs"] > 0
            if m["name"].startswith("dense-folded"):
                assert r["max_abs_diff"] < 1e-3
    for s in report["summary"]:
        dense_ok = [r["median_ms"] for m in report["methods"] if m["kind"] == "dense" for r in m["results"]
                    if r["batch_size"] == s["batch_size"] and r["status"] == "ok"]
        assert s["best_dense_median_ms"] == min(dense_ok)
        assert s["ideal_ms"] == pytest.approx(s["best_dense_median_ms"] / s["ideal_speedup"])
        assert s["realized_over_ideal"] == pytest.approx(s["best_gated_speedup"] / s["ideal_speedup"])


def _expected_cells(report):
    """(method, batch) -> the strings the table must show, derived from the JSON values."""
    cells = {}
    for m in report["methods"]:
        for r in m["results"]:
            if r["status"] == "ok":
                cells[(m["name"], r["batch_size"])] = [f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
                                                       f"{r['throughput_ips']:.1f}",
                                                       f"{r['speedup_vs_best_dense']:.2f}x"]
            else:
                cells[(m["name"], r["batch_size"])] = [r["status"]]
    for s in report["summary"]:
        cells[("ideal", s["batch_size"])] = [f"{s['ideal_ms']:.3f}", f"{s['batch_size'] * 1e3 / s['ideal_ms']:.1f}",
                                             f"{s['ideal_speedup']:.2f}x"]
    return cells


def _check_rows(rows, report):
    expected = _expected_cells(report)
    seen = set()
    for cells in rows:
        key = (cells[0], int(cells[1]))
        assert key in expected, key
        assert [c for c in cells[2:] if c] == expected[key], key
        seen.add(key)
    assert seen == set(expected)


def test_terminal_table_matches_json(tiny_run):
    names = {m["name"] for m in tiny_run["report"]["methods"]} | {"ideal"}
    rows = [line.split() for line in tiny_run["stdout"].splitlines()]
    rows = [r for r in rows if len(r) >= 3 and r[0] in names and r[1].isdigit()]
    _check_rows(rows, tiny_run["report"])
    assert "ideal" in tiny_run["stdout"] and "report.json" in tiny_run["stdout"]


def test_markdown_matches_json(tiny_run):
    text = (tiny_run["dir"] / "report.md").read_text()
    names = {m["name"] for m in tiny_run["report"]["methods"]} | {"ideal"}
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] in names:
                rows.append(cells)
    _check_rows(rows, tiny_run["report"])
    assert tiny_run["report"]["environment"]["command_line"] in text


def test_plot_is_a_png(tiny_run):
    path = tiny_run["dir"] / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_engine_file_input(tmp_path):
    """A DynamicResNet file: dense and masked rebuilt from folded tensors, numerically equal."""
    from manidp.calibrate import calibrate_bn, calibrate_target_macs
    from manidp.deploy import compile as compile_engine
    from manidp.models import build_model
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("dyresnet20", in_channels=1).eval()
        x = torch.randn(16, 1, 32, 32)
        calibrate_bn(model, x)
        calibrate_target_macs(model, x, 0.5)
        engine = compile_engine(model)
        path = tmp_path / "engine.pt"
        engine.save(str(path))
        gated = bench.gated_model_from_engine(engine)
        with torch.no_grad():
            torch.testing.assert_close(gated(x), model(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(bench.dense_model_from_gated(gated)(x),
                                       bench.dense_model_from_gated(model)(x), rtol=1e-4, atol=1e-4)
        code, stdout, stderr = _run(["--model", str(path), "--out", str(tmp_path / "out"), "--batch-sizes", "1",
                                     "--iters", "1", "--warmup", "0", "--time-budget", "0", "--num-batches", "1",
                                     "--calib-images", "4", "--data", "synthetic", "--quiet",
                                     "--static-sizing", "widths"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert validate_report(report) == []
    assert report["config"]["model_source"] == "engine-file" and report["config"]["target_macs"] is None
    assert report["config"]["in_channels"] == 1
    assert report["static"]["keep"] is None and len(report["static"]["widths"]) == 9
    ok = {m["name"]: m for m in report["methods"]}
    assert ok["gated-reference"]["results"][0]["max_abs_diff"] < 1e-3
    assert ok["dense-folded"]["results"][0]["max_abs_diff"] < 1e-3


def test_data_sources(tmp_path):
    imgs = (torch.rand(5, 28, 28) * 255).to(torch.uint8)
    torch.save({"images": imgs}, tmp_path / "imgs.pt")
    x, info = bench.load_images(str(tmp_path / "imgs.pt"), 1, (32, 32), 100)
    assert x.shape == (5, 1, 32, 32) and info["name"] == "tensor-file"
    from PIL import Image
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(d / f"{i}.png")
    x, info = bench.load_images(str(d), 3, (32, 32), 100)
    assert x.shape == (3, 3, 32, 32) and info["num_images"] == 3
    x, info = bench.load_images("synthetic", 3, (32, 32), 7)
    assert x.shape == (7, 3, 32, 32)
    if bench.fashion_mnist_available():
        x, info = bench.load_images("fashion-mnist", 1, (32, 32), 50)
        assert x.shape == (50, 1, 32, 32) and info["name"] == "fashion-mnist"
        assert abs(float(x[:, :, 2:30, 2:30].mean())) < 0.5  # normalised
        assert float(x[:, :, :2].abs().max()) == 0.0          # padding


def _error(argv):
    code, stdout, stderr = _run(argv)
    assert code == 2, (argv, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("manidp-bench: error:"), stderr
    return lines[0]


def test_errors(tmp_path):
    assert "unknown backend 'nope'" in _error(["--model", "dyresnet20", "--backends", "reference,nope"])
    assert "unknown architecture 'dyresnet21'" in _error(["--model", "dyresnet21"])
    assert "gated" in _error(["--model", "resnet20"])
    assert "no model file" in _error(["--model", str(tmp_path / "missing.pt")])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a model")
    assert "neither" in _error(["--model", str(junk)])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert "neither a DynamicResNet file nor a manidp-train checkpoint" in _error(["--model", str(other)])
    _error(["--batch-sizes", "0,1"])
    _error(["--target-macs", "1.5"])
    _error(["--dtype", "float64"])
    _error(["--model", "dyresnet20", "--data", str(tmp_path / "nothing-here")])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _error(["--device", "cuda"])


def test_python_dash_m():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "manidp.bench", "--model", "dyresnet999"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("manidp-bench: error: unknown architecture")
    code, stdout, _ = _run(["--help"])
    assert code == 0 and "--target-macs" in stdout and "--backends" in stdout


def test_default_model_path(tmp_path, monkeypatch):
    """No --model: the shipped asset through manidp.default_model(), on its own test images."""
    import manidp
    from manidp.calibrate import calibrate_bn, calibrate_target_macs
    from manidp.deploy import DynamicResNet, compile as compile_engine
    from manidp.models import build_model
    torch.manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("dyresnet20", in_channels=1).eval()
        x = torch.randn(32, 1, 32, 32)
        calibrate_bn(model, x)
        calibrate_target_macs(model, x, 0.5)
        pre = {"scale": 255.0, "mean": [0.2860], "std": [0.3530], "pad": 2}
        path = tmp_path / "default_model.pt"
        compile_engine(model, preprocess=pre).save(str(path))
        monkeypatch.setattr(bench, "_default_asset", lambda: str(path))
        monkeypatch.setattr(manidp, "default_model", lambda device="cpu", **kw: DynamicResNet.load(str(path), device),
                            raising=False)
        code, stdout, stderr = _run(["--out", str(tmp_path / "out"), "--batch-sizes", "2", "--iters", "1",
                                     "--warmup", "0", "--time-budget", "0", "--num-batches", "1", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert validate_report(report) == []
    assert report["config"]["model_source"] == "default-asset" and report["config"]["target_macs"] is None
    assert report["model"]["preprocess"]["pad"] == 2
    assert report["config"]["data"] == ("fashion-mnist" if bench.fashion_mnist_available() else "synthetic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_end_to_end(tmp_path, dtype):
    code, stdout, stderr = _run(["--model", "dyresnet20", "--device", "cuda", "--dtype", dtype, "--compile", "off",
                                 "--out", str(tmp_path), "--batch-sizes", "1,4", "--iters", "3", "--warmup", "2",
                                 "--time-budget", "0", "--num-batches", "2", "--quiet"])
    assert code == 0, stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert validate_report(report) == []
    assert report["environment"]["device_name"] and report["config"]["tf32"] is True
    methods = {m["name"]: m for m in report["methods"]}
    assert methods["dense-cl-graph"]["status"] == "ok", methods["dense-cl-graph"]["reason"]
    assert methods["static-cl-graph"]["status"] == "ok", methods["static-cl-graph"]["reason"]
    assert methods["gated-reference-graph"]["status"] == "skipped"
    for backend in report["config"]["backends"]:
        assert methods[f"gated-{backend}"]["status"] == "ok", methods[f"gated-{backend}"]["reason"]
        if backend in ("triton", "cuda"):
            graph = methods[f"gated-{backend}-graph"]
            assert graph["status"] == "ok", graph["reason"]
            assert all(r["max_abs_diff"] < 0.1 for r in graph["results"])


def test_checkpoint_input(tmp_path):
    """A manidp-train checkpoint: the gated model with its BN, and the engine compiled from it."""
    from manidp.models import build_model
    model = build_model("dyresnet20", in_channels=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"arch": "dyresnet20", "state_dict": model.state_dict(),
                "dataset": {"name": "fashion-mnist", "input_size": [32, 32]}}, path)
    gated, engine, source, pre = bench._load_model_file(str(path))
    assert source == "checkpoint" and not getattr(gated, "_manidp_from_engine", False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) and m.eps > 0 for m in gated.modules())
    assert engine.config["arch"] == "dyresnet20" and pre is not None and pre["pad"] == 2
    torch.save({"arch": "resnet20", "state_dict": build_model("resnet20").state_dict()}, tmp_path / "d.pt")
    assert "dense model" in _error(["--model", str(tmp_path / "d.pt")])
