"""ManiDP training: the ``manidp-train`` command and the in-process :func:`train` API.

Implements docs/DESIGN.md 1.3-1.4 (the pipeline: docs/DESIGN.md 9): start from a
dense network, train the gated one with ``mean ce + lambda_lasso * L_cplx +
lambda_graph * sum L_sim``, SGD Nesterov, per-iteration cosine learning rate, and
per-epoch threshold calibration following the remain-rate schedule
(``--target_epoch_frac`` reaches the target before the last epoch).  One loop
trains every method:

  ManiDP          the default (gated network, both gate losses)
  FBS-like        ``--lambda_graph 0`` (ManiDP without the manifold term)
  dense           ``--dense`` (no gates, cross-entropy only)
  static pruning  ``--static_keep K`` or ``--static_target_macs F`` with a dense
                  ``--pretrain_path``: the narrow network of :mod:`manidp.static_pruning`
                  cut by filter L1 norm, then trained like ``--dense``

Layout of ``--save_path``:
  checkpoint.pth   full training state after the latest epoch (``--resume`` reads it)
  model_best.pth   the same format, at the epoch with the best test top-1
  last.pth         the final state, written when training ends
  log.jsonl        one JSON object per epoch
Every checkpoint is written atomically, with a sha256 digest, and read safely by
:mod:`manidp.checkpoint` (docs/DESIGN.md 6.2), so a kill at any moment leaves the
previous one intact and a corrupted one is refused.  A fresh run never replaces a
run already in ``--save_path``: continue it with ``--resume`` or replace it with
``--overwrite``.

Multi-process: see :mod:`manidp.distributed`.  ``--batch_size`` is the global
batch (split evenly over the processes), as with the original DataParallel code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as D
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_save, extract_state_dict, read_checkpoint,
                         remove_stale_temp_files, with_digest)
from .data import DataBundle, DatasetError, DATASETS, build_dataset, eval_batches, steps_per_epoch, train_batches
from .flops import dense_macs, macs_from_records
from .losses import complexity_loss, complexity_weights, similarity_loss
from .models import ARCHITECTURES, build_model, load_dense_state_dict
from .static_pruning import StaticPrunedResNet, keep_for_target_macs, static_pruned_like

__all__ = ["main", "train", "build_parser", "make_args", "UsageError", "TrainingDiverged", "OneLineArgumentParser",
           "check_device", "check_save_path", "defining_arg_differences", "method_name",
           "remain_rate", "cosine_lr", "calibrate_thresholds", "compute_loss", "evaluate",
           "load_checkpoint", "read_checkpoint_arg", "atomic_save", "CHECKPOINT_FORMAT"]

CHECKPOINT, BEST, LAST, LOG = "checkpoint.pth", "model_best.pth", "last.pth", "log.jsonl"

# Arguments that define the run: a resumed run must use the same values.  A checkpoint
# written before a flag existed ran with its default (see defining_arg_differences).
DEFINING_ARGS = ("arch", "dataset", "dense", "epochs", "lr", "batch_size", "decay", "decay_branch",
                 "target_remain_rate", "lambda_lasso", "lambda_graph", "thre_freq", "thre_init",
                 "thre_cls", "gamma", "clamp_max", "squeeze_rate", "train_subset", "test_subset",
                 "image_size", "freeze_bn", "amp", "clip_grad", "gate_init",
                 "static_keep", "static_target_macs", "target_epoch_frac", "thre_window")


class UsageError(ValueError):
    """Bad user input (flags, paths, devices): reported without a traceback, exit code 2."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left in place."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (``prog: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ============================================================================ arguments

def build_parser() -> argparse.ArgumentParser:
    """The ``manidp-train`` argument parser (the seed's flags, plus operational ones)."""
    p = OneLineArgumentParser(prog="manidp-train", description="Train ManiDP dynamic-pruned ResNets "
                              "(--lambda_graph 0: without the manifold term, FBS-like), the dense baseline "
                              "(--dense) or a static L1-pruned network (--static_keep / --static_target_macs).")
    a = p.add_argument
    a("--arch", default="dyresnet56", help=f"architecture ({', '.join(sorted(ARCHITECTURES))})")
    a("--dataset", default="cifar10", choices=DATASETS)
    a("--data_path", default=None, help="dataset location (fashion-mnist defaults to the Debian package)")
    a("--pretrain_path", default=None, help="dense checkpoint file, or a directory holding one "
      "(e.g. resnet56.pth, model_best.pth, checkpoint.pth)")
    a("--target_remain_rate", type=float, default=0.6, help="desired fraction of channels kept")
    a("--target_epoch_frac", type=float, default=1.0, metavar="F",
      help="the remain rate reaches --target_remain_rate at epoch ceil(F * epochs) - 1 and stays there "
           "(1.0: at the last epoch, the paper's schedule)")
    a("--lambda_lasso", type=float, default=5e-3, help="weight of the complexity (sparsity) loss")
    a("--lambda_graph", type=float, default=1.0, help="weight of the manifold similarity loss")
    a("--ngpu", type=int, default=1, help="number of GPUs; 0 trains on the CPU; N>1 starts N processes")
    a("--epochs", type=int, default=200)
    a("--lr", type=float, default=0.05, help="initial learning rate (cosine to 0 per iteration)")
    a("--batch_size", type=int, default=128, help="global batch size (split over processes)")
    a("--decay", type=float, default=5e-4, help="weight decay of the backbone")
    a("--decay_branch", type=float, default=0.0, help="weight decay of the gate parameters")
    a("--thre_freq", type=int, default=1, help="recalibrate gate thresholds every N epochs")
    a("--thre_window", type=int, default=0, metavar="S",
      help="also recalibrate every S training steps from the gate values of those steps, at the epoch's "
           "remain rate (0: only at epoch starts, from the whole last epoch, the paper's rule)")
    a("--thre_init", type=float, default=-10000.0, help="initial gate threshold (all channels pass)")
    a("--thre_cls", type=float, default=0.5, help="easy instance: loss < thre_cls * previous mean loss")
    a("--gamma", type=float, default=1.0, help="exponent of the complexity weights")
    a("--clamp_max", type=float, default=1000.0, help="upper clamp of gate values")
    a("--squeeze_rate", type=int, default=2, help="gate hidden-layer reduction")
    a("--save_path", default="./runs/manidp", help="directory for checkpoints and the log")
    a("--manualSeed", type=int, default=None, help="random seed (random if omitted; recorded)")
    a("--workers", type=int, default=4, help="DataLoader workers (ImageFolder datasets only)")
    a("--device", default=None, help="cpu, cuda or cuda:N (overrides --ngpu's device choice)")
    a("--amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    a("--dense", action="store_true", help="train the dense baseline (no gates, no gate losses)")
    a("--static_keep", type=float, default=None, metavar="K",
      help="static L1 pruning: cut the --pretrain_path dense network to keep K in (0, 1] of every block's "
           "inner channels, then train it like --dense")
    a("--static_target_macs", type=float, default=None, metavar="F",
      help="static L1 pruning to F x the dense MACs (the uniform keep ratio that comes closest)")
    a("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
      help="continue from CKPT, or from SAVE_PATH/checkpoint.pth when no path is given")
    a("--overwrite", action="store_true", help="start a fresh run even if --save_path holds one, replacing it")
    a("--deterministic", action="store_true", help="deterministic algorithms; bit-exact resume")
    a("--train_subset", type=int, default=None, help="use a fixed subset of N training images")
    a("--test_subset", type=int, default=None, help="use a fixed subset of M test images")
    a("--image_size", type=int, default=None, help="input size for imagenet (224) and synthetic (32)")
    a("--freeze_bn", action="store_true", help="keep BatchNorm statistics fixed while training")
    a("--clip_grad", type=float, default=5.0, help="clip the global gradient norm to this value (0: off)")
    a("--gate_init", default="identity", choices=("identity", "kaiming"),
      help="fresh gates: docs/DESIGN.md 1.1's Kaiming init, or fc2 weights zeroed so every gate starts at 1 "
           "and the gated net starts equal to the dense one")
    a("--max_nonfinite", type=int, default=5, help="stop after this many non-finite losses in a row")
    a("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def make_args(args=None, **kwargs) -> argparse.Namespace:
    """A complete argument namespace: parser defaults, then ``args`` (Namespace or dict), then kwargs."""
    ns = build_parser().parse_args([])
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    given.update(kwargs)
    unknown = sorted(k for k in given if not hasattr(ns, k))
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(unknown)}")
    for k, v in given.items():
        setattr(ns, k, v)
    return ns


def validate_args(args: argparse.Namespace) -> None:
    """Reject values that cannot work, with a message naming the flag and its allowed range."""
    finite = math.isfinite
    checks = [
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.batch_size >= 1, "--batch_size must be >= 1"),
        (finite(args.lr) and args.lr >= 0, "--lr must be a finite number >= 0"),
        (0.0 < args.target_remain_rate <= 1.0, "--target_remain_rate must be in (0, 1]"),
        (args.thre_freq >= 1, "--thre_freq must be >= 1"),
        (args.ngpu >= 0, "--ngpu must be >= 0"),
        (args.workers >= 0, "--workers must be >= 0"),
        (args.squeeze_rate >= 1, "--squeeze_rate must be >= 1"),
        (finite(args.thre_cls) and args.thre_cls > 0, "--thre_cls must be a finite number > 0"),
        (args.max_nonfinite >= 1, "--max_nonfinite must be >= 1"),
        (args.train_subset is None or args.train_subset >= 1, "--train_subset must be >= 1"),
        (args.test_subset is None or args.test_subset >= 1, "--test_subset must be >= 1"),
        (args.image_size is None or args.image_size >= 1, "--image_size must be >= 1"),
        (finite(args.clamp_max) and args.clamp_max > 0, "--clamp_max must be a finite number > 0"),
        (not math.isnan(args.thre_init), "--thre_init must be a number (not NaN)"),
        (finite(args.clip_grad) and args.clip_grad >= 0, "--clip_grad must be a finite number >= 0"),
        (0.0 < args.target_epoch_frac <= 1.0, "--target_epoch_frac must be in (0, 1]"),
        (args.thre_window >= 0, "--thre_window must be >= 0"),
    ]
    checks += [(finite(getattr(args, k)) and getattr(args, k) >= 0, f"--{k} must be a finite number >= 0")
               for k in ("decay", "decay_branch", "lambda_lasso", "lambda_graph", "gamma")]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    validate_static_args(args)
    model_arch(args)  # validates --arch


def validate_static_args(args: argparse.Namespace) -> None:
    """``--static_keep`` / ``--static_target_macs``: one of them, in (0, 1], a dense --arch and --pretrain_path."""
    given = [f for f in ("static_keep", "static_target_macs") if getattr(args, f) is not None]
    if not given:
        return
    flag = f"--{given[0]}"
    if len(given) > 1:
        raise UsageError("--static_keep and --static_target_macs are exclusive: give one of them")
    value = getattr(args, given[0])
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise UsageError(f"{flag} must be in (0, 1]; got {value}")
    if args.dense:
        raise UsageError(f"{flag} trains a static-pruned network; it cannot be combined with --dense")
    if args.arch.startswith("dy"):
        raise UsageError(f"{flag} cuts a dense network: give the dense --arch {dense_arch_name(args.arch)}, "
                         f"not {args.arch}")
    if not args.pretrain_path:
        raise UsageError(f"{flag} needs --pretrain_path, the dense checkpoint the static network is cut from")


def is_static(args) -> bool:
    """Whether the run trains a static-pruned network (``--static_keep`` or ``--static_target_macs``)."""
    return getattr(args, "static_keep", None) is not None or getattr(args, "static_target_macs", None) is not None


def trains_gates(args) -> bool:
    """Whether the run trains a gated network (ManiDP or FBS-like), not a dense or static one."""
    return not args.dense and not is_static(args)


def method_name(args) -> str:
    """``dense``, ``static``, ``fbs`` (gated, ``--lambda_graph 0``) or ``manidp``."""
    if args.dense:
        return "dense"
    if is_static(args):
        return "static"
    return "fbs" if args.lambda_graph == 0 else "manidp"


def dense_arch_name(arch: str) -> str:
    """``dyresnet56`` -> ``resnet56`` (dense names pass through)."""
    return arch[2:] if arch.startswith("dy") else arch


def model_arch(args) -> str:
    """The architecture actually built: the dense one with ``--dense`` (or the one a static network is cut
    from), else the gated one."""
    dense = dense_arch_name(args.arch)
    name = "dy" + dense if trains_gates(args) else dense
    if name not in ARCHITECTURES:
        choices = sorted(a for a in ARCHITECTURES if a.startswith("dy"))
        raise UsageError(f"unknown --arch {args.arch!r}; expected one of {', '.join(choices)} "
                         f"(with or without the 'dy' prefix)")
    return name


# ============================================================================ the output directory

RUN_FILES = (CHECKPOINT, LAST, BEST)


def existing_run(path: str) -> List[str]:
    """The files of a training run in directory ``path``: checkpoints, and ``log.jsonl`` if not empty."""
    found = [n for n in RUN_FILES if os.path.isfile(os.path.join(path, n))]
    log = os.path.join(path, LOG)
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        found.append(LOG)
    return found


def check_save_path(args) -> None:
    """Before any work: ``--save_path`` can be written, and a fresh run would not replace another run.

    A run counts as fresh without ``--resume``, or with a bare ``--resume`` and no
    checkpoint to continue from.  ``--overwrite`` lets a fresh run replace one.
    """
    path = args.save_path
    _check_writable_dir(path)
    if not os.path.isdir(path) or args.overwrite:
        return
    resumes = args.resume and not (_auto_resume(args) and not os.path.isfile(os.path.join(path, CHECKPOINT)))
    found = existing_run(path)
    if found and not resumes:
        raise UsageError(f"--save_path {path!r} already holds a training run ({', '.join(found)}); continue it "
                         "with --resume, or pass --overwrite to replace it")


def _check_writable_dir(path: str) -> None:
    """UsageError unless ``path`` is (or can be created as) a directory this process can write to."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"cannot create --save_path {path!r}: it exists and is not a directory")
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor decides whether path can be created
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"cannot create --save_path {path!r}: {probe!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        what = "--save_path" if probe == path else f"--save_path {path!r}: the nearest existing directory"
        raise UsageError(f"{what} {probe!r} is not writable ({e.strerror or e})") from None


def _auto_resume(args) -> bool:
    """Whether ``--resume`` was given without a path (continue from ``SAVE_PATH/checkpoint.pth``)."""
    return args.resume is True or args.resume == "auto"  # the Python API may pass resume=True


# ============================================================================ devices, seeds

def check_device(spec: str, flag: str = "--device") -> torch.device:
    """``spec`` as a device this machine has: ``cpu``, ``cuda`` or ``cuda:N``; UsageError otherwise."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{flag} {spec!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {spec!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {spec} but CUDA is not available here; use {flag} cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {spec} but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def resolve_device(args) -> torch.device:
    """The device to train on, from ``--device`` or ``--ngpu`` (0 = CPU)."""
    if args.device:
        return check_device(args.device)
    if args.ngpu == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--ngpu {args.ngpu} asks for CUDA GPUs, but CUDA is not available on this "
                         "machine (torch.cuda.is_available() is False); use --ngpu 0 to train on the CPU")
    if args.ngpu > torch.cuda.device_count():
        raise UsageError(f"--ngpu {args.ngpu} but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if state.get("cuda") is not None and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    """Lists back to tuples, recursively (``random.setstate`` wants tuples)."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@contextmanager
def determinism(enabled: bool, device: torch.device):
    """Deterministic algorithms inside the block (restored afterwards for in-process callers)."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotuning pays off
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[1], prev[2]


# ============================================================================ model

def create_model(args, info) -> nn.Module:
    """Build the (gated or dense) model for the dataset described by ``info``.

    For a static run this is the dense network the narrow one is cut from (:func:`cut_static_network`).
    """
    kw = dict(num_classes=info.num_classes, in_channels=info.in_channels)
    if trains_gates(args):
        kw.update(squeeze_rate=args.squeeze_rate, clamp_max=args.clamp_max, thre_init=args.thre_init)
    return build_model(model_arch(args), **kw)


PRETRAIN_NAMES = ("{dense}.pth", "{dense}.pth.tar", "{dense}.th", BEST, "model_best.pth.tar", LAST,
                  CHECKPOINT, "checkpoint.pth.tar")


def find_pretrained(path: str, arch: str) -> str:
    """``path`` itself if a file, else the first known checkpoint name inside the directory."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UsageError(f"--pretrain_path {path!r} does not exist")
    names = [n.format(dense=dense_arch_name(arch)) for n in PRETRAIN_NAMES]
    for n in names:
        if os.path.isfile(os.path.join(path, n)):
            return os.path.join(path, n)
    raise UsageError(f"--pretrain_path {path!r} is a directory without a checkpoint; "
                     f"looked for {', '.join(names)}")


def read_checkpoint_arg(path: str, flag: str) -> dict:
    """:func:`manidp.checkpoint.read_checkpoint` of a file named by ``flag``; its errors as UsageError."""
    try:
        return read_checkpoint(path)
    except (OSError, CheckpointError) as e:
        raise UsageError(f"{flag}: {e}") from None


def load_pretrained(model: nn.Module, path: str, arch: str):
    """Load dense (or gated) weights into ``model``; only gate entries may stay fresh.

    Returns ``(file, fresh_keys)``: the file read and the entries left at their init.
    """
    file = find_pretrained(path, arch)
    try:
        state = extract_state_dict(read_checkpoint_arg(file, "--pretrain_path"), file)
    except CheckpointError as e:
        raise UsageError(f"--pretrain_path: {e}") from None
    try:
        fresh = load_dense_state_dict(model, state, strict_classifier=False)
    except ValueError as e:
        raise UsageError(f"--pretrain_path {file!r} does not fit {arch}: {e}") from None
    if any(k.startswith("fc.") for k in fresh):
        warnings.warn(f"{file}: classifier shape differs from the model; the classifier starts fresh")
    return file, fresh


@torch.no_grad()
def init_fresh_gates(net: nn.Module, fresh: Sequence[str], mode: str) -> None:
    """``identity``: zero the fc2 weights of gates not loaded from a checkpoint.

    Every such gate then outputs exactly its bias, 1.0, so the gated network
    starts as the dense one; the Kaiming init instead scales each block's
    features by random per-channel factors that compound over the depth.
    """
    if mode != "identity":
        return
    fresh = set(fresh)
    for name, mod in net.named_modules():
        if name and f"{name}.fc2.weight" in fresh and hasattr(mod, "mask_sum"):
            mod.fc2.weight.zero_()


def cut_static_network(dense: nn.Module, args, info, ckpt: Optional[dict]) -> StaticPrunedResNet:
    """The narrow network of ``--static_keep`` / ``--static_target_macs``, cut from ``dense`` (docs/DESIGN.md 9).

    A fresh run cuts the pretrained network by filter L1 norm, to ``--static_keep`` or
    to the keep ratio whose MACs come closest to ``--static_target_macs`` x dense; a
    resumed run rebuilds the checkpoint's ``widths`` (its weights are loaded next).
    BN stays a separate layer, so the network trains like a dense one.
    """
    if ckpt is not None:
        widths = ckpt.get("widths")
        if widths is None:
            raise UsageError("--resume: the checkpoint records no 'widths', so it is not a static-pruned run")
        try:
            return static_pruned_like(dense, widths=widths, fold_bn=False)
        except ValueError as e:
            raise UsageError(f"--resume: the checkpoint's widths do not fit {model_arch(args)}: {e}") from None
    keep = args.static_keep
    if keep is None:
        keep = keep_for_target_macs(dense, args.static_target_macs, info.input_size)
    return static_pruned_like(dense, keep, fold_bn=False)


def gate_parameters(model: nn.Module):
    """(gate params, backbone params), split by name."""
    gate, rest = [], []
    for name, p in model.named_parameters():
        (gate if (".gate1." in name or ".gate2." in name) else rest).append(p)
    return gate, rest


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """SGD Nesterov 0.9; ``--decay`` on the backbone, ``--decay_branch`` on the gates."""
    gate, rest = gate_parameters(model)
    groups = [{"params": rest, "weight_decay": args.decay}]
    if gate:
        groups.append({"params": gate, "weight_decay": args.decay_branch})
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)


