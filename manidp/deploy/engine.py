"""DynamicResNet: the compiled, deployable form of a gated ResNet (docs/DESIGN.md 3.1-3.2).

The engine holds BN-folded conv weights, gate weights and thresholds.  It runs
the dense stem and classifier itself and every gated block through a backend
(``reference``, ``cpu``, ``triton``, ``cuda``; see :mod:`manidp.deploy.backends`),
which it resolves in its constructor for its device and compute dtype.  Only
the ``reference`` backend is differentiable; the others run without autograd
(inference only, docs/DESIGN.md 7.1).

Files (docs/DESIGN.md 6.1) are written with :meth:`DynamicResNet.save` and read
with :meth:`DynamicResNet.load` through :mod:`manidp.checkpoint`; the format is a
``torch.save`` of plain tensors, strings and numbers, loaded with
``weights_only=True`` so that loading can never run code from the file.  Loading
is bounded (record sizes, header size, every tensor's shape checked against the
config before any op reads it) and verified (a sha256 digest in the config).
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import nullcontext
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, ReadLimits, atomic_save, check_dense_tensor, read_checkpoint, tensor_digest
from ..flops import block_macs_from_dims, stem_macs_from_dims
from ..preprocess import check_spec, raw_to_input
from .backends import Backend, BackendUnavailable, get_backend
from .folding import model_config, model_tensors

__all__ = ["DynamicResNet", "EngineFormatError", "read_engine_file", "validate_config", "engine_digest", "FORMAT_NAME",
           "FORMAT_VERSION"]

FORMAT_NAME = "manidp.DynamicResNet"
FORMAT_VERSION = 1
DIGEST_KEY = "sha256"
_FLOAT_INPUTS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DEVICE_TYPES = ("cpu", "cuda")
# An engine file's header (config text and tensor records) is tens of KiB even for ResNet-110;
# its tensors own their storages, so together they fit in the file.
ENGINE_LIMITS = ReadLimits(max_header_bytes=1 << 20, tensor_bytes_ratio=1.0, allow_legacy=False)
_NO_DIGEST = object()


class EngineFormatError(CheckpointError):
    """A file is not a (readable, intact) DynamicResNet file."""


class _Params(nn.Module):
    """A bag of named tensors kept as buffers (they move with ``.to``)."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


class EngineGate(_Params):
    """Gate tensors: ``fc1`` (hidden, Cin), ``fc2`` (C, hidden), ``fc2_bias`` (C,), ``threshold`` ()."""

    def __init__(self, tensors: Dict[str, torch.Tensor], clamp_max: float):
        super().__init__(tensors)
        self.clamp_max = float(clamp_max)

    @property
    def hidden(self) -> int:
        return self.fc1.shape[0]


class EngineBlock(nn.Module):
    """Folded tensors of one gated basic block: ``conv1``, ``conv2``, optional ``shortcut``, gates."""

    def __init__(self, cfg: dict, tensors: Dict[str, torch.Tensor], clamp_max: float):
        super().__init__()
        self.in_channels, self.planes = cfg["in_channels"], cfg["planes"]
        self.stride, self.has_shortcut = cfg["stride"], cfg["shortcut"]
        for part in ("conv1", "conv2", "shortcut"):
            if part != "shortcut" or self.has_shortcut:
                setattr(self, part, _Params({"weight": tensors[f"{part}.weight"], "bias": tensors[f"{part}.bias"]}))
        for part in ("gate1", "gate2"):
            sub = {k: tensors[f"{part}.{k}"] for k in ("fc1", "fc2", "fc2_bias", "threshold")}
            setattr(self, part, EngineGate(sub, clamp_max))
        self.cache: dict = {}  # backend-private layouts, rebuilt by Backend.prepare

    def macs(self, h: int, w: int, cnt1=None, cnt2=None):
        """Per-instance MACs (same formula as :mod:`manidp.flops`) and the output size."""
        return block_macs_from_dims(self.in_channels, self.planes, self.stride, self.has_shortcut, h, w,
                                    cnt1, cnt2, (self.gate1.hidden, self.gate2.hidden))


