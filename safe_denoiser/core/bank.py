"""``NegativeBank``: unsafe datapoints in the model's sample space, stored as safetensors.

A bank is a constant: its squared norms (the kernel's ||y_n||^2 term) are computed once, in the same chunked pass
that checks it is finite, and held beside it. It may be stored in float16 / bfloat16 (half the bytes to read; the
kernel accumulates in float32), and a file may be memory-mapped instead of read, so a bank larger than memory is
streamed from the page cache chunk by chunk.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from safe_denoiser.core.kernel import bank_sq_norms
from safe_denoiser.files import atomic_write

__all__ = [
    "IMAGE_SUFFIXES",
    "BankError",
    "NegativeBank",
    "l2_normalize_positions",
    "load_image_folder",
    "nearest_neighbour_distance",
]

TENSOR_KEY = "bank"
FORMAT = "safe-denoiser.negative-bank/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHECK_ROWS = 1024  # rows per chunk when bad items are counted or the bank is hashed
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class BankError(ValueError):
    """A negative bank that cannot be used: empty, non-finite, wrong shape or dtype, unreadable file."""


def nearest_neighbour_distance(bank: Tensor, max_items: int = 2048) -> float:
    """Median over bank items of the L2 distance to the nearest other item (the first ``max_items`` items)."""
    if bank.shape[0] < 2:
        raise ValueError(f"a nearest-neighbour distance needs at least 2 bank items, got {bank.shape[0]}")
    y = bank[:max_items].reshape(min(bank.shape[0], max_items), -1).double()
    d2 = (y.square().sum(1, keepdim=True) + y.square().sum(1) - 2.0 * (y @ y.T)).clamp_min(0.0)
    d2.fill_diagonal_(math.inf)
    return float(d2.min(dim=1).values.sqrt().median())


def l2_normalize_positions(latents: Tensor, eps: float = 1e-12) -> Tensor:
    """Divide each spatial position's channel vector (dim 1) by its L2 norm, as the reference code does."""
    return latents / latents.norm(dim=1, keepdim=True).clamp_min(eps)


# The kernel computes ||x - y||^2 as ||x||^2 + ||y||^2 - 2 x.y in float32, whose rounding is about one ulp of the
# largest term, eps32 * ||y||^2. Diffusion sample spaces are unit-scale (the noise is N(0, I), so ||x||^2 ~ D for
# D elements): once eps32 * ||y||^2 exceeds D, the rounding is larger than the whole sample, every distance is the
# same noise and the correction is a no-op that still reports firing. So ||y||^2 / D (the mean square per element)
# must stay below 1 / eps32 = 2^23, i.e. an RMS below ~2.9e3 -- orders beyond any latent or pixel bank (|y| <~ 10).
MAX_MEAN_SQUARE = 1.0 / torch.finfo(torch.float32).eps


def _check_magnitude(sq_norms: Tensor, size: int) -> None:
    """Raise ``BankError`` when some item's mean square per element makes float32 kernel distances meaningless."""
    worst = float(sq_norms.max()) / max(size, 1)
    if worst >= MAX_MEAN_SQUARE:
        raise BankError(
            f"bank values are too large for float32 kernel distances: an item's mean square per element is "
            f"{worst:.3g}, expected below {MAX_MEAN_SQUARE:.3g} (an RMS below {MAX_MEAN_SQUARE**0.5:.3g}); the bank "
            "must be in the model's unit-scale sample space (rescale it, e.g. by the VAE's scaling factor)"
        )


def _data_key(d: Tensor) -> tuple[object, ...]:
    """Identifies one version of a tensor's values (inference-mode tensors, as Lightning's predict makes, keep no
    version counter: their key is their storage, shape and dtype only)."""
    version = None if d.is_inference() else d._version
    return (d.data_ptr(), version, tuple(d.shape), d.dtype, d.device)


