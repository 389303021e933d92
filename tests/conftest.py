"""Shared test set-up."""

import os

import torch

# Tiny models on 2 cores: one thread avoids the scheduling overhead that dominates microsecond-sized matmuls.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
