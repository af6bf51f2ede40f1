"""The trainer: schedules, smoke runs, resume, fault recovery, non-finite handling, CLI, static
pruning runs, and the benchmarks/fashion_mnist.py orchestrator built on it."""

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
from manidp.checkpoint import CheckpointError, atomic_save, read_checkpoint, rebuild_model, with_digest
from manidp.data import build_dataset, eval_batches
from manidp.models import build_model
from manidp.static_pruning import StaticPrunedResNet, keep_for_target_macs, l1_top_channels, static_macs
from manidp.train import (TrainingDiverged, UsageError, build_parser, calibrate_thresholds, compute_loss,
                          cosine_lr, defining_arg_differences, evaluate, load_checkpoint, main, make_args,
                          make_optimizer, remain_rate, train)

from conftest import ROOT, SYNTH, cli_flags, gated_args, load_script, state_dicts_equal, subprocess_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- pieces

def test_remain_rate_schedule():
    """r goes from ~1 to exactly the target at the last epoch (docs/DESIGN.md 1.4)."""
    assert remain_rate(9, 10, 0.6) == pytest.approx(0.6)
    assert remain_rate(-1, 10, 0.6) == pytest.approx(1.0)
    assert remain_rate(4, 10, 0.5) == pytest.approx(0.75)
    rates = [remain_rate(e, 10, 0.6) for e in range(10)]
    assert rates == sorted(rates, reverse=True)


def _paper_rate(e: int, epochs: int, t: float) -> float:
    """docs/DESIGN.md 1.4's remain rate, as the trainer computed it before --target_epoch_frac."""
    return (1 - t) / 2 * math.cos(math.pi * (e + 1) / epochs) + (1 + t) / 2


def test_remain_rate_target_epoch_frac():
    """The same cosine, reaching the target at epoch ceil(F * E) - 1 and staying there; F = 1 is unchanged."""
    for epochs in (1, 2, 10, 15, 200):
        assert [remain_rate(e, epochs, 0.6, 1.0) for e in range(-1, epochs)] == \
            [_paper_rate(e, epochs, 0.6) for e in range(-1, epochs)]
    rates = [remain_rate(e, 10, 0.6, 0.6) for e in range(10)]
    assert remain_rate(-1, 10, 0.6, 0.6) == pytest.approx(1.0)
    assert rates == sorted(rates, reverse=True) and rates[4] > 0.6
    assert rates[:6] == [_paper_rate(e, 6, 0.6) for e in range(6)]  # the paper's cosine over 6 epochs
    assert rates[5] == pytest.approx(0.6) and rates[5:] == [rates[5]] * 5
    # 0.7 * 10 is 7.000000000000001 in floating point: the target still comes at epoch 6
    assert remain_rate(5, 10, 0.5, 0.7) > 0.5 and remain_rate(6, 10, 0.5, 0.7) == pytest.approx(0.5)
    assert remain_rate(0, 10, 0.5, 0.01) == pytest.approx(0.5)  # at least one epoch of ramp


def test_defining_args_missing_key_is_its_default():
    """A checkpoint's args without a flag added later compare as that flag's default."""
    args = make_args(manualSeed=1)
    old = {k: v for k, v in vars(args).items() if k not in ("static_keep", "static_target_macs", "target_epoch_frac")}
    assert defining_arg_differences(args, old) == []
    assert defining_arg_differences(make_args(manualSeed=1, target_epoch_frac=0.6), old) == \
        ["--target_epoch_frac 0.6 (checkpoint: 1.0)"]
    assert defining_arg_differences(make_args(manualSeed=2), old) == ["--manualSeed 2 (checkpoint: 1)"]


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


def _train_until_crash(kw: dict, crash_epoch: int, monkeypatch) -> None:
    """``train(**kw)``, crashing right after epoch ``crash_epoch``'s checkpoint is written."""
    finish = T._finish_epoch

    def crash_after(run, epoch, *a):
        """Finish the epoch (checkpoint written), then crash after ``crash_epoch``."""
        finish(run, epoch, *a)
        if epoch == crash_epoch:
            raise _Crash()
    monkeypatch.setattr(T, "_finish_epoch", crash_after)
    with pytest.raises(_Crash):
        train(**kw)
    monkeypatch.setattr(T, "_finish_epoch", finish)
    assert load_checkpoint(os.path.join(kw["save_path"], "checkpoint.pth"))["epoch"] == crash_epoch


def test_resume_equals_uninterrupted(reference, tmp_path, monkeypatch):
    """Crash after epoch 1's checkpoint; --resume finishes bit-identical to the uninterrupted run."""
    kw = dict(reference[0], save_path=str(tmp_path))
    _train_until_crash(kw, 1, monkeypatch)
    r = train(**kw, resume=True)
    assert r["epoch"] == 2
    _same_final(reference, tmp_path)


