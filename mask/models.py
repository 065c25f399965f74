"""The three networks of MASK (paper Sec. 3.2–3.3, Table 8): PAE h, FRM g and MTM f.

Every model works on **sets of regions per image**: inputs are ``(B, R, ·)`` with a padding mask
``(B, R)`` of dtype bool, ``True`` = a real region.  Self-attention runs across the regions of one
image (the mask becomes the attention ``key_padding_mask``), so a padded slot never influences a real
one; padded slots are zeroed on the way in and their outputs are zero.  An image with no real region
gives all-zero outputs (its attention is computed unmasked on zeros and then discarded, so no NaN).

"Self-attention layer" in Table 8 is multi-head attention with Q, K, V and O projections
(``4·d² + 4·d`` parameters: 1.05M at d=512, 0.36M at d=300).  Here each one is wrapped as a
**pre-norm residual block** ``x + MHA(LayerNorm(x))`` (the usual transformer block without its MLP):
the residual path keeps the stack trainable at depth (Table 12 grows the PAE to 5 such layers) and
the LayerNorm adds only ``2·d`` parameters per block.  In the PAE the final "Normalization" row of
Table 8 is then exactly the closing LayerNorm of a pre-norm stack.

Parameter counts at the paper's sizes (M=2048, Z=512, N=300, 4 heads), measured by
``tests/test_models.py``:

=====  ==========  =====================================  =========================================
model  this code   Table 8 / 12 layout (no extras)        difference
=====  ==========  =====================================  =========================================
PAE    4,467,712   4,201,984 (paper: 4.21M)               +262,656 log σ² head (Linear Z→Z), +3,072
                                                          pre-norm LayerNorms; +6.3 % in all
FRM    2,364,928   2,363,904 (paper: 2.36M)               +1,024 pre-norm LayerNorm
MTM    1,419,900   1,418,100 (paper: 1.44M)               +1,800 pre-norm LayerNorms; the paper's
                                                          1.44M sums per-layer counts rounded up
                                                          (0.37M per 300-d attention, exact 0.361M)
=====  ==========  =====================================  =========================================

Table 8 has no row for σ although eq. 1/3 output it; the PAE here computes ``log σ²`` with a linear
head parallel to the final LayerNorm (both read the output of the attention stack), the usual VAE
layout.  ``log σ²`` is clamped to [-30, 20] so ``exp`` cannot overflow in the KL term.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from mask.errors import MaskError

logger = logging.getLogger(__name__)

# log σ² is clamped to this range before it is used (exp(20) ≈ 4.9e8 stays finite in float32).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

PAE_FORMAT = "mask-pae"
PAE_FORMAT_VERSION = "1"
_PAE_SIZE_KEYS = ("feature_dim", "latent_dim", "num_heads", "num_layers")


class ModelInputError(MaskError, ValueError):
    """A model input of the wrong shape or dtype; the message names the input."""


class PAEFileError(MaskError, ValueError):
    """A PAE weight file that cannot be loaded as asked; the message names the file and what differs."""


def _check_divides(dim: int, num_heads: int, what: str) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ModelInputError(f"num_heads={num_heads} must be >= 1 and divide {what}={dim}")


def _check_inputs(x: Tensor, mask: Tensor, dim: int, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ModelInputError(f"{name} must be a (B, R, {dim}) tensor, got {shape}")
    if x.shape[-1] != dim:
        raise ModelInputError(f"{name} has last dimension {x.shape[-1]}, expected {dim}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ModelInputError(f"mask must be a bool tensor (True = real region), got "
                              f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ModelInputError(f"mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])} "
                              f"to match {name}")


def _key_padding_mask(mask: Tensor) -> Tensor:
    """Attention mask (True = ignore) from a region mask (True = real).

    Images with no real region attend to all slots (which are zero) instead of to none, which would
    give NaN; their outputs are zeroed afterwards anyway.
    """
    ignore = ~mask  # (B, R)
    empty = ~mask.any(dim=1, keepdim=True)  # (B, 1)
    return ignore & ~empty  # (B, R)


def _zero_padded(x: Tensor, mask: Tensor) -> Tensor:
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, R, D)


class SelfAttentionBlock(nn.Module):
    """Pre-norm residual self-attention over the regions of one image: ``x + MHA(LN(x))``.

    Args:
        dim: feature size d (``num_heads`` must divide it).
        num_heads: attention heads.
        dropout: dropout on the attention weights.
    """

    def __init__(self, dim: int, num_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        _check_divides(dim, num_heads, "dim")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        """Args: x (B, R, d); key_padding_mask (B, R) bool, True = ignore. Returns (B, R, d)."""
        h = self.norm(x)  # (B, R, d)
        a, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)  # (B, R, d)
        return x + a


class PAE(nn.Module):
    """Prototype-Aware Encoder h (eq. 1, 3): FC M→Z, ReLU, ``num_layers`` self-attention blocks, LayerNorm.

    ``mu`` is the LayerNorm output; a parallel linear head on the attention output gives ``log σ²``.

    Args:
        feature_dim: raw region feature size M.
        latent_dim: latent size Z.
        num_heads: attention heads (must divide Z).
        num_layers: self-attention blocks (Table 8: 3).
        dropout: attention dropout.
    """

    def __init__(self, feature_dim: int = 2048, latent_dim: int = 512, num_heads: int = 4,
                 num_layers: int = 3, dropout: float = 0.0):
        super().__init__()
        _check_divides(latent_dim, num_heads, "latent_dim")
        if num_layers < 0:
            raise ModelInputError(f"num_layers must be >= 0, got {num_layers}")
        self.sizes = {"feature_dim": int(feature_dim), "latent_dim": int(latent_dim),
                      "num_heads": int(num_heads), "num_layers": int(num_layers)}
        self.fc = nn.Linear(feature_dim, latent_dim)
        self.blocks = nn.ModuleList(SelfAttentionBlock(latent_dim, num_heads, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(latent_dim)
        self.logvar_head = nn.Linear(latent_dim, latent_dim)

    def forward(self, r: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encode the regions of each image.

        Args:
            r: raw region features (B, R, M).
            mask: (B, R) bool, True = real region.

        Returns:
            ``(mu, logvar)``, each (B, R, Z); zero at padded slots.
        """
        _check_inputs(r, mask, self.sizes["feature_dim"], "r")
        kpm = _key_padding_mask(mask)  # (B, R)
        x = torch.relu(self.fc(_zero_padded(r, mask)))  # (B, R, Z)
        for block in self.blocks:
            x = _zero_padded(block(x, kpm), mask)  # (B, R, Z)
        mu = _zero_padded(self.norm(x), mask)  # (B, R, Z)
        logvar = self.logvar_head(x).clamp(LOGVAR_MIN, LOGVAR_MAX)  # (B, R, Z)
        return mu, _zero_padded(logvar, mask)


