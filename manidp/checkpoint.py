"""Checkpoint files: atomic writes, bounded and verified reads, and the model a checkpoint describes.

docs/DESIGN.md 6 (6.1 engine files, 6.2 training checkpoints).  The one place for:

* :func:`atomic_save`: ``torch.save`` to a temporary file in the target's
  directory, fsync, ``os.replace``, fsync of the directory, so a kill at any
  moment leaves either the previous file or the new one, never a torn one.
  Every file gets the permissions a plain ``open`` would give (0644 under the
  usual umask 022).  Training checkpoints and engine files are written with it.
* :func:`read_checkpoint`: ``torch.load(weights_only=True)`` (no code from the
  file ever runs), bounded before anything is allocated (:class:`ReadLimits`:
  uncompressed zip records whose sizes fit in the file, a bounded pickle
  header, no tensor larger than its storage) and, for a checkpoint carrying a
  ``sha256`` digest, verified.  Errors name the file: ``FileNotFoundError``,
  ``IsADirectoryError``, ``PermissionError`` from the OS; :class:`CheckpointError`
  for anything wrong with the content.  Engine files are read with it too
  (raising their own subclass, ``EngineFormatError``).
* Digests: :func:`with_digest` / :func:`checkpoint_digest` for checkpoints,
  :func:`tensor_digest` for the tensors of an engine file.
* :func:`rebuild_model`: the network a checkpoint dictionary describes
  (architecture, classes, input channels, gate options, weights; the per-block
  widths of a static-pruned network), used by :func:`manidp.deploy.compile` and
  ``manidp-flops``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional, Type

import torch
import torch.nn as nn

from .models import build_model, load_dense_state_dict

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "ReadLimits", "CHECKPOINT_LIMITS", "atomic_save",
           "remove_stale_temp_files", "read_checkpoint", "check_dense_tensor", "tensor_digest",
           "checkpoint_digest", "with_digest", "extract_state_dict", "rebuild_model"]

# The ``format`` field of a ``manidp-train`` checkpoint.
CHECKPOINT_FORMAT = "manidp.train/1"
DIGEST_KEY = "sha256"

_TEMP_SUFFIX = ".tmp"
_GATE_OPTIONS = ("squeeze_rate", "clamp_max", "thre_init")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # the opcode a legacy (pre-zip) torch.save file starts with
# Deeper nesting than any file we write; a crafted file nests deeper to exhaust the stack.
_MAX_NESTING = 64


class CheckpointError(ValueError):
    """A file is not a readable checkpoint, or its content does not describe a model; names the file."""


@dataclass(frozen=True)
class ReadLimits:
    """What :func:`read_checkpoint` accepts, checked before ``torch.load`` allocates anything.

    ``max_header_bytes`` bounds the pickled structure (``data.pkl``), which
    unpickles into Python objects several times its size; ``tensor_bytes_ratio``
    bounds the bytes of all tensors together by that multiple of the file size
    (above 1 only where tensors may legitimately share storage); ``allow_legacy``
    accepts the pre-zip ``torch.save`` format (old pretrained ``.th`` files).
    """

    max_header_bytes: int
    tensor_bytes_ratio: float
    allow_legacy: bool


# Checkpoints: a long run's history and optimizer state stay far below 16 MiB of header; tied
# weights in a foreign state dict may view one storage twice.
CHECKPOINT_LIMITS = ReadLimits(max_header_bytes=16 << 20, tensor_bytes_ratio=4.0, allow_legacy=True)


# ----------------------------------------------------------------------------- writing
def atomic_save(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically.

    The temporary file (``<name>.<random>.tmp`` beside ``path``) gets the
    permissions a plain ``open`` would give, not ``mkstemp``'s 0600, so engine
    files and checkpoints share one policy (docs/DESIGN.md 6).
    ``MANIDP_TEST_SLOW_SAVE=<seconds>`` sleeps between the fsync and the rename,
    so tests can kill the process there and check the old file survives.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=_TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        _test_delay()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def remove_stale_temp_files(directory: str, name_glob: str = "*") -> None:
    """Delete temporary files :func:`atomic_save` left in ``directory`` when killed before its rename."""
    for tmp in glob.glob(os.path.join(directory, f"{name_glob}.*{_TEMP_SUFFIX}")):
        os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _test_delay() -> None:
    delay = float(os.environ.get("MANIDP_TEST_SLOW_SAVE", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable (the directory entry on disk); not every OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- digests
def _update_with_tensor(h, t: torch.Tensor) -> None:
    """Feed dtype, shape and the raw bytes of ``t`` (row-major) into the hash ``h``."""
    h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())


def tensor_digest(tensors: dict, header: str = "") -> str:
    """sha256 of ``header`` and every tensor in ``tensors`` (sorted names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        h.update(f"\0{name}\0".encode())
        _update_with_tensor(h, tensors[name])
    return h.hexdigest()


class _Digester:
    """sha256 of a nested checkpoint object, independent of dict order and of list/tuple type.

    Each object's digest is computed once (keyed by ``id``): a file may reference one
    object many times, and walking every reference could take exponential time.
    """

    def __init__(self):
        self._seen: dict = {}

    def __call__(self, obj, depth: int = 0) -> bytes:
        key = id(obj)
        if key not in self._seen:
            if depth > _MAX_NESTING:
                raise ValueError(f"objects nested more than {_MAX_NESTING} levels deep")
            self._seen[key] = (obj, self._digest(obj, depth))  # obj kept alive so its id stays unique
        return self._seen[key][1]

    def _digest(self, obj, depth: int) -> bytes:
        h = hashlib.sha256()
        if isinstance(obj, torch.Tensor):
            _update_with_tensor(h, obj)
        elif isinstance(obj, dict):
            pairs = sorted(self(k, depth + 1) + self(v, depth + 1) for k, v in obj.items())
            h.update(b"D" + b"".join(pairs))
        elif isinstance(obj, (list, tuple)):
            h.update(b"L" + b"".join(self(v, depth + 1) for v in obj))
        elif isinstance(obj, (set, frozenset)):
            h.update(b"E" + b"".join(sorted(self(v, depth + 1) for v in obj)))
        else:
            h.update(_scalar_bytes(obj))
        return h.digest()


def _scalar_bytes(obj) -> bytes:
    """A type-tagged, exact encoding of a non-container value."""
    if obj is None or isinstance(obj, bool):
        return f"B{obj}".encode()
    if isinstance(obj, int):
        return b"I" + hex(obj).encode()  # hex: str() refuses ints above 4300 digits
    if isinstance(obj, float):
        return b"F" + obj.hex().encode()
    if isinstance(obj, str):
        return b"S" + obj.encode("utf-8", "surrogatepass")
    if isinstance(obj, (bytes, bytearray)):
        return b"Y" + bytes(obj)
    return f"R{type(obj).__module__}.{type(obj).__qualname__}:{obj!r}".encode()


def checkpoint_digest(obj: dict) -> str:
    """sha256 over everything in a checkpoint dictionary except its ``sha256`` entry."""
    return _Digester()({k: v for k, v in obj.items() if k != DIGEST_KEY}).hex()


def with_digest(obj: dict) -> dict:
    """A shallow copy of ``obj`` carrying its :func:`checkpoint_digest` under ``"sha256"``."""
    out = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    out[DIGEST_KEY] = checkpoint_digest(out)
    return out


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str, what: str = "checkpoint", error: Type[CheckpointError] = CheckpointError,
                    limits: ReadLimits = CHECKPOINT_LIMITS) -> dict:
    """The dictionary stored in ``path``, read with ``torch.load(weights_only=True)``.

    ``what`` names the kind of file in messages; ``error`` is the exception raised
    for a file whose content is wrong (a :class:`CheckpointError` subclass);
    ``limits`` bounds what is loaded.  A dictionary carrying ``"sha256"`` is
    verified against it; a ``manidp-train`` checkpoint without one loads with a
    warning.  OS errors opening the file (``PermissionError``, ...) pass through.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a {what} file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    with open(path, "rb") as f:  # from here on, every failure is the content's
        size = os.fstat(f.fileno()).st_size
        _check_container(f, size, path, what, error, limits)
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, corrupt record, pickle refused by weights_only, ...
            raise error(f"cannot load {what} file {path!r} ({type(e).__name__}: {_load_error_detail(e)})") from None
    if not isinstance(obj, dict):
        raise error(f"{path!r} is not a {what} file (it holds a {type(obj).__name__}, not a dictionary)")
    try:
        _check_tensor_sizes(obj, size, limits.tensor_bytes_ratio, path)
        _verify_digest(obj, path, what)
    except ValueError as e:
        raise error(str(e)) from None
    except (RuntimeError, TypeError) as e:  # a tensor or object torch cannot inspect: damage as well
        raise error(f"{path!r} is not a usable {what} file ({type(e).__name__}: {e})") from None
    return obj


def _load_error_detail(e: Exception) -> str:
    """The useful line of a ``torch.load`` error (never torch's advice to disable ``weights_only``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error" in ln:
            return ln
    if lines and lines[0].startswith("Weights only load failed"):
        return "the file holds objects a weights-only load refuses"
    return lines[0] if lines else "no detail"


def _check_container(f, size: int, path: str, what: str, error: Type[CheckpointError], limits: ReadLimits) -> None:
    """Zip records stored (not compressed), their sizes within the file, the header bounded."""
    head = f.read(4)
    f.seek(0)
    if head != _ZIP_MAGIC:
        if limits.allow_legacy and head[:1] == _PICKLE_PROTO:
            return
        legacy = " or a legacy torch.save pickle" if limits.allow_legacy else ""
        raise error(f"{path!r} is not a {what} file (not a torch.save zip archive{legacy}; "
                    f"it starts with {head!r})")
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except Exception as e:  # BadZipFile, struct.error, ValueError, ... on a damaged directory
        raise error(f"{path!r} is not a readable {what} file (damaged zip archive: {e})") from None
    finally:
        f.seek(0)
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise error(f"{path!r}: record {info.filename!r} is compressed; {what} files are written "
                        "uncompressed and compressed records are refused")
        if info.filename.endswith("data.pkl") and info.file_size > limits.max_header_bytes:
            raise error(f"{path!r}: header record {info.filename!r} declares {info.file_size} bytes, more than "
                        f"the {limits.max_header_bytes} a {what} file needs")
        total += info.file_size
    if total > size:
        raise error(f"{path!r}: its records declare {total} bytes, more than the file's {size}")


def _tensors_in(obj):
    """Every tensor reachable from ``obj`` (each once), refusing nesting deeper than any file we write."""
    seen, stack = set(), [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if depth > _MAX_NESTING:
            raise ValueError(f"objects nested more than {_MAX_NESTING} levels deep")
        if isinstance(node, torch.Tensor):
            yield node
        elif isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node if isinstance(k, torch.Tensor))
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in node)


