"""The one place `common` meets Flower: model state <-> Flower records."""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())