# ============================================================================ schedules, thresholds

def cosine_lr(base_lr: float, iteration: int, total: int) -> float:
    """Cosine decay from ``base_lr`` (iteration 0) towards 0 (iteration ``total``)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(iteration, total) / max(total, 1)))


def remain_rate(epoch: int, epochs: int, target: float, target_epoch_frac: float = 1.0) -> float:
    """Remain rate of epoch ``epoch`` of ``epochs``: a cosine from 1 down to ``target`` (docs/DESIGN.md 1.4, 9).

    ``r(e) = (1 - t)/2 * cos(pi * min(e + 1, R) / R) + (1 + t)/2`` with
    ``R = ceil(target_epoch_frac * epochs)``, at least 1: the rate reaches ``t`` at
    epoch ``R - 1`` and stays there.  ``target_epoch_frac = 1`` is the paper's
    schedule (``R = E``: ``t`` at the last epoch).
    """
    ramp = max(math.ceil(target_epoch_frac * epochs - 1e-9), 1)  # 1e-9: 0.7 * 10 must give 7, not 8
    return (1 - target) / 2 * math.cos(math.pi * min(epoch + 1, ramp) / ramp) + (1 + target) / 2


@torch.no_grad()
def calibrate_thresholds(gates: Sequence[nn.Module], count: float, rate: float) -> List[float]:
    """Set each gate's threshold to the k-th largest mean gate value, ``k = ceil(rate * C)``."""
    out = []
    for gate in gates:
        mean = gate.mask_sum.double() / max(count, 1.0)
        c = mean.numel()
        k = min(max(math.ceil(rate * c - 1e-9), 1), c)  # 1e-9: 0.5 * 32 must give 16, not 17
        thre = torch.topk(mean, k).values[-1]
        gate.threshold.fill_(float(thre))
        out.append(float(thre))
    return out