# ---------------------------------------------------------------- config and tensor validation
def _int_field(d: dict, key: str, label: str, lo: int, hi: Optional[int] = None) -> int:
    """``d[key]`` as an int in ``lo..hi``; ValueError naming the field and its range otherwise."""
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        allowed = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
        got = "it is missing" if key not in d else f"got {v!r:.60}"
        raise ValueError(f"config {label} must be {allowed}; {got}")
    return v


def _finite_number(v) -> bool:
    """An int or float (not a bool) that converts to a finite float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False


def _bool_field(d: dict, key: str, label: str) -> bool:
    v = d.get(key)
    if not isinstance(v, bool):
        raise ValueError(f"config {label} must be true or false; got {v!r:.60}")
    return v


def _dict_field(d: dict, key: str, label: str) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise ValueError(f"config {label} must be an object; got {type(v).__name__}")
    return v


def _check_stem(stem: dict) -> None:
    kernel = _int_field(stem, "kernel", "stem.kernel", 1, 15)
    _int_field(stem, "stride", "stem.stride", 1, 4)
    _int_field(stem, "padding", "stem.padding", 0, kernel)
    _bool_field(stem, "maxpool", "stem.maxpool")


def _check_blocks(blocks) -> None:
    """Block fields in range, consecutive blocks chained, a shortcut wherever the shape changes."""
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"config blocks must be a non-empty list; got {blocks!r:.60}")
    prev = None
    for i, b in enumerate(blocks):
        if not isinstance(b, dict):
            raise ValueError(f"config blocks[{i}] must be an object; got {type(b).__name__}")
        cin = _int_field(b, "in_channels", f"blocks[{i}].in_channels", 1)
        planes = _int_field(b, "planes", f"blocks[{i}].planes", 1)
        stride = b.get("stride")
        if isinstance(stride, bool) or stride not in (1, 2):
            raise ValueError(f"config blocks[{i}].stride must be 1 or 2; got {stride!r:.60}")
        shortcut = _bool_field(b, "shortcut", f"blocks[{i}].shortcut")
        if prev is not None and cin != prev:
            raise ValueError(f"config blocks[{i}].in_channels is {cin}, but the block before it outputs "
                             f"{prev} channels")
        if (stride != 1 or cin != planes) and not shortcut:
            raise ValueError(f"config blocks[{i}] changes shape ({cin}->{planes} channels, stride {stride}) "
                             "and so needs shortcut: true")
        prev = planes


def _check_optional_fields(cfg: dict) -> None:
    """``arch``, ``preprocess`` and ``input_size``, when present."""
    if "arch" in cfg and not isinstance(cfg["arch"], str):
        raise ValueError(f"config arch must be a string; got {cfg['arch']!r}")
    if cfg.get("preprocess") is not None:
        try:
            check_spec(cfg["preprocess"], cfg["in_channels"])
        except ValueError as e:
            raise ValueError(f"config preprocess: {e}") from None
    size = cfg.get("input_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2
                             or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise ValueError(f"config input_size must be [H, W], two integers >= 1; got {size!r:.60}")


def validate_config(cfg) -> None:
    """ValueError naming the field and its allowed range unless ``cfg`` describes a runnable engine.

    ``kind`` cifar|imagenet; ``num_classes``, ``in_channels`` >= 1; ``stem``: kernel 1..15,
    stride 1..4, padding 0..kernel, maxpool bool; ``clamp_max`` finite > 0; ``blocks``: channel
    counts >= 1 chained block to block, stride 1|2, shortcut bool and present where the shape
    changes; optional ``preprocess`` (:func:`manidp.preprocess.check_spec`) and ``input_size``.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"config must be a JSON object; got {type(cfg).__name__}")
    if cfg.get("kind") not in ("cifar", "imagenet"):
        raise ValueError(f"config kind must be 'cifar' or 'imagenet'; got {cfg.get('kind')!r:.60}")
    _int_field(cfg, "num_classes", "num_classes", 1)
    _int_field(cfg, "in_channels", "in_channels", 1)
    _check_stem(_dict_field(cfg, "stem", "stem"))
    clamp = cfg.get("clamp_max")
    if not _finite_number(clamp) or clamp <= 0:
        raise ValueError(f"config clamp_max must be a finite number > 0; got {clamp!r:.60}")
    _check_blocks(cfg.get("blocks"))
    _check_optional_fields(cfg)