class FRM(nn.Module):
    """Feature Restoration Module g (eq. 4): FC Z→Z, ReLU, self-attention block, FC Z→M.

    Its input is the reparameterised sample ``z = mu + sigma * eps``.

    Args:
        latent_dim: latent size Z.
        feature_dim: restored feature size M.
        num_heads: attention heads (must divide Z).
        dropout: attention dropout.
    """

    def __init__(self, latent_dim: int = 512, feature_dim: int = 2048, num_heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        _check_divides(latent_dim, num_heads, "latent_dim")
        self.latent_dim = int(latent_dim)
        self.fc_in = nn.Linear(latent_dim, latent_dim)
        self.block = SelfAttentionBlock(latent_dim, num_heads, dropout)
        self.fc_out = nn.Linear(latent_dim, feature_dim)

    def forward(self, z: Tensor, mask: Tensor) -> Tensor:
        """Args: z (B, R, Z); mask (B, R) bool. Returns the restored features r' (B, R, M), 0 at padding."""
        _check_inputs(z, mask, self.latent_dim, "z")
        kpm = _key_padding_mask(mask)  # (B, R)
        x = torch.relu(self.fc_in(_zero_padded(z, mask)))  # (B, R, Z)
        x = _zero_padded(self.block(x, kpm), mask)  # (B, R, Z)
        return _zero_padded(self.fc_out(x), mask)  # (B, R, M)


class MTM(nn.Module):
    """Modality Transfer Model f (eq. 7), Table 8 layout: FC Z→N, ReLU, SA, SA, FC, ReLU, SA, FC.

    Args:
        latent_dim: latent size Z.
        word_dim: word vector size N (``num_heads`` must divide it).
        num_heads: attention heads.
        dropout: attention dropout.
    """

    def __init__(self, latent_dim: int = 512, word_dim: int = 300, num_heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        _check_divides(word_dim, num_heads, "word_dim")
        self.latent_dim = int(latent_dim)
        self.fc1 = nn.Linear(latent_dim, word_dim)
        self.sa1 = SelfAttentionBlock(word_dim, num_heads, dropout)
        self.sa2 = SelfAttentionBlock(word_dim, num_heads, dropout)
        self.fc2 = nn.Linear(word_dim, word_dim)
        self.sa3 = SelfAttentionBlock(word_dim, num_heads, dropout)
        self.fc3 = nn.Linear(word_dim, word_dim)

    def forward(self, mu: Tensor, mask: Tensor) -> Tensor:
        """Args: mu (B, R, Z); mask (B, R) bool. Returns predicted word vectors w' (B, R, N), 0 at padding."""
        _check_inputs(mu, mask, self.latent_dim, "mu")
        kpm = _key_padding_mask(mask)  # (B, R)
        x = torch.relu(self.fc1(_zero_padded(mu, mask)))  # (B, R, N)
        x = _zero_padded(self.sa1(x, kpm), mask)  # (B, R, N)
        x = _zero_padded(self.sa2(x, kpm), mask)  # (B, R, N)
        x = torch.relu(self.fc2(x))  # (B, R, N)
        x = _zero_padded(self.sa3(x, kpm), mask)  # (B, R, N)
        return _zero_padded(self.fc3(x), mask)  # (B, R, N)


class PrototypeTable(nn.Module):
    """Learnable prototypes v_k used by L_cl (eq. 6) during training.

    Table 7 calls v_k "learnable", while eq. 2 defines the knowledge prototype as the mean of μ over
    a word's regions.  Both are used: this table is a training-time parameter (one row per vocabulary
    word, trained jointly with the PAE through L_cl); the **final** knowledge prototypes are the
    eq. 2 means computed in one pass after training (``mask.knowledge``), not these rows.
    Rows start as N(0, 1/Z) draws from the torch RNG.

    Args:
        num_words: vocabulary size V.
        latent_dim: latent size Z.
    """

    def __init__(self, num_words: int, latent_dim: int):
        super().__init__()
        if num_words < 1 or latent_dim < 1:
            raise ModelInputError(f"num_words and latent_dim must be >= 1, got {num_words}, {latent_dim}")
        self.weight = nn.Parameter(torch.randn(num_words, latent_dim) / latent_dim ** 0.5)  # (V, Z)

    def forward(self, ids: Tensor | None = None) -> Tensor:
        """Returns all rows (V, Z), or the rows of ``ids``."""
        return self.weight if ids is None else self.weight[ids]


class MaskNet(nn.Module):
    """PAE + FRM + MTM trained together (eq. 14).

    Args:
        feature_dim: M.  latent_dim: Z.  word_dim: N.
        num_heads: attention heads everywhere.  pae_layers: PAE attention blocks.  dropout: attention dropout.
    """

    def __init__(self, feature_dim: int, latent_dim: int, word_dim: int, num_heads: int = 4,
                 pae_layers: int = 3, dropout: float = 0.0):
        super().__init__()
        self.pae = PAE(feature_dim, latent_dim, num_heads, pae_layers, dropout)
        self.frm = FRM(latent_dim, feature_dim, num_heads, dropout)
        self.mtm = MTM(latent_dim, word_dim, num_heads, dropout)

    def forward(self, r: Tensor, mask: Tensor, sample: bool = True) -> dict[str, Tensor]:
        """Run all three models.

        Args:
            r: raw region features (B, R, M).
            mask: (B, R) bool, True = real region.
            sample: draw ``z = mu + exp(logvar/2) * eps`` with ``eps ~ N(0, I)`` from the torch RNG
                (training); False uses ``z = mu``.

        Returns:
            ``{"mu", "logvar", "z"}`` (B, R, Z), ``"r_rec"`` (B, R, M), ``"w_pred"`` (B, R, N);
            all zero at padded slots.
        """
        mu, logvar = self.pae(r, mask)  # (B, R, Z)
        if sample:
            eps = torch.randn_like(mu)  # (B, R, Z)
            z = _zero_padded(mu + torch.exp(0.5 * logvar) * eps, mask)  # (B, R, Z)
        else:
            z = mu
        r_rec = self.frm(z, mask)  # (B, R, M)
        w_pred = self.mtm(mu, mask)  # (B, R, N)
        return {"mu": mu, "logvar": logvar, "z": z, "r_rec": r_rec, "w_pred": w_pred}


def build_model(cfg) -> MaskNet:
    """Build a :class:`MaskNet` from a :class:`mask.config.ModelConfig`."""
    return MaskNet(feature_dim=cfg.feature_dim, latent_dim=cfg.latent_dim, word_dim=cfg.word_dim,
                   num_heads=cfg.num_heads, pae_layers=cfg.pae_layers, dropout=cfg.dropout)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------
# PAE weights for inference: safetensors with the sizes in its metadata.


def save_pae(pae: PAE, path: str | Path | io.IOBase | None = None) -> bytes:
    """Serialise a PAE to safetensors (state dict; sizes and format tag in the metadata).

    Args:
        pae: the encoder.
        path: optional local file path or writable binary file object to write to as well.

    Returns:
        The safetensors bytes (what was written).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in pae.state_dict().items()}
    # One metadata entry holding sorted JSON: safetensors keeps metadata in a hash map, so several
    # entries would be written in varying order and the same weights would give different bytes.
    info = {"format_version": PAE_FORMAT_VERSION, **pae.sizes}
    data = save(tensors, metadata={PAE_FORMAT: json.dumps(info, sort_keys=True)})
    if isinstance(path, (str, Path)):
        Path(path).write_bytes(data)
    elif path is not None:
        path.write(data)
    return data


def _read_metadata(data: bytes, name: str) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header whose optional
    # "__metadata__" entry holds str → str pairs.  The Python API only reads it from files.
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as e:
        raise PAEFileError(f"{name}: not a safetensors file ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta or {})


def load_pae(data: bytes | str | Path, expect: Mapping[str, int] | None = None, *,
             name: str | None = None, dropout: float = 0.0) -> PAE:
    """Load a PAE saved by :func:`save_pae`.

    Args:
        data: the safetensors bytes, or a local file path.
        expect: sizes the caller needs (any of ``feature_dim``, ``latent_dim``, ``num_heads``,
            ``num_layers``); a file with other sizes is refused.
        name: how to name the file in errors (default: the path, or ``"<bytes>"``).
        dropout: attention dropout of the rebuilt module (not stored; irrelevant in eval mode).

    Returns:
        The PAE in eval mode.

    Raises:
        PAEFileError: not a PAE file, sizes differ from ``expect``, or tensors missing, unexpected or
            of the wrong shape — the message names the file, the keys and the shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    if isinstance(data, (str, Path)):
        name = name or str(data)
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise PAEFileError(f"{name}: cannot read ({e})") from None
    name = name or "<bytes>"
    meta = _read_metadata(data, name)
    if PAE_FORMAT not in meta:
        raise PAEFileError(f"{name}: no {PAE_FORMAT!r} metadata entry (not written by mask.models.save_pae)")
    try:
        info = json.loads(meta[PAE_FORMAT])
        version = str(info.get("format_version"))
        sizes = {k: int(info[k]) for k in _PAE_SIZE_KEYS}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise PAEFileError(f"{name}: {PAE_FORMAT!r} metadata is malformed ({e!r})") from None
    if version != PAE_FORMAT_VERSION:
        raise PAEFileError(f"{name}: format_version {version!r} is not supported "
                           f"(expected {PAE_FORMAT_VERSION!r})")
    for key, want in (expect or {}).items():
        if key not in sizes:
            raise PAEFileError(f"{name}: unknown expected size {key!r} (known: {', '.join(_PAE_SIZE_KEYS)})")
        if sizes[key] != int(want):
            raise PAEFileError(f"{name}: {key} is {sizes[key]} in the file, expected {int(want)}")
    try:
        tensors = load(data)
    except SafetensorError as e:
        raise PAEFileError(f"{name}: corrupt safetensors data ({e})") from None
    pae = PAE(**sizes, dropout=dropout)
    own = pae.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong))
        raise PAEFileError(f"{name}: does not match a PAE with sizes {sizes}: " + ", ".join(parts))
    pae.load_state_dict(tensors, strict=True)
    return pae.eval()
