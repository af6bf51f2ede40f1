"""The README says true things: its example prints what it claims, its commands and paths exist."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, subprocess_env

README = os.path.join(ROOT, "README.md")
BATCH = 8  # the example's batch of raw images

# Appended to the example: hands its tensors to the test, which recomputes what it printed.
DUMP = """
import os as _os
torch.save({"images": images, "x": x, "logits": logits, "stats": stats, "config": engine.config,
            "dense_macs": engine.dense_macs}, _os.environ["README_EXAMPLE_DUMP"])
"""


def _readme() -> str:
    with open(README) as f:
        return f.read()


def _section(title: str) -> str:
    """The body of the ``## title`` section (up to the next ``## `` heading)."""
    text = _readme()
    assert f"\n## {title}\n" in text, f"README has no '## {title}' section"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _code_blocks(body: str, lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


# ----------------------------------------------------------------------------- the Deploy example

@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Run the README's Deploy example in a fresh interpreter: (stdout, the tensors it made)."""
    blocks = _code_blocks(_section("Deploy"), "python")
    assert blocks, "README section 'Deploy' has no python example"
    dump = str(tmp_path_factory.mktemp("readme") / "example.pt")
    proc = subprocess.run([sys.executable, "-c", blocks[0] + DUMP], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=subprocess_env(README_EXAMPLE_DUMP=dump))
    assert proc.returncode == 0, f"the README example failed:\n{proc.stderr[-3000:]}"
    return proc.stdout, torch.load(dump, weights_only=True)


def _printed(stdout: str):
    """The example's three printed values: argmax ids, MAC fractions, active-count shape."""
    tensors = re.findall(r"tensor\(\[(.*?)\]", stdout, flags=re.S)
    shapes = re.findall(r"torch\.Size\(\[(.*?)\]\)", stdout)
    assert len(tensors) == 2 and len(shapes) == 1, f"unexpected example output:\n{stdout}"
    number = r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?"
    ids = [int(v) for v in re.findall(number, tensors[0])]
    fractions = [float(v) for v in re.findall(number, tensors[1])]
    shape = tuple(int(v) for v in re.findall(r"\d+", shapes[0]))
    return ids, fractions, shape


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _macs(config: dict, hidden, size, active=None) -> int:
    """MACs of one image, written out here from the definition (docs/DESIGN.md 1.5), not from manidp.

    ``active`` holds the (conv1, conv2) active counts per block; ``None`` is the dense network
    (every channel, no gates).  ``hidden`` holds each block's (gate1, gate2) hidden widths.
    """
    stem = config["stem"]
    c0 = config["blocks"][0]["in_channels"]
    h, w = (_conv_out(s, stem["kernel"], stem["stride"], stem["padding"]) for s in size)
    total = config["in_channels"] * c0 * stem["kernel"] ** 2 * h * w
    if stem["maxpool"]:
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    for i, blk in enumerate(config["blocks"]):
        cin, c, stride = blk["in_channels"], blk["planes"], blk["stride"]
        a1, a2 = (c, c) if active is None else active[i]
        ho, wo = _conv_out(h, 3, stride, 1), _conv_out(w, 3, stride, 1)
        total += cin * a1 * 9 * ho * wo + a1 * a2 * 9 * ho * wo
        if blk["shortcut"]:
            total += cin * c * ho * wo
        if active is not None:
            h1, h2 = hidden[i]
            total += cin * h * w + cin * h1 + h1 * c      # gate1: pool the block input, fc1, fc2
            total += a1 * ho * wo + c * h2 + h2 * c       # gate2: pool the compact conv1 output, fc1, fc2
        h, w = ho, wo
    return total + config["blocks"][-1]["planes"] * config["num_classes"]


def _gate_hidden_widths():
    from manidp.pretrained import DEFAULT_MODEL_PATH
    tensors = torch.load(DEFAULT_MODEL_PATH, weights_only=True)["tensors"]
    n = sum(1 for k in tensors if k.endswith(".gate1.fc1"))
    return [(tensors[f"blocks.{i}.gate1.fc1"].shape[0], tensors[f"blocks.{i}.gate2.fc1"].shape[0]) for i in range(n)]


def test_example_input_is_the_preprocessed_images(example):
    _, d = example
    images, x, config = d["images"], d["x"], d["config"]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (BATCH, 28, 28)
    assert tuple(x.shape) == (BATCH, 1, 32, 32) and x.dtype == torch.float32
    spec = config["preprocess"]
    border = -spec["mean"][0] / spec["std"][0]   # padded with raw 0 before normalising
    edge = torch.cat([x[:, 0, :2].flatten(), x[:, 0, -2:].flatten(), x[:, 0, :, :2].flatten(),
                      x[:, 0, :, -2:].flatten()])
    assert torch.allclose(edge, torch.full_like(edge, border), atol=1e-6)
    inner = (images.float() / spec["scale"] - spec["mean"][0]) / spec["std"][0]
    assert torch.allclose(x[:, 0, 2:-2, 2:-2], inner, atol=1e-6)


def test_example_prints_class_ids(example):
    stdout, d = example
    ids, _, _ = _printed(stdout)
    assert len(ids) == BATCH
    assert d["config"]["num_classes"] == 10
    assert all(0 <= i < 10 for i in ids)
    assert ids == d["logits"].argmax(1).tolist()


def test_example_prints_mac_fractions(example):
    stdout, d = example
    _, fractions, _ = _printed(stdout)
    config, stats = d["config"], d["stats"]
    assert len(fractions) == BATCH and all(0.0 < f <= 1.0 for f in fractions)
    hidden = _gate_hidden_widths()
    size = tuple(d["x"].shape[2:])
    dense = _macs(config, hidden, size)
    assert d["dense_macs"] == dense
    active = stats["active"].long().tolist()
    per_image = [_macs(config, hidden, size, list(zip(row[0::2], row[1::2]))) for row in active]
    assert stats["macs"].tolist() == [float(m) for m in per_image]
    want = [m / dense for m in per_image]
    # torch prints 4 decimals
    assert fractions == pytest.approx(want, abs=6e-5)
    assert all(f < 1.0 for f in want)  # every image of the built-in model closes some channels


def test_example_prints_active_shape(example):
    stdout, d = example
    _, _, shape = _printed(stdout)
    config = d["config"]
    assert config["arch"] == "dyresnet20" and len(config["blocks"]) == 9
    assert shape == (BATCH, 2 * len(config["blocks"])) == (BATCH, 18)
    assert tuple(d["stats"]["active"].shape) == shape
    planes = torch.tensor([b["planes"] for b in config["blocks"] for _ in (0, 1)])
    assert ((d["stats"]["active"] >= 0) & (d["stats"]["active"] <= planes)).all()


# ----------------------------------------------------------------------------- commands

def _shell_lines(block: str):
    return [ln.split("#", 1)[0].strip() for ln in block.splitlines() if ln.split("#", 1)[0].strip()]


def _dev_sh_arms() -> dict:
    """``case`` arm name -> its command, from dev.sh."""
    with open(os.path.join(ROOT, "dev.sh")) as f:
        text = f.read()
    body = text.split('case "$cmd" in', 1)[1].split("esac", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*(\w+)\)\s*(.*?);;", body, flags=re.M)}


def test_setup_commands_are_what_dev_sh_and_ci_run():
    quick = _section("Quick start: two commands on a fresh machine")
    assert _shell_lines(_code_blocks(quick, "shell")[0]) == ["./dev.sh bench", "./dev.sh test"]
    arms = _dev_sh_arms()
    assert "manidp-bench" in arms["bench"]
    assert re.search(r"-m pytest tests\b", arms["test"])
    with open(os.path.join(ROOT, "dev.sh")) as f:
        script = f.read()
    before_case = script.split('case "$cmd" in', 1)[0]
    assert re.search(r"^setup_data$", before_case, flags=re.M) and re.search(r"^setup_python$", before_case,
                                                                            flags=re.M)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = _shell_lines(f.read())
    assert ci[-1] == "./dev.sh test"
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = _shell_lines(f.read())
    for pin in re.findall(r"`((?:torch|torchvision)==[\d.]+)`", quick):
        assert pin in pins


def _train_commands(block: str):
    """The argument strings of every ``manidp-train`` / ``-m manidp.train`` command in a shell block."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [m.group(1) for m in re.finditer(r"(?:manidp-train|-m manidp\.train)\b(.*)", joined)]


def test_readme_training_flags_exist():
    from manidp.train import build_parser
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    commands = [c for block in _code_blocks(_section("Training"), "shell") for c in _train_commands(block)]
    assert len(commands) >= 4
    used = {flag for c in commands for flag in re.findall(r"(?<![\w-])(--[a-z_]+)", c)}
    unknown = sorted(used - known)
    assert not unknown, f"README trains with flags manidp-train does not take: {unknown}"
    # the original code's example flags, which manidp-train keeps with their meanings
    assert {"--arch", "--dataset", "--pretrain_path", "--target_remain_rate", "--lambda_lasso",
            "--lambda_graph", "--data_path", "--ngpu"} <= used


# ----------------------------------------------------------------------------- paths

def _top_level() -> set:
    return set(os.listdir(ROOT)) - {".git", ".venv"}


def test_every_repository_path_in_the_readme_exists():
    text = _readme()
    top = _top_level()
    named = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,;:")
        first = token.split("/", 1)[0]
        if first in top and ("/" in token or "." in token):
            named.add(token)
    named.update(re.findall(r"\(((?:docs|benchmarks|manidp)/[^)\s]+)\)", text))  # Markdown links
    assert "docs/DESIGN.md" in named
    missing = [p for p in sorted(named) if not glob.glob(os.path.join(ROOT, p))]
    assert not missing, f"README names paths that do not exist: {missing}"


def test_layout_section_matches_the_tree():
    body = _section("Layout")
    entries = re.findall(r"^\s{4}(\S+/)\s+(.*(?:\n\s{18,}.*)*)", body, flags=re.M)
    assert entries, "no layout entries found"
    for directory, description in entries:
        assert os.path.isdir(os.path.join(ROOT, directory)), f"layout names {directory}, which does not exist"
        for name in re.findall(r"[\w/]+\.(?:py|json|cpp|cu|md)\b|[\w]+/(?=[\s,):])", description):
            assert glob.glob(os.path.join(ROOT, directory, name)), f"layout names {directory}{name}, which does not exist"
