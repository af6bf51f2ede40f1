"""DynamicResNet: the compiled, deployable form of a gated ResNet (DESIGN 3.1-3.2).

The engine holds BN-folded conv weights, gate weights and thresholds.  It runs
the dense stem and classifier itself and every gated block through a backend
(``reference``, ``cpu``, ``triton``, ``cuda``; see :mod:`manidp.deploy.backends`).

Files are written with :meth:`DynamicResNet.save` and read with
:meth:`DynamicResNet.load`; the format is a ``torch.save`` of plain tensors,
strings and numbers, loaded with ``weights_only=True`` so that loading can never
run code from the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flops import block_macs_from_dims, conv_out_size
from .backends import Backend, get_backend
from .folding import model_config, model_tensors

__all__ = ["DynamicResNet", "EngineFormatError", "read_engine_file", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "manidp.DynamicResNet"
FORMAT_VERSION = 1
_FLOAT_INPUTS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class EngineFormatError(ValueError):
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


def _expected_tensors(cfg: dict) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes every engine of ``cfg`` must hold (used to validate files)."""
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
            shapes.update({f"{p}.{gname}.fc2_bias": (pl,), f"{p}.{gname}.threshold": ()})
            shapes[f"{p}.{gname}.fc1"] = (None, gin)
            shapes[f"{p}.{gname}.fc2"] = (pl, None)
    last = cfg["blocks"][-1]["planes"]
    shapes.update({"fc.weight": (cfg["num_classes"], last), "fc.bias": (cfg["num_classes"],)})
    return shapes


