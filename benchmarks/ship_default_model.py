"""Compile a ManiDP checkpoint into the built-in default model (manidp/assets/).

Evaluates the compiled engine on the whole Fashion-MNIST test split (accuracy
and FLOPs reduction with gates counted, as the engine reports them) and writes
``default_model.pt`` plus ``default_model.json`` (metrics and provenance).

    python benchmarks/ship_default_model.py RUN_DIR/last.pth --recipe "<command that trained it>"
"""

import argparse
import json
import os
import sys
import time

import torch

from manidp.bench.frontier import engine_accuracy
from manidp.checkpoint import read_checkpoint
from manidp.data import build_dataset
from manidp.deploy import compile
from manidp.pretrained import DEFAULT_MODEL_INFO, DEFAULT_MODEL_PATH


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--recipe", required=True, help="how the checkpoint was trained (recorded)")
    args = p.parse_args(argv)
    engine = compile(args.checkpoint)
    ckpt = read_checkpoint(args.checkpoint)
    m = engine_accuracy(engine, build_dataset("fashion-mnist").test, 256)
    metrics = {"test_top1": m["engine_top1"], "test_images": m["engine_images"],
               "flops_reduction": 1.0 - m["engine_mac_fraction"],
               "mean_macs": m["engine_mac_fraction"] * engine.dense_macs, "dense_macs": engine.dense_macs}
    engine.save(DEFAULT_MODEL_PATH)
    info = {"arch": engine.config["arch"], "dataset": "fashion-mnist", **metrics,
            "training_args": {k: v for k, v in ckpt["args"].items() if isinstance(v, (int, float, str, bool))},
            "recipe": args.recipe, "shipped_by": " ".join(["python"] + sys.argv),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "file_bytes": os.path.getsize(DEFAULT_MODEL_PATH)}
    with open(DEFAULT_MODEL_INFO, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
