"""What a transformers Trainer run in the tests needs: token data and a free port for DDP processes."""

from __future__ import annotations

import socket

import torch


class TokenData(torch.utils.data.Dataset):
    """Random token sequences whose label is a simple function of the tokens (learnable)."""

    def __init__(self, n: int = 96, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 10), generator=g)
        self.labels = (self.ids[:, 0] < 32).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}



def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