def _check_tensor_sizes(obj, size: int, ratio: float, path: str) -> None:
    """No tensor larger than its storage (stride-0 expansions), all tensors within ``ratio`` x the file size."""
    total = 0
    for t in _tensors_in(obj):
        if t.layout != torch.strided:
            raise ValueError(f"{path!r} holds a {t.layout} tensor; files hold plain strided tensors")
        nbytes = t.numel() * t.element_size()
        if nbytes > t.untyped_storage().nbytes():
            raise ValueError(f"{path!r} holds an expanded tensor (shape {tuple(t.shape)}, stride {t.stride()}) "
                             "larger than its storage; files hold plain tensors")
        total += nbytes
    if total > ratio * size:
        raise ValueError(f"{path!r}: its tensors hold {total} bytes, more than {ratio:g} x the file's {size}")


def _verify_digest(obj: dict, path: str, what: str) -> None:
    """Compare a checkpoint's ``sha256`` with its content; warn when a manidp-train checkpoint has none."""
    if DIGEST_KEY not in obj:
        if obj.get("format") == CHECKPOINT_FORMAT:
            warnings.warn(f"{path!r} carries no sha256 digest (written by an older manidp); its integrity "
                          "cannot be checked", UserWarning, stacklevel=3)
        return
    want = obj[DIGEST_KEY]
    if not isinstance(want, str) or len(want) != 64:
        raise ValueError(f"{path!r}: its 'sha256' entry is not a 64-digit hex digest")
    try:
        got = checkpoint_digest(obj)
    except Exception as e:  # an object the digest cannot encode is damage too
        raise ValueError(f"{path!r}: cannot compute its digest ({type(e).__name__}: {e})") from None
    if got != want:
        raise ValueError(f"{path!r}: sha256 digest mismatch, the {what} file is corrupted "
                         f"(recorded {want[:12]}..., content {got[:12]}...)")


