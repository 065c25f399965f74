"""Loading published BUTD checkpoints (``bua-caffe-frcn-r101-k36.pth``, ``…-k10-100.pth``, ``…-r152.pth``).

The module tree of :class:`mask.features.butd.BUTDDetector` uses the reference's key names, so the
mapping is by name; what this module adds (fact sheet §2, §5):

- accepts a raw state dict or ``{"model": …}`` (what detectron2's ``DetectionCheckpointer`` saves),
  from ``.pth`` (``torch.load(weights_only=True)``), ``.safetensors`` or bytes of either; strips a
  DataParallel ``module.`` prefix; converts numpy arrays and other dtypes to the model's;
- ignores ``num_batches_tracked`` (absent from the published files for ``backbone.res4``);
- uses ``proposal_generator.anchor_generator.cell_anchors.0`` from the checkpoint when present and
  keeps the config's anchors otherwise — and logs which (the anchor caveat of §5);
- FrozenBN: when the checkpoint's ``_metadata`` says a frozen-BN module has version < 3, its
  ``running_var`` is reduced by eps (detectron2's rule: old versions stored var already + eps);
- anything else that does not match raises :class:`CheckpointMismatch` listing the missing keys,
  unexpected keys and shape mismatches (first ``max_list`` of each, with counts) and naming the file.

detectron2 ``.pkl`` files are pickles and are refused (nothing user-facing is unpickled here); load
them once with detectron2 and save ``model.state_dict()`` with ``torch.save`` or safetensors.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mask.errors import MaskError

logger = logging.getLogger(__name__)

ANCHOR_KEY = "proposal_generator.anchor_generator.cell_anchors.0"


class CheckpointError(MaskError, ValueError):
    """A checkpoint that cannot be read (missing, corrupt, wrong container)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose keys or shapes do not match the network.

    Attributes:
        source: the checkpoint's name.
        missing: keys the network needs that the checkpoint lacks.
        unexpected: checkpoint keys the network does not have.
        shape_mismatches: ``(key, checkpoint shape, network shape)``.
    """

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 shape_mismatches: list[tuple[str, tuple, tuple]], max_list: int = 10):
        self.source = source
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches
        parts = [f"checkpoint {source} does not match the detector:"]
        if missing:
            parts.append(f"  {len(missing)} missing key(s): " + ", ".join(missing[:max_list])
                         + (" …" if len(missing) > max_list else ""))
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:max_list])
                         + (" …" if len(unexpected) > max_list else ""))
        if shape_mismatches:
            parts.append(f"  {len(shape_mismatches)} shape mismatch(es): " + ", ".join(
                f"{k} checkpoint {list(a)} vs network {list(b)}" for k, a, b in shape_mismatches[:max_list])
                + (" …" if len(shape_mismatches) > max_list else ""))
        parts.append("  (check detector.depth / variant / num_classes / num_attributes against the file)")
        super().__init__("\n".join(parts))


def read_state_dict(source: str | Path | bytes | Mapping[str, Any], *,
                    name: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any] | None, str]:
    """Read a checkpoint into a flat ``{key: tensor}`` dict.

    Args:
        source: a path (``.pth``/``.pt``/``.safetensors``), the file's bytes, or an in-memory state
            dict (raw or ``{"model": …}``).
        name: name used in messages (default: the path, or ``<bytes>`` / ``<state dict>``).

    Returns:
        ``(state_dict, metadata, name)`` where metadata is the PyTorch ``_metadata`` (module versions)
        when the file carries it.

    Raises:
        CheckpointError: unreadable, corrupt, pickled ``.pkl``, or not a mapping of tensors.
    """
    if isinstance(source, Mapping):
        name = name or "<state dict>"
        obj: Any = source
    elif isinstance(source, bytes | bytearray):
        name = name or "<bytes>"
        obj = _load_bytes(bytes(source), name)
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {name}: file not found")
        if path.suffix == ".pkl":
            raise CheckpointError(f"checkpoint {name}: detectron2 .pkl files are pickles and are not loaded; "
                                  "load it once with detectron2 and save model.state_dict() with torch.save "
                                  "or safetensors")
        if path.suffix == ".safetensors":
            obj = _load_safetensors(path.read_bytes(), name)
        else:
            obj = _load_torch(path.read_bytes(), name)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {name}: expected a state dict or {{'model': state dict}}, "
                              f"got {type(obj).__name__}")
    metadata = getattr(obj, "_metadata", None)
    out: dict[str, Tensor] = {}
    bad = []
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, Tensor):
            bad.append(str(k))
            continue
        out[str(k)] = v
    if bad:
        raise CheckpointError(f"checkpoint {name}: {len(bad)} value(s) are not tensors: {', '.join(bad[:10])}")
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
        if metadata is not None:
            metadata = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in metadata.items()}
    return out, (dict(metadata) if metadata is not None else None), name


def _load_bytes(data: bytes, name: str) -> Any:
    if len(data) == 0:
        raise CheckpointError(f"checkpoint {name}: empty file (0 bytes)")
    if data[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        try:
            return _load_safetensors(data, name)
        except CheckpointError:
            pass
    return _load_torch(data, name)


def _load_safetensors(data: bytes, name: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {name}: not a valid safetensors file: {e}") from None


def _load_torch(data: bytes, name: str) -> Any:
    if len(data) == 0:
        raise CheckpointError(f"checkpoint {name}: empty file (0 bytes)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {name}: cannot be read with torch.load(weights_only=True): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def load_butd_checkpoint(model: nn.Module, source: str | Path | bytes | Mapping[str, Any], *,
                         name: str | None = None, max_list: int = 10) -> dict[str, Any]:
    """Load a published BUTD checkpoint into ``model`` (rules in the module docstring).

    Args:
        model: a :class:`mask.features.butd.BUTDDetector` of the matching depth/variant.
        source: path, bytes or state dict (see :func:`read_state_dict`).
        name: checkpoint name for messages.
        max_list: how many keys of each kind an error lists.

    Returns:
        A report: ``source``, ``tensors`` loaded, ``anchors`` (``"checkpoint"`` or ``"config"``),
        ``frozen_bn_eps_corrected`` (modules).

    Raises:
        CheckpointError: unreadable file.
        CheckpointMismatch: missing/unexpected keys or shape mismatches, listed.
    """
    sd, metadata, name = read_state_dict(source, name=name)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}

    anchors = "config"
    if ANCHOR_KEY in sd:
        anchors = "checkpoint"
        logger.info("%s: using the checkpoint's cell anchors %s", name, list(sd[ANCHOR_KEY].shape))
    elif ANCHOR_KEY in own:
        sd[ANCHOR_KEY] = own[ANCHOR_KEY]
        logger.info("%s: no %s in the checkpoint; keeping the config's cell anchors", name, ANCHOR_KEY)

    corrected = _fix_frozen_bn(model, sd, metadata)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sorted(set(sd) & set(own))
              if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointMismatch(name, missing, unexpected, shapes, max_list=max_list)
    casted = {k: v.to(dtype=own[k].dtype) for k, v in sd.items()}
    result = model.load_state_dict(casted, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; kept as a guard
        raise CheckpointMismatch(name, leftover, list(result.unexpected_keys), [], max_list=max_list)
    logger.info("%s: loaded %d tensors (anchors from %s, %d frozen BN eps-corrected)", name, len(casted),
                anchors, corrected)
    return {"source": name, "tensors": len(casted), "anchors": anchors, "frozen_bn_eps_corrected": corrected}


def _fix_frozen_bn(model: nn.Module, sd: dict[str, Tensor], metadata: dict[str, Any] | None) -> int:
    """detectron2 FrozenBatchNorm2d rule: version < 3 stored running_var without +eps."""
    if not metadata:
        return 0
    n = 0
    for mod_name, m in model.named_modules():
        if not isinstance(m, FrozenBatchNorm2d):
            continue
        version = (metadata.get(mod_name) or {}).get("version")
        key = f"{mod_name}.running_var"
        if version is not None and version < 3 and key in sd:
            sd[key] = sd[key] - m.eps
            n += 1
    return n


def state_dict_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """The model's state dict as safetensors bytes (``num_batches_tracked`` dropped), e.g. to ship one
    calibrated set of weights to every detector actor.

    Args:
        model: any module.
        metadata: optional string metadata stored in the safetensors header.

    Returns:
        safetensors bytes, loadable by :func:`load_butd_checkpoint`.
    """
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    return save(sd, metadata=metadata)
