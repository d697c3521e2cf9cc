"""PEFT adapters with a known spread of rank importances, and their medians computed independently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

R, MODULES = 8, 12  # rank and module count of every adapter written here


def adapter_arrays(decay: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """12 modules whose rank i has norm about decay**i: 1.0 gives nearly equal ranks, 0.6 a geometric fall."""
    rng = np.random.default_rng(seed)
    modules = []
    for _ in range(MODULES):
        A = rng.normal(size=(R, 16))
        A /= np.linalg.norm(A, axis=1, keepdims=True)
        B = rng.normal(size=(16, R))
        B /= np.linalg.norm(B, axis=0, keepdims=True)
        A *= (decay ** np.arange(R) * (1 + 0.02 * rng.uniform(size=R)))[:, None]  # small noise: no exact ties
        modules.append((A.astype(np.float32), B.astype(np.float32)))
    return modules



def write_adapter(folder: Path, modules: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (A, B) in enumerate(modules):
        tensors[f"base_model.model.layers.{i}.q.lora_A.weight"] = A
        tensors[f"base_model.model.layers.{i}.q.lora_B.weight"] = B
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": R, "lora_alpha": R, "target_modules": ["q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder



def independent_medians(modules: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Median effective rank / r and top-10% share, from the raw arrays in float64, without rankscope."""
    ratios, shares = [], []
    for A, B in modules:
        importance = np.linalg.norm(A.astype(np.float64), axis=1) * np.linalg.norm(B.astype(np.float64), axis=0)
        p = importance / importance.sum()
        ratios.append(math.exp(-np.sum(p * np.log(p))) / R)
        k = math.ceil(0.1 * R)
        shares.append(np.sort(importance)[::-1][:k].sum() / importance.sum())
    return float(np.median(ratios)), float(np.median(shares))


def write_peft(folder: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], r: int, alpha: float, extra=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    tensors.update(extra or {})
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    return folder