@torch.no_grad()
def reset_gate_statistics(gates: Sequence[nn.Module]) -> None:
    """Zero every gate's ``mask_sum`` (start of an epoch)."""
    for gate in gates:
        gate.mask_sum.zero_()


# ============================================================================ loss

def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l_prev: Optional[float], args,
                 env: Optional[D.DistEnv] = None):
    """``mean ce + lambda_lasso * L_cplx + lambda_graph * sum L_sim`` (docs/DESIGN.md 1.3).

    Returns ``(loss, ce, parts)``: the scalar loss, per-instance cross-entropy
    (N,), and a dict of detached components.  Dense and static-pruned models give ``mean ce``.
    """
    env = env or D.DistEnv()
    if not trains_gates(args):
        ce = F.cross_entropy(model(x).float(), y, reduction="none")
        return ce.mean(), ce, {}
    logits, recs = model(x, return_gates=True)
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    loss, parts = ce.mean(), {}
    if args.lambda_lasso:
        w = complexity_weights(ce, l_prev or 0.0, args.thre_cls, args.gamma)
        cplx = complexity_loss([r.lasso.float() for r in recs], w)
        loss = loss + args.lambda_lasso * cplx
        parts["cplx"] = cplx.detach()
    if args.lambda_graph:
        sim = similarity_term(recs, env)
        loss = loss + args.lambda_graph * sim
        parts["sim"] = sim.detach()
    return loss, ce, parts


