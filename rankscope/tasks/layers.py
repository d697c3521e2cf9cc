"""The LoRA layers of a live model: the one walker over a PEFT model, used by the monitor, the sweeps and BeamLoRA.

A :class:`LoraLayer` is one active LoRA update inside a model (Linear, GPT-2 Conv1D, Conv,
Embedding; DoRA and AdaLoRA included) with 2-D views of its factors. A :class:`rankscope.io.formats.LoraModule`
is the same update read from a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rankscope.errors import RankscopeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


@dataclass
class LoraLayer:
    """One LoRA update inside a live model: 2-D views (sharing storage) of A (r, in) and B (out, r)."""

    name: str  # as the model names it (named_modules), with [adapter] when several are active; PEFT's files agree
    module: Any  # the layer holding lora_A / lora_B
    adapter: str | None  # None: a hand-written layer whose lora_A / lora_B are the weights themselves
    A: "torch.Tensor"
    B: "torch.Tensor"
    scale: float
    layer_type: str = "linear"  # "linear", "conv" or "embedding"
    dora: bool = False
    E: "torch.Tensor | None" = None  # AdaLoRA's singular values (r,)
    ranknum: "torch.Tensor | None" = None  # AdaLoRA divides the update by ranknum + 1e-5

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def unwrap_model(model: Any) -> Any:
    """The model inside DDP / DataParallel / torch.compile wrappers."""
    for _ in range(8):
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        elif "_orig_mod" in getattr(model, "_modules", {}):
            model = model._orig_mod
        else:
            break
    return model


def _tensor(holder: Any, adapter: str | None) -> "torch.Tensor | None":
    """The weight tensor behind PEFT's ModuleDict/ParameterDict entry, a module's .weight, or a tensor."""
    import torch

    if isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
        if adapter is None or adapter not in holder:
            return None
        holder = holder[adapter]
    if isinstance(holder, torch.nn.Module):
        holder = getattr(holder, "weight", None)
    return holder.detach() if isinstance(holder, torch.Tensor) else None


def _adapter_names(module: Any) -> list[str | None]:
    import torch

    names: list[str | None] = []
    for attr, _ in _PAIRS:
        holder = getattr(module, attr, None)
        if isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
            names += [n for n in holder.keys() if n not in names]
    if not names and isinstance(getattr(module, "lora_A", None), torch.Tensor):
        names = [None]  # a hand-written LoRA layer: lora_A / lora_B are the weights themselves
    return names


def lora_layers(model: Any, strict: bool = False) -> list[LoraLayer]:
    """Every active LoRA update of ``model`` (a PeftModel, or any model whose layers carry lora_A / lora_B).

    ``strict`` (for code that edits the weights in place, as the sweeps do) refuses a merged layer and a
    pair that does not chain or whose 2-D views would be copies; otherwise such a layer is passed over.
    """
    found = []
    for name, module in unwrap_model(model).named_modules():
        adapters = _adapter_names(module)
        if not adapters:
            continue
        active = getattr(module, "active_adapters", None)
        if isinstance(active, (list, tuple)):
            adapters = [a for a in adapters if a in active] or adapters
        for adapter in adapters:
            for attr_a, attr_b in _PAIRS:
                A, B = _tensor(getattr(module, attr_a, None), adapter), _tensor(getattr(module, attr_b, None), adapter)
                if A is not None and B is not None:
                    break
            else:
                continue
            if strict and getattr(module, "merged", False):
                raise RankscopeError(f"the LoRA update of {name} is merged into its base weights, so ranks cannot be "
                                     "zeroed: expected an unmerged adapter (call unmerge_adapter() first)")
            # Conv LoRA: A (r, in, kh, kw) -> (r, in·kh·kw), B (out, r, 1, 1) -> (out, r); views keep the storage.
            chains = A.dim() >= 2 and B.dim() >= 2
            A2, B2 = (A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)) if chains else (A, B)
            chains = chains and B2.shape[1] == A2.shape[0]
            if not chains or (strict and A2.data_ptr() != A.data_ptr()):
                if strict:
                    raise RankscopeError(f"{name} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, which do not "
                                         "chain: expected A (r, in) and B (out, r)")
                continue
            scaling = getattr(module, "scaling", 1.0)
            scale = scaling.get(adapter, 1.0) if isinstance(scaling, dict) else scaling
            magnitude = getattr(module, "lora_magnitude_vector", None)
            E = _tensor(getattr(module, "lora_E", None), adapter)
            found.append(LoraLayer(
                name=name if len(adapters) == 1 or adapter is None else f"{name}[{adapter}]", module=module,
                adapter=adapter, A=A2, B=B2, scale=float(scale),
                layer_type="embedding" if attr_a == "lora_embedding_A" else "conv" if A.dim() > 2 else "linear",
                dora=magnitude is not None and adapter is not None and adapter in magnitude,
                E=None if E is None else E.reshape(-1), ranknum=_tensor(getattr(module, "ranknum", None), adapter)))
    return found


__all__ = ["LoraLayer", "lora_layers", "unwrap_model"]
