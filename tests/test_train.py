"""The trainer: schedules, smoke runs, resume, fault recovery, non-finite handling, CLI."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import manidp.train as T
from manidp.models import build_model
from manidp.train import (TrainingDiverged, calibrate_thresholds, compute_loss, cosine_lr,
                          evaluate, load_checkpoint, main, make_args, make_optimizer, remain_rate, train)

from conftest import ROOT, SYNTH, cli_flags, gated_args, state_dicts_equal, subprocess_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- pieces

def test_remain_rate_schedule():
    """r goes from ~1 to exactly the target at the last epoch (docs/DESIGN.md 1.4)."""
    assert remain_rate(9, 10, 0.6) == pytest.approx(0.6)
    assert remain_rate(-1, 10, 0.6) == pytest.approx(1.0)
    assert remain_rate(4, 10, 0.5) == pytest.approx(0.75)
    rates = [remain_rate(e, 10, 0.6) for e in range(10)]
    assert rates == sorted(rates, reverse=True)


def test_cosine_lr_per_iteration():
    """lr at iteration 0, halfway and at the end of the run."""
    assert cosine_lr(0.05, 0, 100) == pytest.approx(0.05)
    assert cosine_lr(0.05, 50, 100) == pytest.approx(0.025)
    assert cosine_lr(0.05, 100, 100) == pytest.approx(0.0)


def test_calibrate_thresholds_by_hand():
    """mean = mask_sum / count; threshold = k-th largest mean, k = ceil(r * C)."""
    gate = build_model("dyresnet20").layer1[0].gate1  # 16 channels
    gate.mask_sum.copy_(torch.arange(16, dtype=torch.float32) * 10)  # means 0..15 with count 10
    assert calibrate_thresholds([gate], 10, 0.5) == [8.0]     # k = 8: 15..8
    assert calibrate_thresholds([gate], 10, 0.51) == [7.0]    # k = ceil(8.16) = 9
    assert calibrate_thresholds([gate], 10, 1.0) == [0.0]
    assert float(gate.threshold) == 0.0


def test_optimizer_groups_decay():
    """Backbone gets --decay, gate parameters --decay_branch; Nesterov momentum 0.9."""
    net = build_model("dyresnet20")
    opt = make_optimizer(net, make_args(decay=5e-4, decay_branch=1e-5))
    backbone, gates = opt.param_groups
    assert backbone["weight_decay"] == 5e-4 and gates["weight_decay"] == 1e-5
    assert backbone["nesterov"] and backbone["momentum"] == 0.9
    n_gate = sum(p.numel() for n, p in net.named_parameters() if ".gate" in n)
    assert sum(p.numel() for p in gates["params"]) == n_gate


def _closed_instance_batch():
    """A gated net and batch where gate 0 closes everything and gate 2 closes some instances fully."""
    torch.manual_seed(0)
    net = build_model("dyresnet20").train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    gates = list(net.gates())
    gates[0].threshold.fill_(1e9)
    with torch.no_grad():
        _, recs = net(x, return_gates=True)
    top = recs[2].g.max(1).values.sort().values
    gates[2].threshold.fill_(float(top[1] + top[2]) / 2)  # two instances see every channel closed
    return net, x, y, gates


def test_all_channels_closed_stays_finite():
    """Instances with every channel of a gate closed: finite loss, gradients and metrics."""
    net, x, y, gates = _closed_instance_batch()
    loss, ce, parts = compute_loss(net, x, y, 2.0, make_args(lambda_lasso=5e-3, lambda_graph=1.0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    with torch.no_grad():
        _, recs = net.train()(x, return_gates=True)
    assert (recs[0].mask == 0).all() and ((recs[2].mask > 0).sum(1) == 0).sum() == 2
    m = evaluate(net, [(x, y)])
    assert all(math.isfinite(v) for v in m.values())


# ----------------------------------------------------------------------------- runs

def test_smoke_synthetic_thresholds_move(tmp_path, dense_synthetic):
    """Two epochs from a dense checkpoint: thresholds leave -10000, FLOPs drop, files and log written."""
    r = train(**gated_args(tmp_path, dense_synthetic, epochs=2, deterministic=False))
    assert all(t > -10000 for t in r["thresholds"]) and r["flops_reduction"] > 0
    assert 0 < r["active_ratio"] < 1 and r["epoch"] == 1 and r["skipped_steps"] == 0
    for f in ("checkpoint", "best_checkpoint", "resume_checkpoint", "log"):
        assert os.path.isfile(r[f])
    lines = [json.loads(ln) for ln in open(r["log"])]
    assert [ln["epoch"] for ln in lines] == [0, 1] and lines[1]["remain_rate"] == pytest.approx(0.5)
    ck = load_checkpoint(r["checkpoint"])
    for k in ("state_dict", "optimizer", "epoch", "iteration", "L_prev", "rng", "args", "arch", "dataset"):
        assert k in ck
    assert ck["arch"] == "dyresnet20" and ck["dataset"]["in_channels"] == 3
    thr = [float(v) for k, v in ck["state_dict"].items() if k.endswith("threshold")]
    assert thr == r["thresholds"] and any(k.endswith("mask_sum") for k in ck["state_dict"])
    assert set(ck["rng"]) == {"torch", "numpy", "python", "cuda"}


def test_dense_mode_with_dy_name(tmp_path):
    """--dense with a 'dy' arch name trains the dense net: no gates, no reduction."""
    r = train(arch="dyresnet20", dense=True, epochs=1, lr=0.05, save_path=str(tmp_path), manualSeed=1, **SYNTH)
    assert r["arch"] == "resnet20" and r["active_ratio"] == 1.0 and r["flops_reduction"] == 0.0
    assert r["dense_macs"] == 40813184 and r["thresholds"] == []


def test_batch_size_one_and_huge_thresholds_finite(tmp_path, dense_synthetic):
    """Batch 1 training, and gates starting fully closed (threshold 1e9): losses stay finite."""
    r = train(**gated_args(tmp_path / "b1", dense_synthetic, batch_size=1, train_subset=6, test_subset=3,
                           epochs=2, deterministic=False))
    assert r["skipped_steps"] == 0 and all(math.isfinite(h["train_loss"]) for h in r["history"])
    net = build_model("dyresnet20")
    sd = load_checkpoint(os.path.join(dense_synthetic, "last.pth"))["state_dict"]
    net.load_state_dict(sd, strict=False)
    for g in net.gates():
        g.threshold.fill_(1e9)
    torch.save(net.state_dict(), tmp_path / "closed.pth")
    r = train(**gated_args(tmp_path / "closed", str(tmp_path / "closed.pth"), epochs=1, deterministic=False))
    h = r["history"][0]
    assert r["skipped_steps"] == 0 and r["active_ratio"] == 0.0
    assert all(math.isfinite(h[k]) for k in ("train_loss", "test_loss", "cplx", "sim"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dense_synthetic):
    """An uninterrupted deterministic 3-epoch run: (kwargs, result, final state dict)."""
    kw = gated_args(tmp_path_factory.mktemp("reference"), dense_synthetic)
    r = train(**kw)
    return kw, r, load_checkpoint(r["checkpoint"])["state_dict"]


def _same_final(reference, save_path) -> None:
    """The run in ``save_path`` ended with bit-identical weights and the same log as the reference."""
    kw, r, sd = reference
    ck = load_checkpoint(os.path.join(save_path, "last.pth"))
    assert state_dicts_equal(ck["state_dict"], sd)
    lines = [json.loads(ln) for ln in open(os.path.join(save_path, "log.jsonl"))]
    assert [ln["epoch"] for ln in lines] == [0, 1, 2]
    for a, b in zip(lines, r["history"]):
        assert {k: v for k, v in a.items() if k != "time_s"} == {k: v for k, v in b.items() if k != "time_s"}


class _Crash(Exception):
    """A simulated crash (not an error the trainer handles)."""
    pass


def test_resume_equals_uninterrupted(reference, tmp_path, monkeypatch):
    """Crash after epoch 1's checkpoint; --resume finishes bit-identical to the uninterrupted run."""
    kw = dict(reference[0], save_path=str(tmp_path))
    finish = T._finish_epoch

    def crash_after(run, epoch, *a):
        """Finish the epoch (checkpoint written), then crash after epoch 1."""
        finish(run, epoch, *a)
        if epoch == 1:
            raise _Crash()
    monkeypatch.setattr(T, "_finish_epoch", crash_after)
    with pytest.raises(_Crash):
        train(**kw)
    monkeypatch.setattr(T, "_finish_epoch", finish)
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 1
    r = train(**kw, resume=True)
    assert r["epoch"] == 2
    _same_final(reference, tmp_path)