def similarity_term(recs, env: D.DistEnv) -> torch.Tensor:
    """``sum_l L_sim_l`` over the global batch (one all-gather for all gates when distributed)."""
    sizes = [r.g.shape[1] for r in recs]
    g = D.gather_batch(env, torch.cat([r.g.float() for r in recs], 1))
    f = D.gather_batch(env, torch.cat([r.feat.float() for r in recs], 1))
    terms = [similarity_loss(gi, fi) for gi, fi in zip(g.split(sizes, 1), f.split(sizes, 1))]
    return torch.stack(terms).sum()


# ============================================================================ evaluation

@torch.no_grad()
def evaluate(net: nn.Module, batches, env: Optional[D.DistEnv] = None, device=None, amp: bool = False,
             count_flops: bool = True, desc: str = "eval", quiet: bool = True) -> Dict[str, float]:
    """Test loss, top-1/top-5 (%), active-channel ratio and FLOPs reduction (gates counted).

    Sums are all-reduced, so every rank returns the metrics of the whole set.  A
    static-pruned network costs its narrow MACs, against the dense network it was cut from.
    """
    env = env or D.DistEnv()
    device = device or next(net.parameters()).device
    gated = any(True for _ in net.gates())
    net.eval()
    tot = np.zeros(6)  # n, ce sum, top1, top5, active-ratio sum, macs sum
    input_size = None
    for x, y in _progress(batches, None, desc, quiet or not env.is_main):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        input_size = tuple(x.shape[-2:])
        with _autocast(device, amp):
            out = net(x, return_gates=True) if gated else net(x)
        logits, recs = out if gated else (out, None)
        tot += _batch_metrics(net, logits.float(), y, recs, input_size, count_flops)
    tot = np.array(D.all_reduce_sum(env, tot.tolist()))
    return _finish_metrics(net, tot, input_size)


