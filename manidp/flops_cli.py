"""``manidp-flops``: FLOPs reduction, dense MACs and accuracy of a checkpoint over a dataset.

    manidp-flops --checkpoint runs/manidp/last.pth --dataset cifar10 --data_path DIR

Reads ``manidp-train`` checkpoints (architecture and dataset are recorded in
them) or raw state dicts (then ``--arch`` and ``--dataset`` are required).
MACs are counted per instance with the gates' actual active sets (DESIGN 1.5),
gates included; "FLOPs reduction" is ``1 - mean_i(dynamic_i) / dense``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from .data import DATASETS, DatasetError, build_dataset, eval_batches
from .models import build_model, load_dense_state_dict
from .train import CHECKPOINT_FORMAT, UsageError, evaluate, extract_state_dict

__all__ = ["main", "report", "load_model", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``manidp-flops`` argument parser."""
    p = argparse.ArgumentParser(prog="manidp-flops", description=__doc__.split("\n")[0])
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
    a("--device", default="cpu")
    a("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _read(path: str):
    """``torch.load`` a checkpoint safely, with a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path!r} does not exist") from None
    except Exception as e:  # truncated, foreign or unsafe file
        raise UsageError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from None


def load_model(path: str, arch: Optional[str] = None, num_classes: Optional[int] = None,
               in_channels: Optional[int] = None, squeeze_rate: int = 2):
    """The model in ``path`` and its checkpoint dict (``{}`` for a raw state dict)."""
    obj = _read(path)
    ours = isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT
    if ours:
        info, args = obj["dataset"], obj["args"]
        kw = {} if obj["dense"] else dict(squeeze_rate=args["squeeze_rate"], clamp_max=args["clamp_max"],
                                          thre_init=args["thre_init"])
        net = build_model(obj["arch"], num_classes=info["num_classes"], in_channels=info["in_channels"], **kw)
        net.load_state_dict(obj["state_dict"])
        return net, obj
    if not arch:
        raise UsageError(f"{path!r} is a raw state dict: give --arch (and --dataset)")
    kw = dict(squeeze_rate=squeeze_rate) if arch.startswith("dy") else {}
    try:
        net = build_model(arch, num_classes=num_classes or 10, in_channels=in_channels or 3, **kw)
        load_dense_state_dict(net, extract_state_dict(obj, path))
    except ValueError as e:
        raise UsageError(f"{path!r} does not fit {arch}: {e}") from None
    return net, {}


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
    obj = _read(opts.checkpoint)
    ckpt = obj if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT else {}
    data = _dataset_for(opts, ckpt)
    net, ckpt = load_model(opts.checkpoint, opts.arch, data.info.num_classes, data.info.in_channels,
                           opts.squeeze_rate)
    if net.fc.out_features != data.info.num_classes or net.conv1.in_channels != data.info.in_channels:
        raise UsageError(f"the model ({net.conv1.in_channels} input channels, {net.fc.out_features} classes) "
                         f"does not fit {data.info.name} ({data.info.in_channels}, {data.info.num_classes})")
    device = torch.device(opts.device)
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
    """``manidp-flops`` entry point: exit 0, or 2 with a message on bad input."""
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