def check_dense_tensor(name: str, t, path: str) -> None:
    """ValueError unless ``t`` is a plain contiguous tensor owning exactly its storage.

    Refuses stride-0 (expanded) tensors and views into a larger storage, which
    would make a small file stand for far more memory than it holds.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path!r}: {name!r} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided or not t.is_contiguous() or t.storage_offset() != 0 \
            or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        raise ValueError(f"{path!r}: tensor {name!r} is an expanded or strided view (shape {tuple(t.shape)}, "
                         f"stride {t.stride()}, offset {t.storage_offset()}); files hold plain contiguous tensors")


def extract_state_dict(obj: dict, path: str) -> dict:
    """The model weights in a checkpoint: ``state_dict``/``model``/``model_state_dict``, or ``obj`` itself."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path!r} holds no model state dict")
    return {k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k: v for k, v in obj.items()}


# ----------------------------------------------------------------------------- the model
def rebuild_model(ckpt: dict, path: str, gated: Optional[bool] = None) -> nn.Module:
    """The network ``ckpt`` describes, with its weights, in eval mode.

    ``ckpt`` needs ``arch`` and a state dict.  Classes and input channels come from
    ``num_classes``/``in_channels``, else the recorded ``dataset``, else the weights'
    shapes; gate options (``squeeze_rate``, ``clamp_max``, ``thre_init``) from
    ``args``.  ``gated=None`` builds the recorded architecture; ``gated=True``
    builds its gated form and refuses weights without gates (a dense model).
    A checkpoint recording ``widths`` (``manidp-train --static_keep``) holds a
    :class:`~manidp.static_pruning.StaticPrunedResNet` of its dense ``arch``; it has
    no gated form, so ``gated=True`` refuses it.
    """
    arch = ckpt.get("arch")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path!r} is not a manidp-train checkpoint (it records no 'arch')")
    state = extract_state_dict(ckpt, path)
    if ckpt.get("widths") is not None:
        if gated:
            raise CheckpointError(f"{path!r} holds a static-pruned {arch} (no gates); only a ManiDP checkpoint "
                                  "compiles into a DynamicResNet engine")
        return _rebuild_static(ckpt, state, arch, path)
    if gated and not arch.startswith("dy"):
        arch = "dy" + arch
    try:
        kwargs = _model_kwargs(ckpt, state, arch)
        _check_against_weights(kwargs, state)
        model = build_model(arch, **kwargs)
        fresh = load_dense_state_dict(model, state)
    except (ValueError, KeyError, TypeError) as e:  # unknown arch, missing or misshapen weights
        raise CheckpointError(f"{path!r} does not fit {arch}: {e}") from None
    if gated and any(".gate" in k for k in fresh):
        raise CheckpointError(f"{path!r} holds a dense model; train it with ManiDP before compiling")
    return model.eval()