def _batch_metrics(net, logits, y, recs, input_size, count_flops: bool) -> np.ndarray:
    """One batch's contribution to the sums :func:`evaluate` keeps."""
    n = y.shape[0]
    k = min(5, logits.shape[1])
    top = logits.topk(k, 1).indices
    hit = top == y[:, None]
    ce = F.cross_entropy(logits, y, reduction="sum")
    active, macs = n * _ungated_active_ratio(net), 0.0
    if recs is not None:
        act = sum((r.mask > 0).sum(1).double() for r in recs)
        active = float((act / sum(r.mask.shape[1] for r in recs)).sum())
    if count_flops:
        macs = float(macs_from_records(net, recs, input_size).sum()) if recs is not None else \
            n * float(_ungated_macs(net, input_size))
    return np.array([n, float(ce), float(hit[:, 0].sum()), float(hit.any(1).sum()), active, macs])


def _finish_metrics(net, tot: np.ndarray, input_size) -> Dict[str, float]:
    """Turn the summed counts into the metrics dict."""
    n = max(tot[0], 1.0)
    dense = _dense_macs_of(net, input_size) if input_size else 0
    mean_macs = tot[5] / n
    out = {"loss": tot[1] / n, "top1": 100.0 * tot[2] / n, "top5": 100.0 * tot[3] / n,
           "active_ratio": tot[4] / n, "mean_macs": mean_macs,
           "flops_reduction": (1.0 - mean_macs / dense) if dense and tot[5] else 0.0}
    # plain Python numbers: checkpoints must load with weights_only=True (no numpy scalars)
    return {"n": int(tot[0]), "dense_macs": int(dense), **{k: float(v) for k, v in out.items()}}


def _ungated_macs(net: nn.Module, input_size) -> int:
    """MACs of one image through an ungated network: a static-pruned one costs its narrow widths."""
    return net.macs(input_size) if isinstance(net, StaticPrunedResNet) else dense_macs(net, input_size)


def _dense_macs_of(net: nn.Module, input_size) -> int:
    """Dense MACs of one image (docs/DESIGN.md 1.5): of ``net`` without its gates, or of the network a
    static-pruned ``net`` was cut from."""
    return net.dense_macs(input_size) if isinstance(net, StaticPrunedResNet) else dense_macs(net, input_size)


def _ungated_active_ratio(net: nn.Module) -> float:
    """Share of the blocks' conv output channels an ungated network computes, counted as for gates.

    Gates cover the outputs of both convs of every block; a static-pruned block
    computes ``width`` of conv1's and all of conv2's; a dense network all of them.
    """
    if not isinstance(net, StaticPrunedResNet):
        return 1.0
    blocks = list(net.blocks())
    return sum(b.width + b.planes for b in blocks) / sum(2 * b.planes for b in blocks)


def _autocast(device: torch.device, enabled: bool):
    """Mixed precision context: fp16 on CUDA, bf16 on CPU; a no-op when disabled."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(it, total, desc: str, disable: bool):
    """A tqdm bar on a terminal, the bare iterator otherwise."""
    if disable or not sys.stderr.isatty():
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)


# ============================================================================ checkpoints

def load_checkpoint(path: str, flag: str = "--resume") -> dict:
    """Read one of our checkpoints (weights-only unpickling: no code runs); UsageError otherwise."""
    ckpt = read_checkpoint_arg(path, flag)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{flag}: {path!r} is not a manidp-train checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


# ============================================================================ the run

@dataclass
class State:
    """Training progress, everything a resumed run needs besides weights and optimizer."""

    epoch: int = 0                    # next epoch to run
    iteration: int = 0
    l_prev: Optional[float] = None
    mask_count: float = 0.0           # instances behind the gates' mask_sum
    rate: float = 1.0                 # remain rate of the current thresholds
    best_top1: float = -1.0
    nonfinite_streak: int = 0
    skipped: int = 0
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        """Checkpoint form."""
        return dict(vars(self))


@dataclass
class Run:
    """Everything one training run holds."""

    args: argparse.Namespace
    env: D.DistEnv
    data: DataBundle
    net: nn.Module            # the model itself
    model: nn.Module          # what is called in training (DDP wrapper when distributed)
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    state: State
    steps: int                # training batches per epoch on this rank

    @property
    def gates(self) -> list:
        """The net's gates in forward order (empty for dense)."""
        return list(self.net.gates())

    @property
    def device(self) -> torch.device:
        """The device this rank trains on."""
        return self.env.device

    def path(self, name: str) -> str:
        """A file under ``--save_path``."""
        return os.path.join(self.args.save_path, name)

    def say(self, msg: str) -> None:
        """Print a progress line on rank 0 unless ``--quiet``."""
        if self.env.is_main and not self.args.quiet:
            print(msg, flush=True)


def train(args=None, **kwargs) -> dict:
    """Train as ``manidp-train`` does and return a result dict (see the module docstring).

    ``args`` is an ``argparse.Namespace`` or dict of ``manidp-train`` options;
    keyword arguments override it.  Raises :class:`UsageError`,
    :class:`~manidp.data.DatasetError` or :class:`TrainingDiverged`.
    """
    args = make_args(args, **kwargs)
    validate_args(args)
    device = resolve_device(args)
    check_save_path(args)
    if args.ngpu > 1 and device.type == "cuda" and D.env_world_size() == 1:
        return _launch_processes(args)
    env = D.init_distributed(device)
    try:
        with determinism(args.deterministic, env.device):
            run = setup(args, env)
            return fit(run)
    finally:
        D.cleanup(env)


def _spawned_train(arg_dict: dict) -> dict:
    """Entry point of a process started by :func:`_launch_processes`."""
    return train(arg_dict)


