"""Capturing and restoring every random stream a training run draws from (torch, numpy, python, CUDA)."""
import random

import numpy as np
import torch


def capture_rng() -> dict:
    """This process's torch, numpy, python and CUDA random states."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict) -> None:
    """Put back the states :func:`capture_rng` returned (also from a checkpoint loaded onto the GPU)."""
    # .cpu(): a checkpoint loaded with map_location="cuda" carries the state tensors on the GPU.
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