def test_resume_checkpoint_written_before_new_flags(reference, tmp_path, monkeypatch):
    """A checkpoint whose args lack --static_keep, --static_target_macs and --target_epoch_frac (written
    before they existed) resumes exactly as before; asking it for a non-default schedule is refused."""
    kw = dict(reference[0], save_path=str(tmp_path))
    _train_until_crash(kw, 0, monkeypatch)
    path = str(tmp_path / "checkpoint.pth")
    ck = read_checkpoint(path)
    for key in ("static_keep", "static_target_macs", "target_epoch_frac"):
        del ck["args"][key]
    atomic_save(with_digest(ck), path)
    with pytest.raises(UsageError, match=r"--target_epoch_frac 0.5 \(checkpoint: 1.0\)"):
        train(**kw, resume=True, target_epoch_frac=0.5)
    train(**kw, resume=True)
    _same_final(reference, tmp_path)


def test_target_epoch_frac_run(tmp_path, dense_synthetic):
    """--target_epoch_frac 0.5 over 3 epochs: thresholds at the target from epoch ceil(1.5) - 1 = 1 on."""
    r = train(**gated_args(tmp_path, dense_synthetic, epochs=3, target_epoch_frac=0.5, deterministic=False))
    assert [h["remain_rate"] for h in r["history"]] == [1.0, pytest.approx(0.5), pytest.approx(0.5)]
    assert r["history"][1]["thresholds"] != r["history"][2]["thresholds"]  # recalibrated at the target


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
    (["--target_epoch_frac", "0"], "--target_epoch_frac must be in (0, 1]"),
    (["--arch", "resnet20", "--static_keep", "0.5"], "--static_keep needs --pretrain_path"),
    (["--arch", "resnet20", "--static_keep", "1.5", "--pretrain_path", "d"], "--static_keep must be in (0, 1]"),
    (["--arch", "resnet20", "--static_target_macs", "0", "--pretrain_path", "d"],
     "--static_target_macs must be in (0, 1]"),
    (["--arch", "resnet20", "--static_keep", "0.5", "--static_target_macs", "0.4", "--pretrain_path", "d"],
     "are exclusive"),
    (["--arch", "resnet20", "--dense", "--static_keep", "0.5", "--pretrain_path", "d"],
     "cannot be combined with --dense"),
    (["--arch", "dyresnet20", "--static_target_macs", "0.5", "--pretrain_path", "d"],
     "give the dense --arch resnet20"),
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


# ----------------------------------------------------------------------------- static pruning runs

def _static_args(save_path, pretrain: str, **kw) -> dict:
    """Keyword arguments of a short deterministic static-pruning run (keep 0.5) on the synthetic set."""
    args = dict(SYNTH, arch="resnet20", static_keep=0.5, pretrain_path=pretrain, epochs=2, lr=0.02,
                save_path=str(save_path), manualSeed=5, deterministic=True)
    args.update(kw)
    return args


@pytest.fixture(scope="module")
def static_run(tmp_path_factory, dense_synthetic):
    """An uninterrupted 2-epoch static run: (kwargs, result)."""
    kw = _static_args(tmp_path_factory.mktemp("static"), dense_synthetic)
    return kw, train(**kw)


def test_static_run_end_to_end(static_run, dense_synthetic):
    """The narrow network is cut from the dense checkpoint, trained like --dense, and rebuilt from its checkpoint."""
    kw, r = static_run
    ck = load_checkpoint(r["checkpoint"])
    net = rebuild_model(ck, r["checkpoint"])
    assert isinstance(net, StaticPrunedResNet) and not net.training
    assert net.widths == ck["widths"] == r["widths"] == [8] * 3 + [16] * 3 + [32] * 3
    assert r["method"] == "static" and r["arch"] == ck["arch"] == "resnet20" and r["thresholds"] == []
    assert r["macs"] == net.macs((32, 32)) and r["dense_macs"] == net.dense_macs((32, 32)) == 40813184
    assert r["flops_reduction"] == pytest.approx(1 - net.macs((32, 32)) / 40813184)
    dense = load_checkpoint(os.path.join(dense_synthetic, "last.pth"))["state_dict"]
    assert net.layers[0].kept_index.tolist() == l1_top_channels(dense["layer1.0.conv1.weight"], 8).tolist()
    groups = ck["optimizer"]["param_groups"]  # make_optimizer: one backbone group, as for --dense
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4 and groups[0]["nesterov"]
    data = build_dataset("synthetic", train_subset=SYNTH["train_subset"], test_subset=SYNTH["test_subset"])
    m = evaluate(net, eval_batches(data.test, 32))
    assert m["top1"] == r["top1"] and m["mean_macs"] == r["macs"]
    with pytest.raises(CheckpointError, match="static-pruned resnet20 \\(no gates\\)"):
        rebuild_model(ck, r["checkpoint"], gated=True)  # what compile() does