def _popen(kw: dict, **env) -> subprocess.Popen:
    """Start ``python -m manidp.train`` with the flags equivalent to ``kw``."""
    return subprocess.Popen([sys.executable, "-m", "manidp.train", *cli_flags(kw)], cwd=ROOT,
                            env=subprocess_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(cond, proc, timeout=180.0) -> None:
    """Poll ``cond()`` while ``proc`` runs; fail if it exits or time runs out first."""
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.time() > end:
            proc.kill()
            pytest.fail("timed out waiting for the training subprocess")
        time.sleep(0.05)


def _log_lines(path) -> int:
    """Number of lines in a log file (0 if absent)."""
    return len(open(path).read().splitlines()) if os.path.isfile(path) else 0


def test_sigkill_mid_epoch_then_resume(reference, tmp_path):
    """SIGKILL during epoch 1; resuming from epoch 0's checkpoint ends with the reference weights."""
    kw = dict(reference[0], save_path=str(tmp_path))
    proc = _popen(kw)
    _wait_for(lambda: _log_lines(tmp_path / "log.jsonl") >= 1, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] in (0, 1)
    train(**kw, resume=True)
    _same_final(reference, tmp_path)


def test_sigkill_during_save_keeps_old_checkpoint(reference, tmp_path):
    """Killed between temp-file write and rename: checkpoint.pth stays the previous, whole file."""
    kw = dict(reference[0], save_path=str(tmp_path))
    proc = _popen(kw, MANIDP_TEST_SLOW_SAVE=2)
    tmp_glob = str(tmp_path / "checkpoint.pth.*.tmp")
    _wait_for(lambda: _log_lines(tmp_path / "log.jsonl") >= 1 and glob.glob(tmp_glob), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert glob.glob(tmp_glob), "the kill should have hit a save in progress"
    assert load_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 0
    train(**kw, resume=True)
    assert not glob.glob(str(tmp_path / "*.tmp"))
    _same_final(reference, tmp_path)


def test_nonfinite_losses_skipped_then_stop(tmp_path, dense_synthetic, monkeypatch):
    """Isolated NaN losses skip steps with a warning; 5 in a row stop with the last checkpoint intact."""
    real = T.compute_loss
    calls = {"n": 0}
    bad = {3, 4}

    def flaky(*a, **k):
        """The real loss, turned NaN on the chosen calls."""
        calls["n"] += 1
        loss, ce, parts = real(*a, **k)
        return (loss * float("nan") if calls["n"] in bad else loss), ce, parts
    monkeypatch.setattr(T, "compute_loss", flaky)
    kw = gated_args(tmp_path, dense_synthetic, epochs=2, deterministic=False)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        r = train(**kw)
    assert r["skipped_steps"] == 2 and all(math.isfinite(t) for t in r["thresholds"])
    calls["n"], bad = 0, set(range(8, 100))  # epoch 0 (6 steps) fine, then NaN for ever
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingDiverged, match="5 non-finite losses in a row"):
        train(**dict(kw, save_path=str(tmp_path / "div")))
    ck = load_checkpoint(str(tmp_path / "div" / "checkpoint.pth"))
    assert ck["epoch"] == 0 and all(torch.isfinite(v).all() for v in ck["state_dict"].values()
                                    if v.is_floating_point())


# ----------------------------------------------------------------------------- CLI

def test_cli_ngpu_without_cuda_is_a_clear_error(tmp_path, capsys):
    """The seed README command on a machine without CUDA: exit 2, message suggests --ngpu 0."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    code = main(["--ngpu=1", "--arch=dyresnet56", "--dataset=cifar10", "--target_remain_rate=0.6",
                 "--lambda_lasso", "5e-3", "--lambda_graph", "1.0", f"--pretrain_path={tmp_path}",
                 f"--data_path={tmp_path}", f"--save_path={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "--ngpu 0" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "vgg16"], "unknown --arch"),
    (["--target_remain_rate", "1.5"], "--target_remain_rate"),
    (["--dataset", "synthetic", "--pretrain_path", "/nonexistent/x"], "does not exist"),
    (["--dataset", "synthetic", "--resume", "/nonexistent/ck.pth"], "does not exist"),
])
def test_cli_user_errors_exit_2(tmp_path, capsys, argv, needle):
    """Bad flags and paths: exit code 2, a message naming the problem, no traceback."""
    code = main(argv + ["--ngpu", "0", "--quiet", "--save_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_cli_unwritable_save_path(tmp_path, capsys):
    """A --save_path that cannot be created is a user error too."""
    (tmp_path / "file").write_text("x")
    code = main(["--dataset", "synthetic", "--ngpu", "0", "--quiet", "--save_path", str(tmp_path / "file" / "run")])
    assert code == 2 and "cannot create --save_path" in capsys.readouterr().err


def test_cli_resume_with_different_settings(tmp_path, capsys):
    """--resume refuses a run defined differently from the checkpoint."""
    base = ["--dataset", "synthetic", "--train_subset", "32", "--test_subset", "16", "--batch_size", "16",
            "--arch", "resnet20", "--dense", "--epochs", "2", "--ngpu", "0", "--quiet", "--manualSeed", "1",
            "--save_path", str(tmp_path)]
    assert main(base[:-4] + ["--epochs", "1", "--save_path", str(tmp_path)]) == 0
    assert main(base + ["--resume"]) == 2
    assert "--epochs 2 (checkpoint: 1)" in capsys.readouterr().err


def test_seed_readme_command_on_cpu(tmp_path, capsys):
    """The seed README's command (with --ngpu=0) on tiny CIFAR-10 files and a resnet56.pth directory."""
    from test_data import write_cifar
    write_cifar(tmp_path / "data", per_batch=4, test=6)
    (tmp_path / "pretrain").mkdir()
    torch.manual_seed(0)
    torch.save(build_model("resnet56").state_dict(), tmp_path / "pretrain" / "resnet56.pth")
    code = main(["--ngpu=0", "--arch=dyresnet56", "--dataset=cifar10", "--target_remain_rate=0.6",
                 "--lambda_lasso", "5e-3", "--lambda_graph", "1.0", f"--pretrain_path={tmp_path / 'pretrain'}/",
                 f"--data_path={tmp_path / 'data'}", "--epochs", "2", "--batch_size", "10",
                 f"--save_path={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0 and "resnet56.pth" in out and "done: top1" in out
    ck = load_checkpoint(str(tmp_path / "run" / "last.pth"))
    assert ck["arch"] == "dyresnet56" and ck["dataset"]["num_train"] == 20 and ck["epoch"] == 1


def test_image_folder_end_to_end(tmp_path):
    """ImageFolder data through DataLoader workers into a gated ImageNet ResNet at 32x32."""
    from test_data import write_image_folder
    write_image_folder(tmp_path / "data", per_class=3, size=40)
    r = train(arch="dyresnet18", dataset="imagenet", data_path=str(tmp_path / "data"), image_size=32,
              workers=2, epochs=2, batch_size=3, lr=0.01, ngpu=0, quiet=True, manualSeed=1,
              save_path=str(tmp_path / "run"))
    assert r["dataset"]["num_classes"] == 2 and len(r["thresholds"]) == 16
    assert math.isfinite(r["loss"]) and r["skipped_steps"] == 0


def test_flops_cli_reports_checkpoint(tmp_path, dense_synthetic, capsys):
    """manidp-flops agrees with the trainer's own evaluation of the same checkpoint."""
    from manidp.flops_cli import main as flops_main
    r = train(**gated_args(tmp_path, dense_synthetic, epochs=2, deterministic=False))
    capsys.readouterr()
    assert flops_main(["--checkpoint", r["checkpoint"], "--dataset", "synthetic", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["top1"] == pytest.approx(r["top1"]) and rep["dense_macs"] == r["dense_macs"]
    assert rep["flops_reduction"] == pytest.approx(r["flops_reduction"]) and rep["images"] == 64
    assert flops_main(["--checkpoint", r["checkpoint"]]) == 0
    assert "FLOPs reduction" in capsys.readouterr().out
    assert flops_main(["--checkpoint", str(tmp_path / "none.pth")]) == 2


# ----------------------------------------------------------------------------- real data

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Fashion-MNIST not installed")
def test_fashion_mnist_prune_keeps_accuracy(tmp_path):
    """Dense ResNet-20 pretrain, then ManiDP at remain rate 0.5: top-1 >= 70%, FLOPs reduction > 20%."""
    data = dict(dataset="fashion-mnist", train_subset=2000, test_subset=1000, batch_size=64, ngpu=0,
                quiet=True, manualSeed=1)
    dense = train(arch="resnet20", dense=True, epochs=6, lr=0.1, save_path=str(tmp_path / "dense"), **data)
    r = train(arch="dyresnet20", epochs=4, lr=0.05, target_remain_rate=0.5, pretrain_path=str(tmp_path / "dense"),
              save_path=str(tmp_path / "manidp"), **data)
    print(f"dense top1 {dense['top1']:.1f}  manidp top1 {r['top1']:.1f}  reduction {r['flops_reduction']:.3f}",
          [round(h["time_s"], 1) for h in dense["history"] + r["history"]], [h["top1"] for h in r["history"]])
    assert r["top1"] >= 70.0 and r["flops_reduction"] > 0.20