def _launch_processes(args) -> dict:
    """``--ngpu N`` outside torchrun: start N processes (one per GPU), return rank 0's result."""
    build_dataset(args.dataset, args.data_path, args.train_subset, args.test_subset, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        results = D.spawn(args.ngpu, _spawned_train, (vars(args),), os.path.join(tmp, "result"))
    return results[0]


def setup(args, env: D.DistEnv) -> Run:
    """Data, model, optimizer, and (fresh or resumed) state, all before any training step."""
    ckpt = _resume_checkpoint(args)
    if ckpt is not None:
        _adopt_checkpoint_args(args, ckpt)
    _choose_seed(args, env)
    if env.world_size > 1 and args.batch_size % env.world_size:
        raise UsageError(f"--batch_size {args.batch_size} must be divisible by the {env.world_size} processes")
    data = build_dataset(args.dataset, args.data_path, args.train_subset, args.test_subset, args.image_size)
    seed_everything(args.manualSeed)
    net = create_model(args, data.info)
    fresh = [n for n, _ in net.named_parameters()]
    if args.pretrain_path and ckpt is None:
        file, fresh = load_pretrained(net, args.pretrain_path, model_arch(args))
        if env.is_main and not args.quiet:
            print(f"loaded pretrained weights from {file}", flush=True)
    if ckpt is None:
        init_fresh_gates(net, fresh, args.gate_init)
    if is_static(args):
        net = cut_static_network(net, args, data.info, ckpt)
        if env.is_main and not args.quiet:
            print(f"static-pruned network: block widths {net.widths}", flush=True)
    net.to(env.device)
    optimizer = make_optimizer(net, args)
    scaler = torch.amp.GradScaler("cuda") if args.amp and env.device.type == "cuda" else None
    state = _restore(ckpt, net, optimizer, scaler) if ckpt is not None else State()
    model = _wrap_ddp(net, env)
    steps = steps_per_epoch(data.info.num_train, args.batch_size // env.world_size, env.world_size)
    _prepare_save_path(args, env, state, fresh=ckpt is None)
    return Run(args, env, data, net, model, optimizer, scaler, state, steps)


def _resume_checkpoint(args) -> Optional[dict]:
    """The checkpoint ``--resume`` points at (None for a fresh run)."""
    if not args.resume:
        return None
    auto = _auto_resume(args)
    path = os.path.join(args.save_path, CHECKPOINT) if auto else args.resume
    if auto and not os.path.isfile(path):
        warnings.warn(f"--resume: no checkpoint at {path}; starting a fresh run")
        return None
    return load_checkpoint(path)


def _adopt_checkpoint_args(args, ckpt: dict) -> None:
    """A resumed run must be the same run: defining flags must match the checkpoint's."""
    saved = ckpt["args"]
    if args.manualSeed is None:
        args.manualSeed = saved.get("manualSeed")
    diffs = defining_arg_differences(args, saved)
    if diffs:
        raise UsageError("--resume with settings that differ from the checkpoint's: " + "; ".join(diffs))


def defining_arg_differences(args, saved: dict) -> List[str]:
    """``--flag value (checkpoint: value)`` for each flag that defines a run where ``args`` and ``saved`` differ.

    ``saved`` is a checkpoint's ``args``.  The flags are :data:`DEFINING_ARGS` and the
    seed.  A flag ``saved`` lacks was added after the checkpoint was written, so
    that run used the flag's default: the comparison takes the default.
    """
    defaults = vars(build_parser().parse_args([]))
    diffs = []
    for k in DEFINING_ARGS:
        ours, theirs = getattr(args, k), saved.get(k, defaults[k])
        if ours != theirs and not _same_arch(k, ours, theirs):
            diffs.append(f"--{k} {ours!r} (checkpoint: {theirs!r})")
    if args.manualSeed != saved.get("manualSeed"):
        diffs.append(f"--manualSeed {args.manualSeed} (checkpoint: {saved.get('manualSeed')})")
    return diffs


def _same_arch(key: str, a, b) -> bool:
    """``dyresnet56`` and ``resnet56`` name the same architecture family."""
    return key == "arch" and dense_arch_name(str(a)) == dense_arch_name(str(b))


def _choose_seed(args, env: D.DistEnv) -> None:
    """Pick a seed when none was given; every rank must use rank 0's."""
    if args.manualSeed is None:
        args.manualSeed = random.SystemRandom().randint(1, 10000)
        if env.active:
            args.manualSeed = int(D.all_reduce_sum(env, [args.manualSeed if env.is_main else 0])[0])


def _restore(ckpt: dict, net, optimizer, scaler) -> State:
    """Load weights, optimizer, scaler and RNG states; return the saved progress."""
    net.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return State(**ckpt["state"])


def _wrap_ddp(net: nn.Module, env: D.DistEnv) -> nn.Module:
    """DDP wrapper when distributed; ``broadcast_buffers=False`` keeps each rank's ``mask_sum``."""
    if not env.active:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [env.device.index] if env.device.type == "cuda" else None
    with warnings.catch_warnings():  # newer torch renames the flag; torch 2.4 only knows this one
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(net, device_ids=ids, broadcast_buffers=False)


def _prepare_save_path(args, env: D.DistEnv, state: State, fresh: bool) -> None:
    """Create ``--save_path``, drop stale temp files, cut the log back to the resumed epoch.

    A fresh run (allowed over an earlier one only with ``--overwrite``, see
    :func:`check_save_path`) first removes that run's checkpoints, so the
    directory never mixes two runs' files.
    """
    if env.is_main:
        try:
            os.makedirs(args.save_path, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --save_path {args.save_path!r}: {e}") from None
        remove_stale_temp_files(args.save_path, "*.pth")
        if fresh:
            for name in RUN_FILES:
                if os.path.isfile(os.path.join(args.save_path, name)):
                    os.unlink(os.path.join(args.save_path, name))
        _truncate_log(os.path.join(args.save_path, LOG), state.epoch)
    D.barrier(env)


def _truncate_log(path: str, epoch: int) -> None:
    """Keep only log lines of epochs before ``epoch`` (a resumed run rewrites the rest)."""
    keep = []
    if epoch > 0 and os.path.isfile(path):
        with open(path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("epoch", 1 << 30) < epoch]
    with open(path, "w") as f:
        f.writelines(keep)


# ============================================================================ epochs

def fit(run: Run) -> dict:
    """Run the remaining epochs; return the result dict."""
    args, st = run.args, run.state
    gated = trains_gates(args)
    if gated and st.l_prev is None:  # docs/DESIGN.md 1.3: before epoch 0, one eval pass over the training set
        st.l_prev = _initial_l_prev(run)
    for epoch in range(st.epoch, args.epochs):
        t0 = time.time()
        if gated:
            _maybe_calibrate(run, epoch)
            reset_gate_statistics(run.gates)
        stats = train_one_epoch(run, epoch)
        _end_of_epoch_sync(run, stats)
        metrics = _eval_split(run, run.data.test, f"test {epoch}")
        _finish_epoch(run, epoch, stats, metrics, time.time() - t0)
    return _final(run)


def _initial_l_prev(run: Run) -> float:
    """Mean eval-mode loss over the training set; 0 (nobody counts as easy) if it is not finite.

    A network whose BatchNorm statistics do not fit it yet (e.g. no --pretrain_path)
    can overflow in eval mode; epoch 0 then trains without the complexity term and
    epoch 1 uses epoch 0's training loss as usual.
    """
    loss = _eval_split(run, run.data.train_eval, "L_prev", count_flops=False)["loss"]
    if math.isfinite(loss):
        return loss
    warnings.warn(f"the initial evaluation pass gave a non-finite mean loss ({loss}); epoch 0 runs "
                  "without the complexity loss", RuntimeWarning)
    return 0.0


def _maybe_calibrate(run: Run, epoch: int) -> None:
    """Thresholds from last epoch's gate statistics, every ``thre_freq`` epochs from epoch 1 on."""
    args, st = run.args, run.state
    if epoch >= 1 and epoch % args.thre_freq == 0 and st.mask_count > 0:
        st.rate = remain_rate(epoch, args.epochs, args.target_remain_rate, args.target_epoch_frac)
        _calibrate(run, st.mask_count)


def _calibrate(run: Run, count: float) -> None:
    """Thresholds at the current remain rate from ``count`` instances' gate statistics, alike on every rank."""
    thresholds = calibrate_thresholds(run.gates, count, run.state.rate)
    D.assert_same_across_ranks(run.env, thresholds, "gate thresholds")


def _end_of_epoch_sync(run: Run, stats: dict) -> None:
    """Sum gate statistics and losses over ranks; give every rank the same BN statistics."""
    D.sync_gate_statistics(run.env, run.gates)
    D.average_buffers_(run.env, run.net)
    n, ce, loss, cplx, sim, n_stats = D.all_reduce_sum(
        run.env, [stats[k] for k in ("n", "ce", "loss", "cplx", "sim", "n_stats")])
    stats.update(n=n, ce=ce, loss=loss, cplx=cplx, sim=sim, n_stats=n_stats)
    run.state.mask_count = n_stats  # the instances behind mask_sum: the epoch's, or its last window's


def _eval_split(run: Run, ds, desc: str, count_flops: bool = True) -> dict:
    """:func:`evaluate` on this rank's share of ``ds``."""
    local = max(run.args.batch_size // run.env.world_size, 1)
    batches = eval_batches(ds, local, run.env.rank, run.env.world_size, run.args.workers,
                           run.device.type == "cuda")
    return evaluate(run.net, batches, run.env, run.device, run.args.amp, count_flops, desc, run.args.quiet)


def train_one_epoch(run: Run, epoch: int) -> dict:
    """One pass over this rank's training batches; returns local sums (n, ce, loss, cplx, sim)."""
    args, env = run.args, run.env
    _train_mode(run)
    local = args.batch_size // env.world_size
    batches = train_batches(run.data.train, epoch, local, args.manualSeed, env.rank, env.world_size,
                            args.workers, run.device.type == "cuda")
    sums = dict(n=0.0, ce=0.0, loss=0.0, cplx=0.0, sim=0.0, skipped=0, n_stats=0.0)
    window = args.thre_window if (run.gates and epoch >= 1) else 0
    for step, (x, y) in enumerate(_progress(batches, run.steps, f"epoch {epoch}", args.quiet or not env.is_main)):
        n_before = sums["n"]
        _train_step(run, x, y, sums)
        sums["n_stats"] += sums["n"] - n_before  # a skipped step leaves no statistics
        if window and (step + 1) % window == 0 and step + 1 < run.steps:
            _window_calibrate(run, sums)
    return sums


def _window_calibrate(run: Run, sums: dict) -> None:
    """--thre_window: thresholds from the gate values of the steps since the last calibration.

    Within a long epoch the complexity loss keeps lowering the gate values, so thresholds
    taken from a whole epoch's means sit above most of the next epoch's values and the
    network keeps far fewer channels than the remain rate says (docs/DESIGN.md 1.4).
    """
    D.sync_gate_statistics(run.env, run.gates)
    count = D.all_reduce_sum(run.env, [sums["n_stats"]])[0]
    if count > 0:
        _calibrate(run, count)
    reset_gate_statistics(run.gates)
    sums["n_stats"] = 0.0


def _train_mode(run: Run) -> None:
    """Train mode; with ``--freeze_bn`` BatchNorm keeps using (and not updating) running stats."""
    run.model.train()
    if run.args.freeze_bn:
        for m in run.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _train_step(run: Run, x, y, sums: dict) -> None:
    """One SGD step, or a skipped one when the loss is not finite (on any rank)."""
    args, st = run.args, run.state
    total = run.steps * args.epochs
    lr = cosine_lr(args.lr, st.iteration, total)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    saved = [g.mask_sum.clone() for g in run.gates]  # to undo a skipped batch's statistics
    with _autocast(run.device, args.amp):
        loss, ce, parts = compute_loss(run.model, x, y, st.l_prev, args, run.env)
    st.iteration += 1
    if not _all_finite(run, loss):
        _skip_step(run, saved, loss, sums)
        return
    st.nonfinite_streak = 0
    _backward_step(run, loss)
    _accumulate(sums, loss, ce, parts)


def _all_finite(run: Run, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (ranks must agree to step or skip together)."""
    ok = float(torch.isfinite(loss.detach()).all())
    return D.all_reduce_sum(run.env, [ok])[0] == run.env.world_size


def _skip_step(run: Run, saved, loss, sums: dict) -> None:
    """Leave weights and gate statistics untouched; stop after too many in a row."""
    st = run.state
    for gate, s in zip(run.gates, saved):
        gate.mask_sum.copy_(s)
    st.nonfinite_streak += 1
    st.skipped += 1
    sums["skipped"] += 1
    warnings.warn(f"non-finite loss ({float(loss.detach())}) at iteration {st.iteration}; step skipped "
                  f"({st.nonfinite_streak} in a row)", RuntimeWarning)
    if st.nonfinite_streak >= run.args.max_nonfinite:
        raise TrainingDiverged(
            f"training stopped: {st.nonfinite_streak} non-finite losses in a row (iteration {st.iteration}); "
            f"the last good checkpoint is {os.path.join(run.args.save_path, CHECKPOINT)}; "
            "try a lower --lr or --amp off")


def _backward_step(run: Run, loss: torch.Tensor) -> None:
    """Backward and optimizer step (through the GradScaler under CUDA AMP)."""
    opt = run.optimizer
    opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(opt)  # clip true gradients, not scaled ones
        _clip(run)
        run.scaler.step(opt)
        run.scaler.update()
    else:
        loss.backward()
        _clip(run)
        opt.step()


def _clip(run: Run) -> None:
    """Clip the global gradient norm (after DDP's all-reduce, so every rank clips alike)."""
    if run.args.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), run.args.clip_grad)


def _accumulate(sums: dict, loss, ce, parts: dict) -> None:
    """Add a step's per-instance losses and components to the epoch sums."""
    n = ce.shape[0]
    sums["n"] += n
    sums["ce"] += float(ce.detach().sum())
    sums["loss"] += float(loss.detach()) * n
    sums["cplx"] += float(parts.get("cplx", 0.0)) * n
    sums["sim"] += float(parts.get("sim", 0.0)) * n


def _finish_epoch(run: Run, epoch: int, stats: dict, metrics: dict, seconds: float) -> None:
    """Update the state, then (rank 0) checkpoint, best model and log line."""
    st, args = run.state, run.args
    n = max(stats["n"], 1.0)
    l_used = st.l_prev
    st.l_prev = stats["ce"] / n if stats["n"] else st.l_prev  # docs/DESIGN.md 1.3: next epoch's L_prev
    st.epoch, st.metrics = epoch + 1, metrics
    line = _log_line(run, epoch, stats, metrics, l_used, seconds)
    st.history.append(line)
    is_best = metrics["top1"] > st.best_top1
    st.best_top1 = max(st.best_top1, metrics["top1"])
    _save(run, [CHECKPOINT] + ([BEST] if is_best else []))
    if run.env.is_main:
        with open(run.path(LOG), "a") as f:
            f.write(json.dumps(line) + "\n")
    run.say(_epoch_summary(line, args.epochs))


def _log_line(run: Run, epoch: int, stats: dict, metrics: dict, l_used, seconds: float) -> dict:
    """The JSON log record of one epoch."""
    n = max(stats["n"], 1.0)
    return {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], "remain_rate": run.state.rate,
            "train_loss": stats["loss"] / n, "train_ce": stats["ce"] / n, "cplx": stats["cplx"] / n,
            "sim": stats["sim"] / n, "L_prev": l_used, "skipped": stats["skipped"],
            "test_loss": metrics["loss"], "top1": metrics["top1"], "top5": metrics["top5"],
            "active_ratio": metrics["active_ratio"], "flops_reduction": metrics["flops_reduction"],
            "mean_macs": metrics["mean_macs"], "dense_macs": metrics["dense_macs"],
            "thresholds": [float(g.threshold) for g in run.gates], "time_s": seconds,
            "world_size": run.env.world_size}


def _epoch_summary(line: dict, epochs: int) -> str:
    """One human-readable line per epoch."""
    return (f"epoch {line['epoch'] + 1}/{epochs}  loss {line['train_loss']:.4f}  ce {line['train_ce']:.4f}  "
            f"top1 {line['top1']:.2f}  top5 {line['top5']:.2f}  active {line['active_ratio']:.3f}  "
            f"flops-red {100 * line['flops_reduction']:.1f}%  r {line['remain_rate']:.3f}  "
            f"{line['time_s']:.1f}s")


def checkpoint_dict(run: Run) -> dict:
    """Everything needed to resume, plus what tools need to rebuild the model.

    A static run adds ``widths`` (one int per block), with which
    :func:`manidp.checkpoint.rebuild_model` rebuilds the narrow network.
    """
    ckpt = {"format": CHECKPOINT_FORMAT, "arch": model_arch(run.args), "dense": bool(run.args.dense),
            "state_dict": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "epoch": run.state.epoch - 1, "iteration": run.state.iteration, "L_prev": run.state.l_prev,
            "state": run.state.as_dict(), "rng": rng_state(), "args": dict(vars(run.args)),
            "dataset": run.data.info.as_dict(), "world_size": run.env.world_size,
            "torch_version": str(torch.__version__)}
    if is_static(run.args):
        ckpt["widths"] = list(run.net.widths)
    return ckpt


def _save(run: Run, names: Sequence[str]) -> None:
    """Rank 0 writes ``names`` atomically; every rank waits for it."""
    D.barrier(run.env)
    if run.env.is_main:
        ckpt = with_digest(checkpoint_dict(run))
        for name in names:
            atomic_save(ckpt, run.path(name))
    D.barrier(run.env)


def _final(run: Run) -> dict:
    """Write ``last.pth`` and build the result dict (``macs``: mean MACs per test image, gates counted)."""
    _save(run, [LAST])
    st, m = run.state, run.state.metrics
    return {**{k: m.get(k) for k in ("top1", "top5", "loss", "active_ratio", "flops_reduction",
                                      "mean_macs", "dense_macs")},
            "macs": m.get("mean_macs"), "method": method_name(run.args),
            "widths": list(run.net.widths) if is_static(run.args) else None,
            "best_top1": st.best_top1, "epoch": st.epoch - 1, "epochs": run.args.epochs,
            "iteration": st.iteration, "L_prev": st.l_prev, "remain_rate": st.rate,
            "thresholds": [float(g.threshold) for g in run.gates], "skipped_steps": st.skipped,
            "train_loss": st.history[-1]["train_ce"] if st.history else None,
            "history": list(st.history), "checkpoint": run.path(LAST), "best_checkpoint": run.path(BEST),
            "resume_checkpoint": run.path(CHECKPOINT), "log": run.path(LOG), "save_path": run.args.save_path,
            "arch": model_arch(run.args), "dense": bool(run.args.dense), "dataset": run.data.info.as_dict(),
            "seed": run.args.manualSeed, "rank": run.env.rank, "world_size": run.env.world_size}


# ============================================================================ CLI

def main(argv=None) -> int:
    """``manidp-train``: exit 0 on success, 2 on bad input (one line on stderr), 1 when training diverged."""
    args = build_parser().parse_args(argv)  # exits 2, one line, on malformed flags
    try:
        result = train(args)
    except (UsageError, DatasetError) as e:
        print(f"manidp-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"manidp-train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("manidp-train: interrupted; resume with --resume", file=sys.stderr)
        return 130
    if result.get("rank", 0) == 0 and not args.quiet:
        print(f"done: top1 {result['top1']:.2f}%  MACs {result['macs'] / 1e6:.3f}M of "
              f"{result['dense_macs'] / 1e6:.3f}M dense  flops reduction {100 * result['flops_reduction']:.1f}%  "
              f"checkpoint {result['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