def _expected_tensors(cfg: dict) -> Dict[str, Tuple[Optional[int], ...]]:
    """Names and shapes every engine of a validated ``cfg`` holds; ``None`` marks a gate's hidden size."""
    cin, k = cfg["in_channels"], cfg["stem"]["kernel"]
    c0 = cfg["blocks"][0]["in_channels"]
    shapes = {"stem.weight": (c0, cin, k, k), "stem.bias": (c0,)}
    for i, b in enumerate(cfg["blocks"]):
        p, ci, pl = f"blocks.{i}", b["in_channels"], b["planes"]
        shapes.update({f"{p}.conv1.weight": (pl, ci, 3, 3), f"{p}.conv1.bias": (pl,),
                       f"{p}.conv2.weight": (pl, pl, 3, 3), f"{p}.conv2.bias": (pl,)})
        if b["shortcut"]:
            shapes.update({f"{p}.shortcut.weight": (pl, ci, 1, 1), f"{p}.shortcut.bias": (pl,)})
        for gname, gin in (("gate1", ci), ("gate2", pl)):
            shapes.update({f"{p}.{gname}.fc1": (None, gin), f"{p}.{gname}.fc2": (pl, None),
                           f"{p}.{gname}.fc2_bias": (pl,), f"{p}.{gname}.threshold": ()})
    last = cfg["blocks"][-1]["planes"]
    shapes.update({"fc.weight": (cfg["num_classes"], last), "fc.bias": (cfg["num_classes"],)})
    return shapes


def _check_tensor(name: str, t, shape: Tuple[Optional[int], ...], from_file: bool) -> None:
    """Type, layout and shape of one tensor; reads no tensor data."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"engine tensor {name!r} is not a floating-point tensor")
    if from_file:
        if t.dtype != torch.float32:
            raise ValueError(f"engine tensor {name!r} has dtype {t.dtype}; engine files hold float32 tensors")
        check_dense_tensor(name, t, "engine file")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = tuple("hidden" if s is None else s for s in shape)
        raise ValueError(f"engine tensor {name!r} has shape {tuple(t.shape)}, expected {want}")


def _check_gate_hidden(cfg: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Each gate's hidden size: the same in fc1 and fc2, and in 1..C (C // r with r >= 1, docs/DESIGN.md 1.1)."""
    for i, b in enumerate(cfg["blocks"]):
        for gname in ("gate1", "gate2"):
            p = f"blocks.{i}.{gname}"
            h1, h2 = tensors[f"{p}.fc1"].shape[0], tensors[f"{p}.fc2"].shape[1]
            if h1 != h2 or not 1 <= h1 <= b["planes"]:
                raise ValueError(f"engine gate {p} has hidden size {h1} (fc1) / {h2} (fc2); expected one size "
                                 f"in 1..{b['planes']} (the gate's channel count divided by its reduction)")


def _check_structure(cfg, tensors, from_file: bool = False) -> None:
    """Config fields, tensor names, types, layouts and shapes; ValueError naming what is wrong.

    Reads no tensor data, so a crafted file is refused before any op touches (or
    materialises) its tensors.  ``from_file`` adds the file format's rules: float32
    tensors, each a plain contiguous tensor owning exactly its storage.
    """
    validate_config(cfg)
    if not isinstance(tensors, dict):
        raise ValueError(f"engine tensors must be a dictionary; got {type(tensors).__name__}")
    expected = _expected_tensors(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"engine lacks tensors {missing[:5]}")
    unexpected = sorted(str(k) for k in set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"engine holds tensors its config does not describe: {unexpected[:5]}")
    for name, shape in expected.items():
        _check_tensor(name, tensors[name], shape, from_file)
    _check_gate_hidden(cfg, tensors)


def _check_finite(tensors: Dict[str, torch.Tensor]) -> None:
    """Every value finite (thresholds may be +-inf: a gate always closed or always open)."""
    for name, t in tensors.items():
        if not name.endswith("threshold") and not bool(torch.isfinite(t).all()):
            raise ValueError(f"engine tensor {name!r} holds non-finite values")


def _validate(cfg, tensors) -> None:
    """:func:`_check_structure` then :func:`_check_finite`, as EngineFormatError."""
    try:
        _check_structure(cfg, tensors)
        _check_finite(tensors)
    except ValueError as e:
        raise EngineFormatError(str(e)) from None


