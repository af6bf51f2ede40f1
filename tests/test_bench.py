"""manidp-bench end to end on the CPU with tiny settings, its report files, and its errors."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import calibrated
from manidp import bench
from manidp.bench import main, validate_report
from manidp.preprocess import preprocess_spec

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
    assert report["schema"] == "manidp-bench/2"
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
        assert names[f"gated-{backend}"]["kind"] == "gated" and names[f"gated-{backend}"]["runtime"] == "manidp"
        opened = names[f"gated-{backend}-open"]
        assert opened["kind"] == "dense" and opened["status"] == "ok" and opened["baseline"] == "dense-eager"
    assert cfg["method_order"] == "forward" and "child process" in env["runtime_isolation"]
    # CPU defaults: every method in a process of its own, two rounds, each row its best round
    assert cfg["isolation"] == "process" and cfg["rounds"] == 2
    for m in report["methods"]:
        for r in m["results"]:
            assert len(r["round_medians_ms"]) == 2
            if r["status"] == "ok":
                assert r["median_ms"] == min(v for v in r["round_medians_ms"] if v is not None)
    # the schema itself catches broken reports
    broken = json.loads(json.dumps(report))
    del broken["environment"]["torch"]
    broken["methods"][0]["kind"] = "magic"
    assert len(validate_report(broken)) == 2


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_rows(tiny_run, runtime):
    """dense-<rt> and static-<rt> rows: timed in a child process with the run's threads, or skipped with why."""
    from manidp.bench.runtimes import RUNTIMES, missing_reason
    rt = next(r for r in RUNTIMES if r.dist == runtime)
    report = tiny_run["report"]
    names = {m["name"]: m for m in report["methods"]}
    assert report["environment"][runtime] == names[f"dense-{rt.tag}"]["runtime_version"]
    for prefix, baseline in (("dense", "dense-eager"), ("static", "static-folded")):
        m = names[f"{prefix}-{rt.tag}"]
        assert m["runtime"] == runtime and m["isolation"] == "child-process" and m["baseline"] == baseline
        if missing_reason(rt) is not None:
            assert m["status"] == "skipped" and m["reason"] == missing_reason(rt)
            continue
        assert m["status"] == "ok", m["reason"]
        assert m["kind"] == prefix and m["runtime_version"]
        assert m["runtime_settings"]["intra_op_num_threads" if rt.tag == "ort" else "INFERENCE_NUM_THREADS"] == 1
        for r in m["results"]:
            assert r["status"] == "ok" and r["max_abs_diff"] < 1e-3 and r["argmax_agreement"] == 1.0


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
            if m["kind"] == "dense" and m["baseline"]:  # every dense runtime computes the same network
                assert r["max_abs_diff"] < 1e-3, m["name"]
            if m["name"].endswith("-open"):
                assert r["mean_macs"] > dense
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
    from manidp.deploy import compile as compile_engine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, x = calibrated("dyresnet20", (32, 32), n=16, in_channels=1, target_macs=0.5)
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
                                     "--static-sizing", "widths", "--isolation", "in-process", "--rounds", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert validate_report(report) == []
    assert report["config"]["model_source"] == "engine-file" and report["config"]["target_macs"] is None
    assert report["config"]["in_channels"] == 1
    assert report["static"]["keep"] is None and len(report["static"]["widths"]) == 9
    assert all(isinstance(k, int) for k in report["static"]["widths"])
    assert abs(report["static"]["fraction"] - report["macs"]["overall_mean_fraction"]) < 0.1
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


def _write_idx(path, images):
    import gzip
    n, h, w = images.shape
    head = b"".join(v.to_bytes(4, "big") for v in (0x0803, n, h, w))
    with gzip.open(path, "wb") as f:
        f.write(head + images.numpy().tobytes())


def _fashion_sources(tmp_path):
    """(data spec, raw uint8 images): a generated Fashion-MNIST-like IDX directory, and the real one."""
    raw = (torch.rand(40, 28, 28) * 255).to(torch.uint8)
    raw[:, 10:18, 10:18] = 0  # zeros inside the image too: only the border comes from padding
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    _write_idx(d / "t10k-images-idx3-ubyte.gz", raw)
    sources = [(str(d), raw)]
    if bench.fashion_mnist_available():
        from manidp.data import DEFAULT_FASHION_MNIST_PATH, read_idx
        real = read_idx(os.path.join(DEFAULT_FASHION_MNIST_PATH, "t10k-images-idx3-ubyte.gz"))[:50]
        sources.append(("fashion-mnist", torch.from_numpy(real.copy())))
    return sources


@pytest.mark.parametrize("with_engine_spec", [True, False])
def test_fashion_mnist_inputs_equal_engine_preprocess(tmp_path, with_engine_spec):
    """Bench inputs are exactly what training and engine.preprocess feed the model: the raw image is
    zero-padded first, so the border is -mean/std, not 0."""
    from manidp.deploy import compile as compile_engine
    from manidp.models import build_model
    spec = preprocess_spec("fashion-mnist")
    engine = compile_engine(build_model("dyresnet20", in_channels=1), preprocess=spec)
    border = float(((torch.zeros(1) / 255.0 - spec["mean"][0]) / spec["std"][0])[0])
    assert border == pytest.approx(-0.2860 / 0.3530)
    for data, raw in _fashion_sources(tmp_path):
        x, info = bench.load_images(data, 1, (32, 32), len(raw), preprocess=spec if with_engine_spec else None)
        assert x.shape == (len(raw), 1, 32, 32) and info["name"] == "fashion-mnist"
        assert torch.equal(x, engine.preprocess(raw))
        pad = torch.ones(32, 32, dtype=torch.bool)
        pad[2:30, 2:30] = False
        assert bool((x[:, :, pad] == border).all())
        assert abs(float(x[:, :, 2:30, 2:30].mean())) < 1.0  # normalised