def _validate(cfg: dict, tensors: Dict[str, torch.Tensor]) -> None:
    try:
        expected = _expected_tensors(cfg)
    except (KeyError, TypeError, IndexError) as e:
        raise EngineFormatError(f"engine config is incomplete or malformed ({e!r})") from None
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise EngineFormatError(f"engine file lacks tensors {missing[:5]}")
    for name, shape in expected.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise EngineFormatError(f"engine tensor {name!r} is not a floating-point tensor")
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise EngineFormatError(f"engine tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if not bool(torch.isfinite(t).all()) and not name.endswith("threshold"):
            raise EngineFormatError(f"engine tensor {name!r} holds non-finite values")


class DynamicResNet(nn.Module):
    """A compiled gated ResNet whose blocks compute only the channels their gates keep.

    Use :func:`manidp.deploy.compile` to build one, or :meth:`load` to read a file.
    ``engine(x)`` returns logits; ``engine(x, return_stats=True)`` returns
    ``(logits, stats)`` with ``stats["macs"]`` (N,) MACs each instance spent and
    ``stats["active"]`` (N, num_gates) active channel counts per gate.
    """

    def __init__(self, config: dict, tensors: Dict[str, torch.Tensor], backend: str = "auto"):
        super().__init__()
        _validate(config, tensors)
        self.config = config
        self.stem = _Params({"weight": tensors["stem.weight"], "bias": tensors["stem.bias"]})
        self.blocks = nn.ModuleList(
            EngineBlock(b, {k[len(f"blocks.{i}."):]: v for k, v in tensors.items() if k.startswith(f"blocks.{i}.")},
                        config["clamp_max"])
            for i, b in enumerate(config["blocks"]))
        self.fc = _Params({"weight": tensors["fc.weight"], "bias": tensors["fc.bias"]})
        self.compute_dtype = torch.float32
        self._backend_name = backend
        self.backend: Backend = get_backend(backend, torch.device("cpu"), self.compute_dtype)
        self.backend.prepare(self)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: nn.Module, backend: str = "auto", preprocess: Optional[dict] = None) -> "DynamicResNet":
        """Compile a gated :mod:`manidp.models` network (its eval-mode behaviour)."""
        cfg = model_config(model)
        if preprocess is not None:
            cfg["preprocess"] = dict(preprocess)
        return cls(cfg, model_tensors(model), backend)

    @property
    def device(self) -> torch.device:
        return self.stem.weight.device

    @property
    def num_gates(self) -> int:
        return 2 * len(self.blocks)

    def set_backend(self, name: str) -> "DynamicResNet":
        """Switch to backend ``name`` ("auto" picks the fastest available here)."""
        self.backend = get_backend(name, self.device, self.compute_dtype)
        self._backend_name = name
        self.backend.prepare(self)
        return self

    def to(self, *args, **kwargs) -> "DynamicResNet":
        """Move to a device and/or set the compute dtype of convs and classifier.

        Gates always run in fp32 so that thresholds compare exactly as in training.
        """
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in _FLOAT_INPUTS:
            raise TypeError(f"engine compute dtype must be a floating type; got {dtype}")
        if device is not None:
            super().to(device=device)
        if dtype is not None:
            self.compute_dtype = dtype
        self.backend = get_backend(self._backend_name, self.device, self.compute_dtype)
        self.backend.prepare(self)
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
        cin = self.config["in_channels"]
        want = f"a float tensor of shape (N, {cin}, H, W) with dtype {self.compute_dtype} on {self.device}"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected {want}; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected {want}; got dtype {x.dtype} (integer images: use engine.preprocess)")
        if x.dim() != 4 or x.shape[1] != cin:
            raise ValueError(f"expected {want}; got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"expected {want} with N >= 1; got an empty batch")
        if x.device != self.device:
            raise ValueError(f"expected {want}; got a tensor on {x.device}")
        if x.dtype != self.compute_dtype:
            raise TypeError(f"expected {want}; got dtype {x.dtype}")
        min_size = 1 if self.config["kind"] == "cifar" else 2
        if min(x.shape[2:]) < min_size:
            raise ValueError(f"expected {want} with H, W >= {min_size}; got shape {tuple(x.shape)}")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config["stem"]
        x = self.backend.prepare_stem_input(x)
        w, b = self.stem.weight.to(x.dtype), self.stem.bias.to(x.dtype)
        x = F.conv2d(x, w, b, stride=s["stride"], padding=s["padding"])
        if s["maxpool"]:
            # max-pool then ReLU equals ReLU then max-pool (ReLU is monotonic) and touches a
            # 4x smaller map: at batch 32, 224x224, one thread, 48 ms of the stem's 215 ms.
            x = F.max_pool2d(x, 3, 2, 1)
        return F.relu(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.float().mean(dim=(2, 3))
        return pooled @ self.fc.weight.float().t() + self.fc.bias.float()

    def forward(self, x: torch.Tensor, return_stats: bool = False):
        self.check_input(x)
        h = self.backend.prepare_input(self._stem(x))
        counts = []
        for blk in self.blocks:
            res = self.backend.block(blk, h)
            h = res.out
            counts += [res.cnt1, res.cnt2]
        logits = self._head(h)
        if not return_stats:
            return logits
        active = torch.stack(counts, dim=1)
        return logits, {"macs": self._instance_macs(active, tuple(x.shape[2:])), "active": active}

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
        s, (h, w) = self.config["stem"], size
        ho, wo = conv_out_size(h, s["kernel"], s["stride"], s["padding"]), conv_out_size(w, s["kernel"], s["stride"], s["padding"])
        macs = self.stem.weight.numel() * ho * wo
        if s["maxpool"]:
            ho, wo = conv_out_size(ho, 3, 2, 1), conv_out_size(wo, 3, 2, 1)
        return macs, ho, wo

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

        Uses the preprocessing recorded at compile time: zero-pad by ``pad`` pixels,
        divide by ``scale``, subtract ``mean`` and divide by ``std`` per channel.
        """
        spec = self.config.get("preprocess")
        if spec is None:
            raise ValueError("this engine records no preprocessing; feed normalised float tensors")
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images)
        if images.dim() == 3:
            images = images[:, None]
        if images.dim() != 4 or images.shape[1] != self.config["in_channels"]:
            raise ValueError(f"expected uint8 images of shape (N, H, W) or (N, {self.config['in_channels']}, H, W); "
                             f"got {tuple(images.shape)}")
        pad = int(spec.get("pad", 0))
        x = images.float()
        if pad:  # raw images are zero-padded before normalisation, as in training
            x = F.pad(x, (pad, pad, pad, pad))
        x = x / float(spec.get("scale", 255.0))
        mean = torch.tensor(spec.get("mean", [0.0]), dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(spec.get("std", [1.0]), dtype=torch.float32)[None, :, None, None]
        x = (x - mean) / std
        return x.to(self.device, self.compute_dtype)

    # ---------------------------------------------------------------- files
    def save(self, path: str) -> None:
        """Write the engine to ``path`` atomically (temporary file, then rename)."""
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}
        payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                   "config": json.dumps(self.config), "tensors": tensors}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".engine-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str, device="cpu", backend: str = "auto", dtype: Optional[torch.dtype] = None) -> "DynamicResNet":
        """Read an engine file; never executes code from it.

        Raises :class:`EngineFormatError` for a truncated, corrupted or foreign
        file and ``FileNotFoundError`` for a missing one.
        """
        config, tensors = read_engine_file(path)
        engine = cls(config, tensors, backend="reference")
        engine._backend_name = backend
        return engine.to(device=device, dtype=dtype)


def read_engine_file(path: str):
    """``(config, tensors)`` of an engine file, validated."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no engine file at {path!r}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle refused by weights_only, ...
        raise EngineFormatError(f"{path!r} is not a readable DynamicResNet file ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise EngineFormatError(f"{path!r} is not a DynamicResNet file (expected format {FORMAT_NAME!r}; "
                                "a training checkpoint goes through manidp.deploy.compile)")
    if payload.get("version") != FORMAT_VERSION:
        raise EngineFormatError(f"{path!r} has engine format version {payload.get('version')!r}; "
                                f"this manidp reads version {FORMAT_VERSION}")
    try:
        config = json.loads(payload["config"])
        tensors = dict(payload["tensors"])
    except (KeyError, TypeError, ValueError) as e:
        raise EngineFormatError(f"{path!r} has a malformed engine header ({e!r})") from None
    _validate(config, tensors)  # state_dict names are the flat names the constructor takes
    return config, tensors
