"""Argument checks and output buffers shared by every op's public wrapper.

Each check raises a clear error that names the argument and says what was expected (``TypeError``
for a wrong type or dtype, ``ValueError`` for a wrong shape, device or value), before any backend is
chosen: no kernel ever sees input the op's contract excludes. The C++ kernels check again on their
own (csrc/common.h), since they can be called directly.

Also here: the dtypes the kernels take, the code-count limit of the quantizer kernels, and
:func:`new_output`, the buffer a kernel fills (poisoned first under ``VQKERNELS_POISON_OUTPUTS=1``,
so a kernel that leaves an element unwritten fails its tests instead of returning stale memory).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the cpu/triton/cuda kernels take
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)  # the torch reference also takes float64 (gradcheck)
MAX_CODES = 2**31 - 1  # the quantizer kernels keep code indices in int32 registers

_COUNT = {1: "one", 2: "two", 3: "three", 4: "four"}


def _dims_word(n: int) -> str:
    return f"{_COUNT.get(n, n)} dimension" + ("s" if n != 1 else "")


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def _dtype_words(dtypes) -> str:
    """``int64 (torch.long)``, ``float32 or float16``: how a message asks for a dtype."""
    words = [str(d).replace("torch.", "") + (" (torch.long)" if d == torch.int64 else "") for d in dtypes]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def check_tensor(
    t,
    name: str,
    *,
    dims: int | None = None,
    min_dims: int | None = None,
    layout: str = "",
    floating: bool | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    device_of: str = "",
) -> torch.Tensor:
    """Check that ``t`` (called ``name`` in messages) is a tensor of the expected kind; return it.

    dims / min_dims: its exact / least number of dimensions; ``layout`` names them in the message
    (``"(K, D)"``, ``"(..., D)"``). floating: True to require a floating-point dtype. dtype: a dtype
    or a tuple of allowed dtypes. device: where it must live; ``device_of`` names what fixed that
    device (``"z"``: "indices must be on the device of z (cpu)").
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    lay = f" {layout}" if layout else ""
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D{lay}, got shape {tuple(t.shape)}")
    if min_dims is not None and t.dim() < min_dims:
        got = "a 0-d tensor" if t.dim() == 0 else f"shape {tuple(t.shape)}"
        raise ValueError(f"{name} must have at least {_dims_word(min_dims)}{lay}, got {got}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            raise TypeError(f"{name} must be {_dtype_words(allowed)}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        where = f"the device of {device_of} ({device})" if device_of else f"{device}"
        raise ValueError(f"{name} must be on {where}, got {t.device}")
    return t


def check_same_dtype(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{names[0]} and {names[1]} must share a dtype, got {names[0]} {a.dtype} and "
                        f"{names[1]} {b.dtype}")


def check_same_device(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on one device, got {names[0]} on {a.device} and "
                         f"{names[1]} on {b.device}")


def check_shape(t: torch.Tensor, name: str, shape: Sequence[int], what: str = "") -> None:
    """``t.shape == shape``; ``what`` says where the expected shape comes from (``"z.shape[:-1]"``, ``"(K,)"``)."""
    if tuple(t.shape) != tuple(shape):
        src = f"{what} = " if what else ""
        raise ValueError(f"{name} must have shape {src}{tuple(shape)}, got {tuple(t.shape)}")


def check_vectors_and_codebook(x, codebook, name: str = "x") -> None:
    """Vectors ``x`` (..., D) and a codebook (K, D): tensors, floating point, one dtype and device, K >= 1."""
    check_tensor(x, name)
    check_tensor(codebook, "codebook", dims=2, layout="(K, D)")
    check_tensor(x, name, min_dims=1, layout="(..., D)", floating=True)
    check_tensor(codebook, "codebook", floating=True)
    check_same_dtype(x, codebook, (name, "codebook"))
    check_same_device(x, codebook, (name, "codebook"))
    if x.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"the last dimension of {name} ({x.shape[-1]}) must equal the codebook's code dimension D "
            f"({codebook.shape[1]}); {name} has shape {tuple(x.shape)}, codebook {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code, got K=0")


def check_indices(indices, shape: Sequence[int], device: torch.device, what: str = "z.shape[:-1]") -> None:
    """Code indices: int64, of ``shape`` (named ``what`` in the message), on ``device``."""
    check_tensor(indices, "indices", dtype=torch.int64)
    check_shape(indices, "indices", shape, what)
    check_tensor(indices, "indices", device=device, device_of=what.split(".")[0] if what else "")


def check_num_codes(num_codes) -> None:
    if isinstance(num_codes, bool) or not isinstance(num_codes, int):
        raise TypeError(f"num_codes must be an int, got {type(num_codes).__name__}")
    if not 1 <= num_codes <= MAX_CODES:
        raise ValueError(f"num_codes must be in [1, {MAX_CODES}], got {num_codes}")


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_range(value, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """``lo <= float(value) <= hi`` (either bound may be None); returns the float. NaN fails."""
    v = float(value)
    ok = (lo is None or v >= lo) and (hi is None or v <= hi) and v == v
    if not ok:
        want = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                else f">= {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{name} must be {want}, got {value}")
    return v


def dtype_reasons(dtype: torch.dtype, allowed) -> list[str]:
    """Why a kernel that takes ``allowed`` cannot take ``dtype`` (empty: it can)."""
    if dtype not in allowed:
        return [f"dtype {dtype} is not one of {_dtype_names(allowed)}"]
    return []


# ---------------------------------------------------------------------------------------------
# Output buffers.

def poison_outputs() -> bool:
    """True under VQKERNELS_POISON_OUTPUTS=1 (the tests set it); read per call, it is cheap."""
    return os.environ.get("VQKERNELS_POISON_OUTPUTS", "0") not in ("", "0")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with values no kernel writes (NaN, or -0x7EADBEEF for integers); returns ``t``."""
    return t.fill_(float("nan") if t.dtype.is_floating_point else -0x7EADBEEF)


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer for a kernel to fill; poisoned first under VQKERNELS_POISON_OUTPUTS=1."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs():
        poison_(t)
    return t


def sync_index_check() -> bool:
    """True under VQKERNELS_SYNC_INDEX_CHECK=1: index ranges on CUDA tensors are read back to the host and a bad
    index raises IndexError (one sync per op: for debugging), instead of a device-side assert without a sync.
    Read per call (tests toggle it)."""
    return os.environ.get("VQKERNELS_SYNC_INDEX_CHECK", "0") not in ("", "0")


def check_index_range(indices: torch.Tensor, num_codes: int) -> None:
    """IndexError when an index lies outside [0, num_codes).

    It reads the values (on a GPU: one min/max read back to the host, which waits for the stream), so the ops
    call it inside their bodies, not in the public wrappers' static checks; the Triton launchers check CUDA
    tensors on the device instead (ops/_triton_index.py)."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_codes:
        bad = lo if lo < 0 else hi
        raise IndexError(f"indices out of range: got index {bad}, codes are numbered 0..{num_codes - 1} "
                         f"(K={num_codes})")