def _canonical_config(cfg: dict) -> str:
    """The config as the digest sees it: sorted keys, no whitespace, without the digest itself."""
    return json.dumps({k: v for k, v in cfg.items() if k != DIGEST_KEY}, sort_keys=True, separators=(",", ":"))


def engine_digest(cfg: dict, tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 of the format name and version, the canonical config and every tensor (name, dtype, shape, bytes)."""
    return tensor_digest(tensors, f"{FORMAT_NAME}/{FORMAT_VERSION}\0{_canonical_config(cfg)}")


class DynamicResNet(nn.Module):
    """A compiled gated ResNet whose blocks compute only the channels their gates keep.

    Use :func:`manidp.deploy.compile` to build one, or :meth:`load` to read a file.
    ``engine(x)`` returns logits; ``engine(x, return_stats=True)`` returns
    ``(logits, stats)`` with ``stats["macs"]`` (N,) MACs each instance spent and
    ``stats["active"]`` (N, num_gates) active channel counts per gate.
    """

    def __init__(self, config: dict, tensors: Dict[str, torch.Tensor], backend: str = "auto",
                 device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
        """Validate ``tensors`` against ``config``, place them on ``device`` and resolve ``backend`` there.

        ``dtype`` is the compute dtype of convs and classifier (default fp32);
        ``backend="auto"`` picks the fastest backend that runs on ``device`` with ``dtype``.
        """
        super().__init__()
        config = {k: v for k, v in config.items() if k != DIGEST_KEY} if isinstance(config, dict) else config
        _validate(config, tensors)
        device, dtype = _placement(device), _compute_dtype(dtype)
        resolved = get_backend(backend, device, dtype)  # refuse before anything is built or copied
        self.config = config
        self.stem = _Params({"weight": tensors["stem.weight"], "bias": tensors["stem.bias"]})
        self.blocks = nn.ModuleList(
            EngineBlock(b, {k[len(f"blocks.{i}."):]: v for k, v in tensors.items() if k.startswith(f"blocks.{i}.")},
                        config["clamp_max"])
            for i, b in enumerate(config["blocks"]))
        self.fc = _Params({"weight": tensors["fc.weight"], "bias": tensors["fc.bias"]})
        self._place(resolved, backend, device, dtype)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: nn.Module, backend: str = "auto", preprocess: Optional[dict] = None,
                   device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                   input_size: Optional[Tuple[int, int]] = None) -> "DynamicResNet":
        """Compile a gated :mod:`manidp.models` network (its eval-mode behaviour).

        ``preprocess`` and ``input_size`` (optional) are recorded in the config.
        """
        cfg = model_config(model)
        if preprocess is not None:
            cfg["preprocess"] = dict(preprocess)
        if input_size:
            cfg["input_size"] = [int(v) for v in input_size]
        return cls(cfg, model_tensors(model), backend, device, dtype)

    def _place(self, backend: Backend, name: str, device: torch.device, dtype: torch.dtype) -> None:
        """Move the tensors to ``device``, set the compute dtype and let ``backend`` prepare its layouts.

        All or nothing: the tensors are copied before any is swapped in, and if the
        copy or ``backend.prepare`` fails, tensors, dtype, backend and the blocks'
        caches are put back as they were.
        """
        saved = self._placement_state()
        try:
            moved = [(mod, key, t.to(device)) for mod, key, t in saved["buffers"]]
            for mod, key, t in moved:
                mod._buffers[key] = t
            self.compute_dtype, self._backend_name = dtype, name
            self.backend: Backend = backend
            backend.prepare(self)
        except BaseException:
            self._restore_placement(saved)
            raise

    def _placement_state(self) -> dict:
        """What :meth:`_place` changes: buffers, compute dtype, backend (and its name), block caches."""
        return {"buffers": [(mod, key, t) for mod in self.modules() for key, t in mod._buffers.items()
                            if t is not None],
                "attrs": {a: self.__dict__[a] for a in ("compute_dtype", "_backend_name", "backend")
                          if a in self.__dict__},
                "caches": [dict(blk.cache) for blk in self.blocks]}

    def _restore_placement(self, saved: dict) -> None:
        for mod, key, t in saved["buffers"]:
            mod._buffers[key] = t
        self.__dict__.update(saved["attrs"])
        for blk, cache in zip(self.blocks, saved["caches"]):
            blk.cache = cache

    @property
    def device(self) -> torch.device:
        return self.stem.weight.device

    @property
    def num_gates(self) -> int:
        return 2 * len(self.blocks)

    def set_backend(self, name: str) -> "DynamicResNet":
        """Switch to backend ``name`` ("auto" picks the fastest available here)."""
        resolved = get_backend(name, self.device, self.compute_dtype)
        self._place(resolved, name, self.device, self.compute_dtype)
        return self

    def to(self, *args, **kwargs) -> "DynamicResNet":
        """Move to a device and/or set the compute dtype of convs and classifier.

        Transactional: the device, dtype and backend are checked before anything
        moves, and a failure while moving or preparing the backend leaves the engine
        exactly as it was.  Gates always run in fp32 so that thresholds compare
        exactly as in training.
        """
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        device = self.device if device is None else _placement(device)
        dtype = self.compute_dtype if dtype is None else _compute_dtype(dtype)
        self._place(get_backend(self._backend_name, device, dtype), self._backend_name, device, dtype)
        return self

    def cuda(self, device=None) -> "DynamicResNet":
        return self.to(torch.device("cuda", device) if device is not None else "cuda")

    def cpu(self) -> "DynamicResNet":
        return self.to("cpu")

    def half(self) -> "DynamicResNet":
        return self.to(dtype=torch.float16)

    def float(self) -> "DynamicResNet":
        return self.to(dtype=torch.float32)

    # ---------------------------------------------------------------- running
    def check_input(self, x) -> None:
        """Raise TypeError/ValueError naming what was expected if ``x`` is not a valid batch."""
        cin, device = self.config["in_channels"], self.device

        def want() -> str:  # formatted only on error: it costs more than the checks (batch-1 calls)
            return f"a float tensor of shape (N, {cin}, H, W) with dtype {self.compute_dtype} on {device}"

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected {want()}; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected {want()}; got dtype {x.dtype} (integer images: use engine.preprocess)")
        if x.dim() != 4 or x.shape[1] != cin:
            raise ValueError(f"expected {want()}; got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"expected {want()} with N >= 1; got an empty batch")
        if x.device != device:
            raise ValueError(f"expected {want()}; got a tensor on {x.device}")
        if x.dtype != self.compute_dtype:
            raise TypeError(f"expected {want()}; got dtype {x.dtype}")
        min_size = 1 if self.config["kind"] == "cifar" else 2
        if min(x.shape[2:]) < min_size:
            raise ValueError(f"expected {want()} with H, W >= {min_size}; got shape {tuple(x.shape)}")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config["stem"]
        x = self.backend.prepare_stem_input(x)
        w, b = self.stem.weight.to(x.dtype), self.stem.bias.to(x.dtype)
        x = F.conv2d(x, w, b, stride=s["stride"], padding=s["padding"])
        if s["maxpool"]:
            # max-pool then ReLU equals ReLU then max-pool (ReLU is monotonic), and the ReLU
            # then touches a 4x smaller map.
            x = F.max_pool2d(x, 3, 2, 1)
        return F.relu(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.float().mean(dim=(2, 3))
        return pooled @ self.fc.weight.float().t() + self.fc.bias.float()

    @property
    def differentiable(self) -> bool:
        """Whether gradients flow through this engine: only with a differentiable backend (``reference``)."""
        return bool(self.backend.differentiable)

    def forward(self, x: torch.Tensor, return_stats: bool = False):
        """Logits (and, with ``return_stats``, per-instance MACs and active counts) for the batch ``x``.

        Backends without autograd support (every one but ``reference``) run under
        ``torch.no_grad()``: their outputs do not require grad, rather than carrying a
        ``grad_fn`` that would silently give no gradient (inference only).
        """
        self.check_input(x)
        with nullcontext() if self.differentiable else torch.no_grad():
            return self._forward(x, return_stats)

    def _forward(self, x: torch.Tensor, return_stats: bool):
        whole = self.backend.network(self, x)
        logits, active = whole if whole is not None else self._forward_blocks(x)
        if not return_stats:
            return logits
        return logits, {"macs": self._instance_macs(active, tuple(x.shape[2:])), "active": active}

    def _forward_blocks(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stem, one backend call per block, classifier: logits and the (N, 2 * blocks) active counts."""
        h = self.backend.prepare_input(self._stem(x))
        counts = []
        for blk in self.blocks:
            res = self.backend.block(blk, h)
            h = res.out
            counts += [res.cnt1, res.cnt2]
        return self._head(h), torch.stack(counts, dim=1)

    def _instance_macs(self, active: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """(N,) float64 MACs per instance from the active counts (gates counted)."""
        act = active.to("cpu", torch.float64)
        fixed, h, w = self._stem_macs(size)
        per = torch.full((act.shape[0],), float(fixed), dtype=torch.float64)
        for i, blk in enumerate(self.blocks):
            macs, h, w = blk.macs(h, w, act[:, 2 * i], act[:, 2 * i + 1])
            per += macs
        return per + self.fc.weight.numel()

    def _stem_macs(self, size: Tuple[int, int]):
        """MACs of the stem and the feature-map size after it (:mod:`manidp.flops`)."""
        s = self.config["stem"]
        cout, cin = self.stem.weight.shape[:2]
        return stem_macs_from_dims(cin, cout, s["kernel"], s["stride"], s["padding"], s["maxpool"], *size)

    def dense_macs_for(self, size: Tuple[int, int]) -> int:
        """Dense MACs (no gates, every channel) for an ``(H, W)`` input."""
        macs, h, w = self._stem_macs(size)
        for blk in self.blocks:
            m, h, w = block_macs_from_dims(blk.in_channels, blk.planes, blk.stride, blk.has_shortcut, h, w)
            macs += m
        return int(macs + self.fc.weight.numel())

    @property
    def input_size(self) -> Tuple[int, int]:
        """The input size the model was trained for (CIFAR 32x32, ImageNet 224x224 unless recorded)."""
        size = self.config.get("input_size")
        if size:
            return tuple(size)
        return (32, 32) if self.config["kind"] == "cifar" else (224, 224)

    @property
    def dense_macs(self) -> int:
        """Dense MAC count for :attr:`input_size` inputs."""
        return self.dense_macs_for(self.input_size)

    def capture(self, batch_size: int, **kwargs):
        """Record the whole forward for ``batch_size`` inputs in a CUDA graph (GPU backends).

        Returns a callable ``fwd(x)`` that copies ``x`` into the graph's static
        input, replays it and returns the logits; see
        :func:`manidp.deploy.cuda_graph.capture` for the options.
        """
        from .cuda_graph import capture
        return capture(self, batch_size, **kwargs)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn raw uint8 images ((N, H, W) or (N, C, H, W)) into this model's input.

        Uses the preprocessing recorded at compile time (docs/DESIGN.md 5) through
        :func:`manidp.preprocess.raw_to_input`: zero-pad by ``pad`` pixels, divide by
        ``scale``, subtract ``mean`` and divide by ``std`` per channel.  Anything but
        uint8 images raises TypeError (a float image would be scaled twice).
        """
        spec = self.config.get("preprocess")
        if spec is None:
            raise ValueError("this engine records no preprocessing; feed normalised float tensors")
        return raw_to_input(images, spec, self.config["in_channels"], self.device, self.compute_dtype)

    # ---------------------------------------------------------------- files
    def save(self, path: str) -> None:
        """Write the engine to ``path`` atomically (:func:`manidp.checkpoint.atomic_save`).

        The config carries a sha256 digest of itself and every tensor, which
        :meth:`load` verifies (docs/DESIGN.md 6.1).
        """
        tensors = _owned({k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()})
        config = {k: v for k, v in self.config.items() if k != DIGEST_KEY}
        config[DIGEST_KEY] = engine_digest(config, tensors)
        atomic_save({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                     "config": json.dumps(config), "tensors": tensors}, path)

    @classmethod
    def load(cls, path: str, device: Union[str, torch.device] = "cpu", backend: str = "auto",
             dtype: Optional[torch.dtype] = None) -> "DynamicResNet":
        """Read an engine file; never executes code from it.

        Raises :class:`EngineFormatError` for a truncated, corrupted (digest
        mismatch), oversized, inconsistent or foreign file, ``FileNotFoundError``
        for a missing one, ``IsADirectoryError`` for a directory and
        ``PermissionError`` for one that cannot be opened.  A file without a digest
        (written before digests existed) loads with a ``UserWarning``.
        """
        config, tensors = read_engine_file(path)
        return cls(config, tensors, backend, device, dtype)


def _owned(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each tensor owning exactly its own storage (copies where one is a view or shares storage).

    Engine files hold plain tensors whose bytes add up to at most the file size; a
    view would save its whole storage and a shared storage would count twice.
    """
    out, seen = {}, set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        exact = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[name] = t if exact and (ptr not in seen or t.numel() == 0) else t.clone()
        seen.add(out[name].untyped_storage().data_ptr())
    return out


def _placement(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a ``torch.device`` with an index.

    ValueError for a device type engines do not run on (``meta``, ...);
    BackendUnavailable for CUDA on a machine without it.
    """
    device = torch.device(device)
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"an engine runs on a cpu or cuda device; got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _compute_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """The engine compute dtype (fp32 by default); TypeError for a non-floating one."""
    if dtype is None:
        return torch.float32
    if dtype not in _FLOAT_INPUTS:
        raise TypeError(f"engine compute dtype must be a floating type; got {dtype}")
    return dtype


def read_engine_file(path: str):
    """``(config, tensors)`` of an engine file: bounded, checked and verified (docs/DESIGN.md 6.1).

    In this order, so that nothing reads a tensor before its size is known to be
    right: the zip container (:func:`manidp.checkpoint.read_checkpoint` with
    :data:`ENGINE_LIMITS`), format and version, the config's fields, every
    tensor's dtype, layout and shape, then the sha256 digest, then finiteness.
    The returned config carries no digest.
    """
    payload = read_checkpoint(path, "DynamicResNet", EngineFormatError, ENGINE_LIMITS)
    if payload.get("format") != FORMAT_NAME:
        raise EngineFormatError(f"{path!r} is not a DynamicResNet file (expected format {FORMAT_NAME!r}; "
                                "a training checkpoint goes through manidp.deploy.compile)")
    if payload.get("version") != FORMAT_VERSION:
        raise EngineFormatError(f"{path!r} has engine format version {payload.get('version')!r:.40}; "
                                f"this manidp reads version {FORMAT_VERSION}")
    config, tensors = _header(payload, path)
    digest = config.pop(DIGEST_KEY, _NO_DIGEST)
    try:
        _check_structure(config, tensors, from_file=True)
    except ValueError as e:
        raise EngineFormatError(f"{path!r}: {e}") from None
    _verify_engine_digest(config, tensors, digest, path)
    try:
        _check_finite(tensors)
    except ValueError as e:
        raise EngineFormatError(f"{path!r}: {e}") from None
    return config, tensors


def _header(payload: dict, path: str):
    """The parsed config (a dict) and the tensor dictionary of an engine payload."""
    text, tensors = payload.get("config"), payload.get("tensors")
    try:
        if not isinstance(text, str) or not isinstance(tensors, dict):
            raise TypeError("'config' must be JSON text and 'tensors' a dictionary")
        config = json.loads(text)
        if not isinstance(config, dict):
            raise TypeError(f"the config is a JSON {type(config).__name__}, not an object")
    except (TypeError, ValueError, RecursionError) as e:
        raise EngineFormatError(f"{path!r} has a malformed engine header ({type(e).__name__}: {e})") from None
    return config, dict(tensors)


def _verify_engine_digest(config: dict, tensors: Dict[str, torch.Tensor], digest, path: str) -> None:
    """EngineFormatError unless ``digest`` matches; a warning when the file has none."""
    if digest is _NO_DIGEST:
        warnings.warn(f"{path!r} carries no sha256 digest (written by an older manidp); its integrity cannot "
                      "be checked. engine.save writes one.", UserWarning, stacklevel=4)
        return
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise EngineFormatError(f"{path!r}: config 'sha256' must be a 64-digit hex digest; got {digest!r:.80}")
    if engine_digest(config, tensors) != digest:
        raise EngineFormatError(f"{path!r}: sha256 digest mismatch, the file is corrupted "
                                "(its tensors or config differ from what was saved)")
