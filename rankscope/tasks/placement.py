"""Where and in what precision an evaluation runs: ``--device``, ``--precision`` and ``--batch-size``.

Resolved and checked before any model loads, so a bad choice costs one ``Error:`` line, not a load.
``fp16`` on a CPU is refused: PyTorch's CPU kernels for float16 matrix products are slow (many fall back
to scalar code) and float16's narrow range overflows without the loss scaling a GPU run would use;
``bf16`` runs on any CPU. torch is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rankscope.errors import RankscopeError
from rankscope.tasks.models import DTYPES, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = tuple(DTYPES)


@dataclass(frozen=True)
class Placement:
    """A resolved choice: ``device`` is ``cpu``, ``cuda`` or ``mps``; ``batch_size`` None keeps each metric's own."""

    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int | None = None

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtype(self.precision)

    def describe(self) -> str:
        return f"{self.device}, {self.precision}" + (f", batch {self.batch_size}" if self.batch_size else "")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_placement(device: str | None = "auto", precision: str | None = "fp32",
                      batch_size: Any = None) -> Placement:
    """Check the three options and pick the device for ``auto`` (CUDA, then MPS, then the CPU).

    Raises a one-line :class:`RankscopeError` for an unknown value, ``cuda``/``mps`` where there is none,
    ``bf16`` on a CUDA device without bfloat16, ``fp16`` on the CPU, or a batch size that is not a positive integer.
    """
    import torch

    device = (device or "auto").strip().lower()
    precision = (precision or "fp32").strip().lower()
    if device not in DEVICES:
        raise RankscopeError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise RankscopeError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise RankscopeError(f"--batch-size {batch_size!r}: expected a whole number of examples, at least 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RankscopeError("--device cuda: this PyTorch sees no CUDA device (torch.cuda.is_available() is False): "
                             "expected a CUDA GPU and a CUDA build of torch, or --device cpu")
    elif device == "mps" and not _mps_available():
        raise RankscopeError("--device mps: Apple's Metal backend is not available here "
                             "(torch.backends.mps.is_available() is False): expected a Mac with MPS, or --device cpu")
    if precision == "fp16" and device == "cpu":
        raise RankscopeError("--precision fp16 on the CPU: float16 matrix products there are slow and overflow "
                             "easily; expected --precision bf16 or fp32 on the CPU (fp16 is for GPUs)")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise RankscopeError(f"--precision bf16: the CUDA device {torch.cuda.get_device_name()} has no bfloat16 "
                             "support: expected --precision fp16 or fp32 on it")
    return Placement(device, precision, batch_size)