@dataclass
class NegativeBank:
    """N unsafe datapoints ``data`` (N, *sample_shape) plus string metadata (encoder, normalisation, source)."""

    data: Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    _norms: tuple[tuple[object, ...], Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def sq_norms(self) -> Tensor:
        """(N,) squared norms ||x^(n)||^2 in the kernel's accumulation dtype, computed once per version of ``data``."""
        key = _data_key(self.data)
        if self._norms is None or self._norms[0] != key:
            self._norms = (key, bank_sq_norms(self.data))
        return self._norms[1]

    # ---- properties -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    # ---- checks -----------------------------------------------------------------------------------
    def validate(self, sample_shape: Sequence[int] | None = None) -> NegativeBank:
        """Raise ``BankError`` naming the problem; returns self so calls chain."""
        d = self.data
        if not isinstance(d, Tensor):
            raise BankError(f"bank data must be a torch.Tensor, got {type(d).__name__}")
        if d.dtype not in _FLOAT_DTYPES:
            raise BankError(f"bank dtype must be a floating type (float16/bfloat16/float32/float64), got {d.dtype}")
        if d.dim() < 2:
            raise BankError(f"bank must be (N, *sample_shape) with at least 2 dimensions, got shape {tuple(d.shape)}")
        if d.shape[0] == 0:
            raise BankError("bank is empty (N = 0): it needs at least one unsafe datapoint")
        if not bool(torch.isfinite(self.sq_norms).all()):  # one chunked pass: no bank-sized boolean temporary
            bad = sum(int((~torch.isfinite(c)).flatten(1).any(dim=1).sum()) for c in d.split(CHECK_ROWS))
            if bad:
                raise BankError(f"bank has non-finite values (NaN or inf) in {bad} of {d.shape[0]} items")
            raise BankError("bank values are too large: their squared norms overflow float32 (rescale the bank)")
        _check_magnitude(self.sq_norms, d[0].numel())
        if sample_shape is not None and tuple(sample_shape) != self.sample_shape:
            raise BankError(
                f"bank item shape {self.sample_shape} does not match the model's sample shape {tuple(sample_shape)}"
            )
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise BankError("bank metadata must map str to str")
        return self

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_tensor(cls, data: Tensor, **metadata: str) -> NegativeBank:
        """Wrap a (N, ...) tensor; metadata values are stored as strings."""
        meta = {"source": "tensor", **{k: str(v) for k, v in metadata.items()}}
        return cls(data.detach().contiguous(), meta)

    @classmethod
    def from_images(
        cls,
        images: Iterable[Tensor],
        encoder: Callable[[Tensor], Tensor],
        batch_size: int = 8,
        progress: bool = True,
        total: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> NegativeBank:
        """Encode images (each (3, H, W) in [-1, 1]) in batches through ``encoder`` with a progress bar."""
        from tqdm.auto import tqdm

        if batch_size <= 0:
            raise BankError(f"batch_size must be a positive int, got {batch_size}")
        encoded: list[Tensor] = []
        batch: list[Tensor] = []
        with torch.no_grad(), tqdm(total=total, desc="encoding bank", unit="img", disable=not progress) as bar:
            for img in images:
                batch.append(img)
                if len(batch) == batch_size:
                    encoded.append(encoder(torch.stack(batch)).float().cpu())
                    bar.update(len(batch))
                    batch = []
            if batch:
                encoded.append(encoder(torch.stack(batch)).float().cpu())
                bar.update(len(batch))
        if not encoded:
            raise BankError("no images to encode: the bank would be empty")
        data = torch.cat(encoded)
        meta = {"source": "images", **{k: str(v) for k, v in (metadata or {}).items()}}
        return cls(data, meta)

    # ---- storage ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file in the same folder, then rename) as safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT,
            count=str(len(self)),
            sample_shape=json.dumps(list(self.sample_shape)),
            dtype=str(self.data.dtype).removeprefix("torch."),
        )
        tensors = {TENSOR_KEY: self.data.contiguous().cpu()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        sample_shape: Sequence[int] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        mmap: bool = False,
    ) -> NegativeBank:
        """Load and validate a bank written by ``save`` (safetensors only: no pickle is ever read).

        With ``mmap=True`` (CPU, no ``dtype`` change) the tensor is a read-only memory map of the file: nothing is
        copied, pages are read on demand and belong to the page cache, so banks larger than memory work; validation
        and the squared norms cost one streaming pass. Do not modify such a bank in place (the map is read-only).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise BankError(f"bank file {str(path)!r} does not exist or is not a file")
        if mmap and (str(device) != "cpu" or dtype is not None):
            raise BankError(
                "NegativeBank.load: mmap=True maps the file as stored; it needs device='cpu' and dtype=None"
            )
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                keys = list(f.keys())
                if TENSOR_KEY not in keys:
                    raise BankError(f"bank file {str(path)!r} has no tensor named {TENSOR_KEY!r} (found {keys})")
                data = _mapped_tensor(path) if mmap else f.get_tensor(TENSOR_KEY)
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
            raise BankError(f"bank file {str(path)!r} is not a readable safetensors file: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise BankError(f"bank file {str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("count") != str(data.shape[0]) or meta.get("sample_shape") != json.dumps(list(data.shape[1:])):
            raise BankError(
                f"bank file {str(path)!r}: header says count={meta.get('count')} "
                f"sample_shape={meta.get('sample_shape')} but the tensor is {tuple(data.shape)}"
            )
        try:
            bank = cls(data, meta).validate(sample_shape)
        except BankError as exc:
            raise BankError(f"bank file {str(path)!r}: {exc}") from None
        if dtype is not None or str(device) != "cpu":
            bank = bank.to(device=device, dtype=dtype)
        return bank

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> NegativeBank:
        """A copy on another device/dtype (metadata kept; the norms move with it unless the dtype changes)."""
        data = self.data.to(device=device, dtype=dtype)
        if data.dtype != self.data.dtype:
            return NegativeBank(data, dict(self.metadata))  # rounded values: new norms, new check
        bank = NegativeBank.__new__(NegativeBank)
        bank.data, bank.metadata = data, dict(self.metadata)
        norms = self.sq_norms.to(data.device)
        bank._norms = (_data_key(data), norms)
        return bank

    def sha256(self) -> str:
        """Hash of the float32 little-endian bytes: identifies the bank across files and graphs."""
        import hashlib

        digest = hashlib.sha256()
        for part in self.data.split(CHECK_ROWS):  # chunk by chunk: the same bytes, no bank-sized copy
            digest.update(part.float().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()


def _mapped_tensor(path: Path) -> Tensor:
    """The bank tensor of a safetensors file as a read-only memory map (header parsed as JSON: no code, no pickle)."""
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        entry = json.loads(fh.read(header_len))[TENSOR_KEY]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise BankError(
                f"bank file {str(path)!r}: dtype {entry['dtype']} is not one of {list(_SAFETENSORS_DTYPES)}"
            )
        begin, end = (int(v) for v in entry["data_offsets"])
        shape = [int(v) for v in entry["shape"]]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        # MAP_SHARED + PROT_READ: no commit charge however large the file; the mapping lives as long as the tensor.
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + header_len + begin)
    return flat.reshape(shape)


def load_image_folder(folder: str | os.PathLike[str], size: int) -> tuple[list[Path], Callable[[], Iterable[Tensor]]]:
    """The sorted image files of a folder and a generator of (3, size, size) tensors in [-1, 1]."""
    import numpy as np
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise BankError(f"image folder {str(root)!r} is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BankError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def images() -> Iterable[Tensor]:
        for p in files:
            try:
                with Image.open(p) as im:
                    arr = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
            except OSError as exc:
                raise BankError(f"cannot read image {str(p)!r}: {exc}") from exc
            yield torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    return files, images