def test_schema_doc_is_generated_from_the_schema():
    """docs/bench_schema.md is exactly what `python -m manidp.bench.schema_doc` writes."""
    from manidp.bench.schema_doc import render_markdown
    with open(os.path.join(ROOT, "docs", "bench_schema.md")) as f:
        assert f.read() == render_markdown()


def test_measure_counts_and_budget():
    from manidp.bench import measure, measure_interleaved, summarize_times
    calls = []
    cpu = torch.device("cpu")
    times, warm = measure(calls.append, [0, 1, 2], cpu, warmup=2, iters=5)
    assert len(warm) == 2 and len(times) == 5 and calls == [0, 1, 2, 0, 1, 2, 0]
    times, _ = measure(lambda x: time.sleep(0.01), [None], cpu, warmup=0, iters=1000, min_iters=3, budget=0.02)
    assert 3 <= len(times) < 1000
    times, _ = measure(lambda x: None, [None], cpu, warmup=0, iters=4, clock="thread")
    assert len(times) == 4 and min(times) >= 0
    order = []
    out = measure_interleaved({"a": (lambda x: order.append("a"), [0]), "b": (lambda x: order.append("b"), [0])},
                              cpu, warmup=1, iters=3)
    assert order == ["a", "b"] * 4 and [len(v) for v in out.values()] == [3, 3]
    stats = summarize_times([1.0, 2.0, 3.0, 4.0], batch_size=8)
    assert stats["median_ms"] == 2.5 and stats["iters"] == 4 and stats["throughput_ips"] == pytest.approx(3200.0)


def test_time_share_splits_max_time():
    from manidp.bench.timing import TimeShare
    assert TimeShare(0, 1.5, 2, 3).limits(10) == (1.5, 2, 3)  # no overall limit
    budget, warmup, min_iters = TimeShare(100.0, 0.0, 2, 3).limits(10)
    assert 9.0 < budget <= 10.0 and (warmup, min_iters) == (2, 3)
    spent = TimeShare(1e-9, 1.5, 2, 3)
    time.sleep(0.001)
    assert spent.limits(5) == (1e-3, 1, 1)


def test_folded_dense_equals_dense():
    from manidp.models import build_model
    model, x = calibrated("dyresnet20", (32, 32), n=4)
    dense = bench.dense_model_from_gated(model)
    with torch.no_grad():
        torch.testing.assert_close(bench.folded_dense(model)(x), dense(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bench.folded_dense(dense)(x), dense(x), rtol=1e-4, atol=1e-4)
    assert isinstance(dense, type(build_model("resnet20")))


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
    """No --model: the shipped asset (manidp.pretrained.DEFAULT_MODEL_PATH), on its own test images."""
    from manidp import pretrained
    from manidp.deploy import compile as compile_engine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = calibrated("dyresnet20", (32, 32), n=32, seed=1, in_channels=1, target_macs=0.5)
        path = tmp_path / "default_model.pt"
        compile_engine(model, preprocess=preprocess_spec("fashion-mnist")).save(str(path))
        monkeypatch.setattr(pretrained, "DEFAULT_MODEL_PATH", str(path))
        code, stdout, stderr = _run(["--out", str(tmp_path / "out"), "--batch-sizes", "2", "--iters", "1",
                                     "--warmup", "0", "--time-budget", "0", "--num-batches", "1", "--quiet",
                                     "--isolation", "in-process"])
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_runner_replays_a_module():
    """The one CUDA-graph capture routine, on a plain module (channels-last input kept as it is)."""
    model, x = calibrated("dyresnet20", (32, 32), n=4)
    net = bench.folded_dense(model).cuda().to(memory_format=torch.channels_last)
    xs = [torch.randn_like(x).cuda().contiguous(memory_format=torch.channels_last) for _ in range(2)]
    run = bench.graph_runner(net, xs[0])
    assert run.static_input.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for xi in xs:
            torch.testing.assert_close(run(xi, clone=True), net(xi), rtol=1e-4, atol=1e-4)


def test_checkpoint_input(tmp_path):
    """A manidp-train checkpoint: the gated model with its BN, and the engine compiled from it."""
    from manidp.models import build_model
    model = build_model("dyresnet20", in_channels=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"arch": "dyresnet20", "state_dict": model.state_dict(),
                "dataset": {"name": "fashion-mnist", "input_size": [32, 32]}}, path)
    from manidp.bench.subject import load_model_file
    choice = load_model_file(str(path))
    assert choice.source == "checkpoint" and not getattr(choice.gated, "_manidp_from_engine", False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) and m.eps > 0 for m in choice.gated.modules())
    assert choice.engine.config["arch"] == "dyresnet20"
    assert choice.preprocess is not None and choice.preprocess["pad"] == 2
    torch.save({"arch": "resnet20", "state_dict": build_model("resnet20").state_dict()}, tmp_path / "d.pt")
    assert "dense model" in _error(["--model", str(tmp_path / "d.pt")])
