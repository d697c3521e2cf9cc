"""Write plain PEFT adapters (with BeamLoRA's w folded into A) and run snapshots, atomically."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from beamlora.files import as_open_gives, writing
from beamlora.layer import SCORES_ATTR, ScoredLayer, rank_weights
from rankscope.constants import SCORES_FILE
from rankscope.io.atomic import atomic_dir
from rankscope.tasks import sharded


def snapshot_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"step-{step:06d}"


def is_main_process() -> bool:
    """Only rank 0 writes files in a distributed run."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def folded(layers: Sequence[ScoredLayer]) -> Iterator[None]:
    """Temporarily hold diag(w) A in every lora_A, so PEFT's own save writes a plain adapter.

    The original A is copied back afterwards, bit for bit.
    """
    originals = [layer.A.detach().clone() for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.A.copy_(layer.folded_A())
        yield
    finally:
        with torch.no_grad():
            for layer, original in zip(layers, originals):
                layer.A.copy_(original)


def write_adapter(model: nn.Module, path: str | os.PathLike, layers: Sequence[ScoredLayer] = (),
                  step: int | None = None, with_scores: bool = True) -> Path | None:
    """Save ``model``'s adapter with PEFT's ``save_pretrained`` into ``path`` (temporary folder, then rename).

    With BeamLoRA ``layers``, w is folded into A and the raw scores go beside the adapter in
    ``beamlora_scores.safetensors`` (keys: module paths, float32 (r,) tensors). The files get the modes
    ``open()`` gives under the umask (safetensors writes its own 0600). A failed write (a full disk) is one
    :class:`beamlora.files.WriteError` naming ``path``, and nothing of it is left.

    A model sharded by FSDP2 is gathered first: every process must call this, and only rank 0 writes (the
    others get None).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if sharded.any_sharded(model.parameters()):
        state, score_values = _gathered(model, layers)
        if not is_main_process():
            return None
    else:
        state, score_values = None, [layer.score.detach() for layer in layers]
    with writing(path), atomic_dir(path) as tmp:
        if state is not None:
            model.save_pretrained(str(tmp), state_dict=state)
        else:
            with folded(layers):
                model.save_pretrained(str(tmp))
        if layers and with_scores:
            scores = {layer.name: score.float().cpu().contiguous() for layer, score in zip(layers, score_values)}
            metadata = {"format": "beamlora", "temperature": repr(layers[0].temperature),
                        "step": "" if step is None else str(step)}
            save_file(scores, str(tmp / SCORES_FILE), metadata=metadata)
        as_open_gives(tmp)
    return path


def _gathered(model: nn.Module, layers: Sequence[ScoredLayer]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The trainable parameters (what PEFT saves: LoRA and modules_to_save) whole, with w folded into each
    scored lora_A, and the whole score vectors: what :func:`write_adapter` saves of an FSDP2 model."""
    with torch.no_grad():
        scores = sharded.full_tensors([layer.score.detach() for layer in layers]) if layers else []
        folds = {id(layer.A): (layer, score) for layer, score in zip(layers, scores)}
        state = {}
        for name, param in model.named_parameters():
            if not param.requires_grad or name.split(".")[0] == SCORES_ATTR:
                continue
            whole = param.detach().full_tensor() if sharded.is_sharded(param) else param.detach()
            if id(param) in folds:
                layer, score = folds[id(param)]
                w = rank_weights(score, layer.temperature).to(whole.dtype)
                whole = whole * w.view(-1, *([1] * (whole.dim() - 1)))
            state[name] = whole.cpu()
    return state, scores