def test_static_run_resumes_bit_identical(static_run, tmp_path, monkeypatch):
    """A static run killed after epoch 0 resumes from its checkpoint's widths to the uninterrupted result."""
    kw, r = static_run
    kw = dict(kw, save_path=str(tmp_path))
    _train_until_crash(kw, 0, monkeypatch)
    resumed = train(**kw, resume=True)
    assert resumed["widths"] == r["widths"] and resumed["top1"] == r["top1"]
    assert state_dicts_equal(load_checkpoint(resumed["checkpoint"])["state_dict"],
                             load_checkpoint(r["checkpoint"])["state_dict"])
    with pytest.raises(UsageError, match=r"--static_keep 0.25 \(checkpoint: 0.5\)"):
        train(**dict(kw, static_keep=0.25), resume=True)


def test_static_target_macs_and_flops_cli(tmp_path, dense_synthetic, capsys):
    """--static_target_macs picks keep_for_target_macs' ratio; manidp-flops reports the run's MACs."""
    from manidp.flops_cli import main as flops_main
    r = train(**_static_args(tmp_path, dense_synthetic, static_keep=None, static_target_macs=0.4, epochs=1,
                             deterministic=False))
    dense = rebuild_model(load_checkpoint(os.path.join(dense_synthetic, "last.pth")), dense_synthetic)
    keep = keep_for_target_macs(dense, 0.4, (32, 32))
    assert r["macs"] == static_macs(dense, keep, (32, 32)) and abs(r["macs"] / r["dense_macs"] - 0.4) < 0.03
    capsys.readouterr()
    assert flops_main(["--checkpoint", r["checkpoint"], "--dataset", "synthetic", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["mean_macs"] == r["macs"] and rep["dense_macs"] == r["dense_macs"] and rep["top1"] == r["top1"]


def test_static_cli_final_line(tmp_path, dense_synthetic, capsys):
    """manidp-train --static_keep: exit 0 and a final line with top-1, MACs and the FLOPs reduction."""
    code = main(["--arch", "resnet20", "--static_keep", "0.25", "--pretrain_path", dense_synthetic, "--epochs", "1",
                 "--dataset", "synthetic", "--train_subset", "32", "--test_subset", "16", "--batch_size", "16",
                 "--ngpu", "0", "--manualSeed", "1", "--save_path", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "block widths [4, 4, 4, 8, 8, 8, 16, 16, 16]" in out
    assert "done: top1" in out and "M of 40.813M dense  flops reduction" in out


# ----------------------------------------------------------------------------- benchmarks/fashion_mnist.py

def _orchestrator():
    """benchmarks/fashion_mnist.py as a module."""
    return load_script("fashion_mnist")


def test_orchestrator_reproduces_the_queue_commands():
    """The orchestrator's flags define the same runs as hand-typed manidp-train commands (so it adopts them)."""
    fm = _orchestrator()
    args = fm.parse_args(["--seeds", "1,2", "--dense-epochs", "15", "--epochs", "10", "--targets", "0.6,0.5",
                          "--fbs-targets", "0.6"])
    common = "--dataset fashion-mnist --ngpu 0 --batch_size 128 --resume --quiet --save_path d".split()
    by_hand = {
        "dense": "--arch resnet20 --dense --epochs 15 --lr 0.1 --manualSeed 2",
        "manidp": "--arch dyresnet20 --pretrain_path p --target_remain_rate 0.5 --lambda_lasso 5e-3 "
                  "--lambda_graph 1.0 --epochs 10 --lr 0.05 --manualSeed 2",
        "fbs": "--arch dyresnet20 --pretrain_path p --target_remain_rate 0.6 --lambda_lasso 5e-3 "
               "--lambda_graph 0.0 --epochs 10 --lr 0.05 --manualSeed 2",
    }
    ours = {"dense": fm.dense_flags(args), "manidp": fm.gated_flags(args, "p", 0.5, args.lambda_graph),
            "fbs": fm.gated_flags(args, "p", 0.6, 0.0)}
    parse = build_parser().parse_args
    for method, flags in ours.items():
        asked = parse(fm.common_flags(args, 2) + flags + ["--save_path", "d"])
        assert defining_arg_differences(asked, vars(parse(common + by_hand[method].split()))) == [], method


def test_orchestrator_every_method_in_process(tmp_path, monkeypatch):
    """Dense, ManiDP, FBS-like, static matched to ManiDP's FLOPs and static at a keep ratio, every one a
    manidp-train run (called in-process here to keep the test short); a rerun trains nothing; a finished
    run with other settings stops the script."""
    fm = _orchestrator()
    calls = []

    def in_process(flags, log):
        """manidp-train in this process (the orchestrator runs it as a child)."""
        calls.append(flags)
        return main(flags)
    monkeypatch.setattr(fm, "run_child", in_process)
    runs, out = tmp_path / "runs", tmp_path / "r.json"
    argv = ["--dataset", "synthetic", "--seeds", "4", "--train-subset", "32", "--test-subset", "16", "--batch-size",
            "16", "--dense-epochs", "1", "--epochs", "1", "--targets", "0.6", "--fbs-targets", "0.6",
            "--static-keeps", "0.5", "--no-timing", "--runs", str(runs), "--out", str(out)]
    assert fm.main(argv) == 0 and len(calls) == 5
    rows = json.loads(out.read_text())["rows"]
    assert [r.get("keep") or r.get("matched_to_target") for r in rows if r["method"].startswith("static")] == \
        [0.6, 0.5]
    base = runs / "resnet20_s4"
    manidp = read_checkpoint(str(base / "manidp_t0.6" / "last.pth"))
    matched = read_checkpoint(str(base / "static_t0.6" / "last.pth"))["args"]
    keep = read_checkpoint(str(base / "static_k0.5" / "last.pth"))["args"]
    reduction = manidp["state"]["metrics"]["flops_reduction"]
    assert matched["static_target_macs"] == min(1.0 - reduction, 1.0) and keep["static_keep"] == 0.5
    assert read_checkpoint(str(base / "fbs_t0.6" / "last.pth"))["args"]["lambda_graph"] == 0.0
    for a in (matched, keep):
        assert (a["epochs"], a["lr"], a["batch_size"], a["manualSeed"]) == \
            tuple(manidp["args"][k] for k in ("epochs", "lr", "batch_size", "manualSeed"))
    assert fm.main(argv) == 0 and len(calls) == 5  # finished runs are skipped
    md = tmp_path / "r.md"
    fm.main(["summarize", str(md), str(out)])
    assert "keep 0.5" in md.read_text() and "FLOPs of ManiDP 0.6" in md.read_text()
    argv[argv.index("--epochs") + 1] = "2"
    assert fm.main(argv) == 1 and len(calls) == 5


def test_orchestrator_ablation_child_processes(tmp_path, monkeypatch):
    """--ablation: dense, then ManiDP reaching the target at the end and at 60% of the epochs, each a
    manidp-train child process; a result JSON and a Markdown table."""
    fm = _orchestrator()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ablation.json"
    assert fm.main(["--ablation", "--dataset", "synthetic", "--seeds", "1", "--train-subset", "32", "--test-subset",
                    "16", "--batch-size", "16", "--dense-epochs", "1", "--epochs", "3", "--runs",
                    str(tmp_path / "runs"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r.get("target_epoch_frac")) for r in rows] == \
        [("dense", None), ("manidp", 1.0), ("manidp", 0.6)]
    base = tmp_path / "runs" / "resnet20_s1"
    early = read_checkpoint(str(base / "manidp_t0.6_f0.6" / "last.pth"))
    at_end = read_checkpoint(str(base / "manidp_t0.6" / "last.pth"))
    assert early["args"]["target_epoch_frac"] == 0.6 and early["args"]["train_subset"] == 32
    assert [h["remain_rate"] for h in early["state"]["history"]] == [1.0, pytest.approx(0.6), pytest.approx(0.6)]
    assert [h["remain_rate"] for h in at_end["state"]["history"]] == [1.0, pytest.approx(0.7), pytest.approx(0.6)]
    assert "reached at 60% of the epochs" in (tmp_path / "ablation.md").read_text()


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


def test_thre_window_recalibrates_within_epochs(tmp_path, dense_synthetic, monkeypatch):
    """--thre_window 2 with 6 steps per epoch: epoch 0 keeps every channel; epoch 1 calibrates at its
    start from all of epoch 0, then after steps 2 and 4 from those two steps' 64 images each."""
    calls = []
    real = T.calibrate_thresholds

    def recording(gates, count, rate):
        calls.append((count, rate))
        return real(gates, count, rate)

    monkeypatch.setattr(T, "calibrate_thresholds", recording)
    r = train(**gated_args(tmp_path, dense_synthetic, epochs=2, thre_window=2, deterministic=False))
    assert calls == [(192, pytest.approx(0.5)), (64, pytest.approx(0.5)), (64, pytest.approx(0.5))]
    assert read_checkpoint(r["checkpoint"])["args"]["thre_window"] == 2
    # the last two steps' statistics are what the next epoch would start from
    assert load_checkpoint(os.path.join(str(tmp_path), "checkpoint.pth"))["state"]["mask_count"] == 64
    with pytest.raises(UsageError, match="--thre_window must be >= 0"):
        train(**gated_args(tmp_path / "bad", dense_synthetic, thre_window=-1))
