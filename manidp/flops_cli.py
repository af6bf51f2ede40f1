"""``manidp-flops``: FLOPs reduction, dense MACs and accuracy of a checkpoint over a dataset.

    manidp-flops --checkpoint runs/manidp/last.pth --dataset cifar10 --data_path DIR

Reads ``manidp-train`` checkpoints (architecture and dataset are recorded in
them) or raw state dicts (then ``--arch`` and ``--dataset`` are required).
MACs are counted per instance with the gates' actual active sets (docs/DESIGN.md 1.5),
gates included; "FLOPs reduction" is ``1 - mean_i(dynamic_i) / dense``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, extract_state_dict, rebuild_model
from .data import DATASETS, DatasetError, build_dataset, eval_batches
from .deploy.engine import FORMAT_NAME
from .train import OneLineArgumentParser, UsageError, check_device, evaluate, read_checkpoint_arg

__all__ = ["main", "report", "load_model", "build_parser", "check_args"]


def build_parser() -> argparse.ArgumentParser:
    """The ``manidp-flops`` argument parser."""
    p = OneLineArgumentParser(prog="manidp-flops", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--checkpoint", required=True, help="manidp-train checkpoint or a raw state dict")
    a("--dataset", default=None, choices=DATASETS, help="default: the checkpoint's dataset")
    a("--data_path", default=None, help="default: the checkpoint's --data_path")
    a("--arch", default=None, help="architecture, for raw state dicts")
    a("--squeeze_rate", type=int, default=2, help="gate reduction, for raw state dicts")
    a("--split", default="test", choices=("test", "train"))
    a("--test_subset", type=int, default=None, help="evaluate a fixed subset of M images")
    a("--image_size", type=int, default=None)
    a("--batch_size", type=int, default=256)
    a("--device", default="cpu", help="cpu, cuda or cuda:N")
    a("--json", action="store_true", help="print one JSON object instead of text")
    return p


def check_args(opts) -> torch.device:
    """Every option in range and the device present, before any file is read; returns the device."""
    for flag, value in (("--batch_size", opts.batch_size), ("--test_subset", opts.test_subset),
                        ("--image_size", opts.image_size), ("--squeeze_rate", opts.squeeze_rate)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{flag} must be an integer >= 1; got {value!r}")
    return check_device(str(opts.device))


def _read(path: str) -> dict:
    """The checkpoint dictionary in ``path``; UsageError for a missing, unreadable or engine file."""
    obj = read_checkpoint_arg(path, "--checkpoint")
    if obj.get("format") == FORMAT_NAME:
        raise UsageError(f"--checkpoint: {path!r} is a compiled DynamicResNet engine file; manidp-flops reads "
                         "manidp-train checkpoints (an engine reports its own MACs: engine(x, return_stats=True))")
    return obj


def _ours(obj: dict) -> bool:
    """Whether ``obj`` is a ``manidp-train`` checkpoint (it records architecture and dataset)."""
    return obj.get("format") == CHECKPOINT_FORMAT


def load_model(path: str, arch: Optional[str] = None, num_classes: Optional[int] = None,
               in_channels: Optional[int] = None, squeeze_rate: int = 2):
    """The model in ``path`` and its checkpoint dict (``{}`` for a raw state dict)."""
    return _model_of(_read(path), path, arch, num_classes, in_channels, squeeze_rate)


def _model_of(obj: dict, path: str, arch: Optional[str], num_classes: Optional[int],
              in_channels: Optional[int], squeeze_rate: int):
    """:func:`load_model` on an already read checkpoint dictionary."""
    if not _ours(obj) and not arch:
        raise UsageError(f"{path!r} is a raw state dict: give --arch (and --dataset)")
    try:
        if _ours(obj):
            return rebuild_model(obj, path), obj
        ckpt = {"arch": arch, "state_dict": extract_state_dict(obj, path), "num_classes": num_classes or 10,
                "in_channels": in_channels or 3, "args": {"squeeze_rate": squeeze_rate}}
        return rebuild_model(ckpt, path), {}
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def _dataset_for(opts, ckpt: dict):
    """Build the dataset named by the flags, falling back on what the checkpoint recorded."""
    name = opts.dataset or ckpt.get("dataset", {}).get("name")
    if not name:
        raise UsageError("give --dataset (the checkpoint does not record one)")
    path = opts.data_path or ckpt.get("args", {}).get("data_path")
    size = opts.image_size or ckpt.get("args", {}).get("image_size")
    test_subset = opts.test_subset
    train_subset = None
    if name == "synthetic":  # its sizes define the (generated) data: reuse the checkpoint's
        train_subset = ckpt.get("args", {}).get("train_subset")
        test_subset = test_subset or ckpt.get("args", {}).get("test_subset")
    return build_dataset(name, path, train_subset, test_subset, size, augment=False)


def report(checkpoint: str, dataset: Optional[str] = None, data_path: Optional[str] = None, **kw) -> dict:
    """Evaluate ``checkpoint``: top-1/top-5, dense and mean dynamic MACs, FLOPs reduction."""
    opts = build_parser().parse_args(["--checkpoint", checkpoint])
    opts.dataset, opts.data_path = dataset, data_path
    for k, v in kw.items():
        setattr(opts, k, v)
    return _report(opts)


def _report(opts) -> dict:
    """:func:`report` on a parsed namespace."""
    device = check_args(opts)
    obj = _read(opts.checkpoint)
    data = _dataset_for(opts, obj if _ours(obj) else {})
    net, ckpt = _model_of(obj, opts.checkpoint, opts.arch, data.info.num_classes, data.info.in_channels,
                          opts.squeeze_rate)
    if net.fc.out_features != data.info.num_classes or net.conv1.in_channels != data.info.in_channels:
        raise UsageError(f"the model ({net.conv1.in_channels} input channels, {net.fc.out_features} classes) "
                         f"does not fit {data.info.name} ({data.info.in_channels}, {data.info.num_classes})")
    net.to(device)
    ds = data.test if opts.split == "test" else data.train_eval
    m = evaluate(net, eval_batches(ds, opts.batch_size), device=device)
    return {"checkpoint": opts.checkpoint, "arch": ckpt.get("arch", opts.arch), "dataset": data.info.name,
            "split": opts.split, "images": m["n"], "top1": m["top1"], "top5": m["top5"],
            "dense_macs": m["dense_macs"], "mean_macs": m["mean_macs"],
            "flops_reduction": m["flops_reduction"], "active_ratio": m["active_ratio"]}


def _text(r: dict) -> str:
    """Human-readable report."""
    return "\n".join([
        f"checkpoint       {r['checkpoint']} ({r['arch']})",
        f"dataset          {r['dataset']} {r['split']}, {r['images']} images",
        f"top-1 / top-5    {r['top1']:.2f}% / {r['top5']:.2f}%",
        f"dense MACs       {r['dense_macs'] / 1e6:.3f} M per image",
        f"dynamic MACs     {r['mean_macs'] / 1e6:.3f} M per image (mean, gates counted)",
        f"FLOPs reduction  {100 * r['flops_reduction']:.2f}%",
        f"active channels  {100 * r['active_ratio']:.2f}%",
    ])


def main(argv=None) -> int:
    """``manidp-flops`` entry point: exit 0, or 2 with a one-line message on bad input."""
    opts = build_parser().parse_args(argv)
    try:
        r = _report(opts)
    except (UsageError, DatasetError) as e:
        print(f"manidp-flops: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if opts.json else _text(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