def _rebuild_static(ckpt: dict, state: dict, arch: str, path: str) -> nn.Module:
    """The StaticPrunedResNet of a static checkpoint: its dense ``arch`` cut to the recorded widths, in eval mode.

    The widths are checked against the architecture and the stored conv1 weights
    before the narrow network is built, so its size follows from the file's tensors.
    """
    # static_pruning imports manidp.deploy, whose compile imports this module: import it late
    from .static_pruning import static_pruned_like
    widths = ckpt["widths"]
    try:
        if arch.startswith("dy"):
            raise ValueError("a static-pruned network is cut from a dense architecture, not a gated one")
        kwargs = _model_kwargs(ckpt, state, arch)
        _check_against_weights(kwargs, state)
        source = build_model(arch, **kwargs)
        _check_static_widths(widths, source, state)
        model = static_pruned_like(source, widths=widths, fold_bn=False)
        model.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: load_state_dict's key/shape errors
        raise CheckpointError(f"{path!r} does not fit a static-pruned {arch}: {e}") from None
    return model.eval()


def _check_static_widths(widths, source: nn.Module, state: dict) -> None:
    """``widths``: one int per block of ``source``, in ``[1, planes]``, equal to the stored conv1 output counts."""
    blocks = list(source.blocks())
    if not isinstance(widths, (list, tuple)) or len(widths) != len(blocks):
        count = len(widths) if isinstance(widths, (list, tuple)) else type(widths).__name__
        raise ValueError(f"'widths' must hold one width per block ({len(blocks)} blocks); got {count}")
    for i, (width, block) in enumerate(zip(widths, blocks)):
        planes = block.conv1.out_channels
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= planes:
            raise ValueError(f"block {i} width {width!r} is not an integer in [1, {planes}]")
        weight = state.get(f"layers.{i}.conv1.weight")
        if weight is None or weight.dim() != 4 or weight.shape[0] != width:
            shape = None if weight is None else tuple(weight.shape)
            raise ValueError(f"block {i} width {width} does not match layers.{i}.conv1.weight of shape {shape}")


def _model_kwargs(ckpt: dict, state: dict, arch: str) -> dict:
    """``build_model`` keyword arguments for ``arch`` from what the checkpoint records."""
    dataset = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else {}
    kwargs = {
        "num_classes": _count(ckpt.get("num_classes") or dataset.get("num_classes") or state["fc.weight"].shape[0]),
        "in_channels": _count(ckpt.get("in_channels") or dataset.get("in_channels") or state["conv1.weight"].shape[1]),
    }
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if arch.startswith("dy"):
        kwargs.update({k: args[k] for k in _GATE_OPTIONS if args.get(k) is not None})
    return kwargs


def _count(value) -> int:
    """A recorded class or channel count as an int >= 1 (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"a class or channel count must be an integer >= 1; got {value!r}")
    return value


def _check_against_weights(kwargs: dict, state: dict) -> None:
    """The recorded classes and input channels match the stored weights, before a model of that size is built.

    The model's size then follows from tensors the file holds, not from numbers it merely states.
    """
    for key, weight, dim in (("num_classes", "fc.weight", 0), ("in_channels", "conv1.weight", 1)):
        t = state.get(weight)
        if t is not None and (t.dim() <= dim or t.shape[dim] != kwargs[key]):
            raise ValueError(f"{key} {kwargs[key]} does not match {weight} of shape {tuple(t.shape)}")
