"""A learnable score per rank on an existing PEFT LoRA layer, without touching PEFT's code.

PEFT computes vanilla LoRA as ``lora_B(lora_A(dropout(x))) * scaling``. A forward hook on
``lora_A`` multiplies its output by ``w = r · softmax(s / T)`` (broadcast over the rank axis),
which is exactly ``scaling · B (w ⊙ (A x))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from beamlora.errors import BeamLoraError
from rankscope.tasks.layers import lora_layers

# The scores live in one ParameterList on the model itself, outside PEFT's tuner layers: PEFT
# saves every parameter of a tuner layer (and older releases every name containing "lora_"), and
# the exported adapter must stay a plain LoRA adapter.
SCORES_ATTR = "beam_scores"


def rank_weights(score: torch.Tensor, temperature: float) -> torch.Tensor:
    """``w = r · softmax(s / T)``, written as ``e / mean(e)`` so that s = 0 gives w = 1 exactly."""
    # The max only guards exp against overflow; detached, it adds nothing to the backward pass.
    e = torch.exp((score - score.detach().max()) / temperature)
    return e / e.mean()


@dataclass
class ScoredLayer:
    """One LoRA layer of the active adapter (as :class:`rankscope.tasks.layers.LoraLayer` finds it) with BeamLoRA's
    score vector and the hook that applies it."""

    name: str  # module path as PEFT's adapter file names it, e.g. base_model.model.…query
    module: nn.Module  # the PEFT LoraLayer
    adapter: str
    temperature: float
    store: nn.ParameterList = field(repr=False)  # the model's beam_scores; this layer's score is entry ``index``
    index: int
    rank_axis: int  # axis of lora_A's output that indexes ranks: -1 for Linear, 1 for Conv
    _handle: Any = field(default=None, repr=False)

    @property
    def score(self) -> nn.Parameter:
        """The score vector s (r,), looked up on the model each time: FSDP2 replaces parameters with sharded ones
        (and, inside the forward pass, with the gathered ones), so no reference to one of them is kept."""
        return self.store[self.index]

    @property
    def rank(self) -> int:
        return self.score.shape[0]

    @property
    def A(self) -> nn.Parameter:
        """lora_A weight: (r, in) for Linear, (r, in, *kernel) for Conv; rank i is row i."""
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:
        """lora_B weight: (out, r[, 1, …]); rank i is column i."""
        return self.module.lora_B[self.adapter].weight

    def weights(self) -> torch.Tensor:
        return rank_weights(self.score, self.temperature)

    def folded_A(self) -> torch.Tensor:
        """diag(w) A: the plain LoRA A that gives this layer's outputs without the hook."""
        with torch.no_grad():
            w = self.weights().to(self.A.dtype)
            return self.A * w.view(-1, *([1] * (self.A.dim() - 1)))

    def _scale_output(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        w = self.weights().to(output.dtype)
        if self.rank_axis != -1:
            w = w.view(-1, *([1] * (output.dim() - 1 - self.rank_axis)))
        return output * w

    def install(self) -> None:
        self._handle = self.module.lora_A[self.adapter].register_forward_hook(self._scale_output)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _rank_axis(lora_A: nn.Module, name: str) -> int:
    if isinstance(lora_A, nn.Linear):
        return -1
    if isinstance(lora_A, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return 1
    raise BeamLoraError(f"{name}: lora_A is a {type(lora_A).__name__}, expected nn.Linear or nn.Conv (BeamLoRA "
                        "supports LoRA on Linear, GPT-2 Conv1D and Conv layers)")


def add_scores(model: nn.Module, temperature: float) -> list[ScoredLayer]:
    """Give every LoRA layer of the active adapter a zero score vector and the forward hook.

    The layers are those of rankscope's walker (:func:`rankscope.tasks.layers.lora_layers`), the same the
    monitor records and the sweeps mask.
    """
    adapter = getattr(model, "active_adapter", None)
    if not isinstance(adapter, str):
        raise BeamLoraError(f"model has active adapter {adapter!r}; expected a PeftModel with one active LoRA "
                            "adapter (get_peft_model(model, LoraConfig(...)))")
    if SCORES_ATTR in model._modules:
        raise BeamLoraError(f"{type(model).__name__} already has BeamLoRA scores; attach once per model")
    store = nn.ParameterList()
    layers: list[ScoredLayer] = []
    for found in lora_layers(model):
        if found.adapter != adapter:
            continue
        name, module = found.name, found.module
        if found.layer_type == "embedding":
            raise BeamLoraError(f"{name}: embedding LoRA found, expected LoRA on Linear or Conv layers "
                                "(leave embeddings out of target_modules for BeamLoRA)")
        if adapter in getattr(module, "lora_variant", {}):
            variant = type(module.lora_variant[adapter]).__name__
            raise BeamLoraError(f"{name}: LoRA variant {variant} found, expected vanilla LoRA "
                                "(BeamLoRA does not combine with DoRA or other variants)")
        lora_A = module.lora_A[adapter]
        weight = lora_A.weight
        score = nn.Parameter(torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device))
        store.append(score)
        layer = ScoredLayer(name=name, module=module, adapter=adapter, temperature=temperature, store=store,
                            index=len(store) - 1,
                            rank_axis=_rank_axis(lora_A, name))
        layer.install()
        layers.append(layer)
    if not layers:
        raise BeamLoraError(f"no LoRA layers for adapter {adapter!r} found in {type(model).__name__}; expected a "
                            "PeftModel made with get_peft_model(model, LoraConfig(...))")
    model.add_module(SCORES_ATTR, store)  # so model.parameters() (and any optimizer built from it) holds them
    return layers
