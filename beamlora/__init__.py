"""beamlora: BeamLoRA (ACL 2025) on stock PEFT LoRA models.

    model = get_peft_model(base, LoraConfig(r=16, target_modules=[...]))
    controller = beamlora.attach(model, beamlora.BeamLoraConfig(delta_t=100, total_steps=1000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)   # after attach: it must see the scores
    for batch in data:
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
        controller.step(optimizer)
    controller.export("adapter/")   # a plain PEFT LoRA adapter, w folded into A

Inside ``transformers.Trainer`` use ``BeamLoraCallback(controller)`` instead of the manual step.
"""

from beamlora.config import BeamLoraConfig
from beamlora.errors import BeamLoraError
from rankscope import __version__ as __version__  # one version for both packages (pyproject.toml reads it there)

_LAZY = {
    "attach": "controller", "BeamLoraController": "controller",
    "BeamLoraCallback": "callbacks", "SnapshotCallback": "callbacks",
}


def __getattr__(name: str):
    # torch, peft and transformers load only when the training side is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'beamlora' has no attribute {name!r}")


__all__ = ["BeamLoraConfig", "BeamLoraError", *_LAZY]
