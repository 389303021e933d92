"""LLM-Streamline compensation: retrain the kept layer next to each gap to do the removed layers' work."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmap import surgery
from gradmap.capture import dense_final_states, dense_states, final_rel_error, hidden_of, layer_calls
from gradmap.compensation import Compensation, IncompatibleCompensationError
from gradmap.data import Calibration
from gradmap.errors import ConfigError
from gradmap.models import model_device
from gradmap.progress import progress
from gradmap.schema import option
from gradmap.stages import Cost

PARTS = ("layer", "ffn")


def _to_float(x: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors inside (nested tuples of) call arguments, e.g. RoPE cos/sin and additive masks."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_float(v, dtype) for v in x)
    return x


def _to_float_kw(kw: dict) -> dict:
    return {k: _to_float(v, torch.float32) for k, v in kw.items()}


@dataclass(eq=False)
class StreamlineTraining(Compensation):
    """LLM-Streamline's lightweight network, trained in place of the removed layers (MSE to the dense states).

    Paper: "Compressing Large Language Models by Streamlining the Unimportant Layer" (later: "Streamlining Redundant
    Layers to Compress Large Language Models"), Xiaodong Chen, Yuxuan Hu, Jing Zhang, Yanling Wang, Cuiping Li,
    Hong Chen, arXiv 2403.19135, https://arxiv.org/abs/2403.19135 (code: github.com/RUCKBReasoning/LLM-Streamline).

    Method: a removed span is replaced by one lightweight module trained so that, from the hidden state entering
    the span, it reproduces the dense hidden state leaving it: min E_t ||f(x_t) - y_t||^2 (nn.MSELoss), AdamW.
    The official code (`train_mseloss.py`) replaces the n+1 layers c..c+n that its criterion compares (the
    `metric=streamline` default) by one layer initialised from layer c, trained to map hidden_states[c] to
    hidden_states[c+n+1], and removes c+1..c+n; the same arrangement here keeps the layer count at L - n: for each
    gap [a, b] the kept layer k = a - 1 just before it is trained to map its input to the dense output of layer b
    (it now does its own work and the gap's). A gap that starts at layer 0 (never chosen by the official criterion)
    has no kept layer before it; then the first kept layer after it (b + 1) is trained to map its input (the
    embeddings) to its own dense output (reported as `side: after`). In general the trained kept layer k targets
    the dense input of the next kept layer (dense output of next_kept(k) - 1, or of the last layer).

    `part` (required: streamline_layer.yaml and streamline_ffn.yaml share this class and differ here):
    `part=layer`: the whole decoder layer is trained (the paper's transformer-layer lightweight network).
    `part=ffn`: only its MLP is trained (the paper's FFN variant, adapted: attention stays as it is). The layer is
    still called as a whole with only the MLP's parameters trainable, which for a pre-norm layer is the same as
    fitting mlp(post_attention_layernorm(h_mid)) to (target - h_mid), h_mid the post-attention residual.

    Data (our choice, stated): inputs are the *pruned* model's inputs to the trained layer, captured in depth order
    after the earlier gaps were trained (what the layer sees at inference); the paper trains on dense hidden states
    (input of the removed span), which is the same thing for the first gap. Targets are dense, captured once before
    any training, because the dense view shares the kept layers being trained. The layer's call arguments (RoPE
    position embeddings, attention mask) are captured with a forward pre-hook and replayed.

    Schedule and defaults (official code, `args.py` / `LLM_Streamline/train_lightweightnetwork.py` /
    `LLM_Streamline/scheduler.py`, the MSE-loss path): AdamW, lr 2e-4, weight decay 1e-3, gradient clipping at norm
    5, and the official warmup + cosine lambda over U optimizer steps:

        f(u) = u / max(1, W)                                                  for u < W
        f(u) = (min_lr + (lr - min_lr) * max(0, 0.5 (1 + cos(pi p)))) / lr,   p = (u - W) / max(1, H - W)

    with W = warmup_ratio * U and H = decay_horizon * U. The official code sets W and H from the number of
    *micro-batches* N (W = 0.01 * 0.5 N, H = 0.5 N) but steps the scheduler once per 16 micro-batches (gradient
    accumulation 16), so per optimizer step (U = N / 16) W = 0.08 U and H = 8 U: the lr rises from 0 over the first
    8% of the steps and then stays nearly constant (it only falls to ~0.975 lr, 1.95e-4, by the end). Hence the
    defaults warmup_ratio=0.08, decay_horizon=8. `warmup_ratio=0.01, decay_horizon=1` is this repo's earlier
    schedule (1% warmup then a full cosine to min_lr; it started the warmup at lr / ceil(W) rather than 0).
    The paper trains 1 epoch over ~100k sequences (batch 8 x 16 accumulation); with ~1k calibration tokens that is a
    handful of steps, so `epochs` defaults to 20 passes over the calibration set (one step per calibration
    micro-batch), which trains a 135M model in well under a minute on a CPU. Training runs in float32 (the layer is
    cast up and back) so AdamW updates are not lost to bf16 rounding. Only the trained module's parameters get
    requires_grad; every flag is restored and no .grad is left behind.

    Report: per trained layer the loss before/after (MSE over the calibration set), steps and `train_seconds`;
    `cost.train_tokens` counts tokens through the trained module (epochs x calibration tokens per trained layer).
    """

    name = "streamline"
    micro_batch_is_memory_knob = False  # calibration micro-batches are its training batches (gradmap.oom)

    part: str = option(choices=PARTS)
    epochs: int = option(ge=1)
    lr: float = option(gt=0)
    min_lr: float = option(ge=0)
    weight_decay: float = option(ge=0)
    warmup_ratio: float = option(ge=0, lt=1)
    # >= 1: the cosine never reaches its turning point within training, so the lr never rises again.
    decay_horizon: float = option(ge=1)
    max_grad_norm: float = option(gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", self.min_lr, f"a number in [0, lr={self.lr}]", problem="invalid schedule")
        self.name = f"streamline_{self.part}"

    def check_compatible(self, model: nn.Module, removed: list[int]) -> None:
        layer = surgery.get_decoder_layers(model)[0]
        if self.part == "ffn" and not isinstance(getattr(layer, "mlp", None), nn.Module):
            raise IncompatibleCompensationError(
                f"streamline_ffn trains the layer's `mlp`, which {type(layer).__name__} does not have; "
                f"use compensation=streamline_layer")
        # Every gap has a kept neighbour (remove_layers always keeps one layer), so no pairing is impossible here.

    def _trained_module(self, layer: nn.Module) -> nn.Module:
        return layer if self.part == "layer" else layer.mlp

    def apply(self, model: nn.Module, removed: Mapping[int, nn.Module], calib: Calibration,
              cost: Cost) -> dict[str, Any]:
        if not removed:
            return {"sites": [], "note": "nothing removed"}
        self.check_compatible(model, sorted(removed))
        original_count = surgery.num_layers(model) + len(removed)
        kept, aligned = surgery.aligned_dense_layers(original_count, list(removed))
        # Kept layers followed by a gap; plus the first kept layer when the model starts with a gap.
        sites = [j for j in range(len(kept)) if aligned[j] != kept[j] or (j == 0 and kept[0] > 0)]

        # Dense targets first: training changes kept layers, which the dense view shares.
        targets = dense_states(model, removed, calib, {aligned[j] for j in sites})
        dense_final = dense_final_states(model, removed, calib)
        error_before = final_rel_error(model, calib, dense_final)

        flags = {p: p.requires_grad for p in model.parameters()}
        reports = []
        t0 = time.perf_counter()
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for j in progress(sites, desc=f"{self.name}: trained layers", unit="layer"):  # depth order
                calls = layer_calls(model, calib, j)
                rep = self._train(surgery.get_decoder_layers(model)[j], calls, targets[aligned[j]], cost)
                side = "after" if j == 0 and kept[0] > 0 else "before"
                reports.append({"kept_position": j, "original_layer": kept[j], "target_dense_layer": aligned[j],
                                "side": side, **rep})
                if side == "after":
                    reports[-1]["note"] = ("the gap starts at layer 0 (no kept layer before it): trained the "
                                           "first kept layer after it")
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = None
        train_seconds = time.perf_counter() - t0
        return {
            "sites": reports,
            "part": self.part,
            "train_seconds": train_seconds,
            "final_train_loss": sum(r["final_loss"] for r in reports) / len(reports),  # mean over trained layers
            "final_rel_error_before": error_before,
            "final_rel_error_after": final_rel_error(model, calib, dense_final),
            "schedule": {"epochs": self.epochs, "lr": self.lr, "min_lr": self.min_lr,
                         "weight_decay": self.weight_decay, "warmup_ratio": self.warmup_ratio,
                         "decay_horizon": self.decay_horizon, "max_grad_norm": self.max_grad_norm},
        }

    def _lr_factor(self, step: int, total: int) -> float:
        """Multiplier of lr at optimizer step `step` of `total` (LambdaLR): the official lambda, see the class."""
        warmup = self.warmup_ratio * total  # not rounded, as in the official code
        if step < warmup:
            return step / max(1.0, warmup)
        progress = (step - warmup) / max(1.0, self.decay_horizon * total - warmup)
        cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return (self.min_lr + cosine * (self.lr - self.min_lr)) / self.lr

    def _train(self, layer: nn.Module, calls, targets: list[torch.Tensor], cost: Cost) -> dict[str, Any]:
        device = model_device(layer)
        dtype = next(layer.parameters()).dtype
        layer.float()  # AdamW in float32; cast back below
        params = list(self._trained_module(layer).parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = self.epochs * len(calls)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self._lr_factor(step, total))

        def run(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            hidden, rest, kw = calls[b]
            out = hidden_of(layer(hidden.to(device), *_to_float(rest, torch.float32), **_to_float_kw(kw)))
            return out, targets[b].to(device)

        @torch.no_grad()
        def calib_loss() -> float:  # element-weighted MSE over the whole calibration set
            se = n = 0.0
            for b in range(len(calls)):
                out, tgt = run(b)
                se += float((out.double() - tgt.double()).pow(2).sum())
                n += tgt.numel()
            return se / n

        t0 = time.perf_counter()
        try:
            initial = calib_loss()
            bar = progress(total=total, desc=f"{self.name}: training", unit="step", leave=False)
            with torch.enable_grad():
                for _ in range(self.epochs):
                    for b in torch.randperm(len(calls)).tolist():  # global RNG: seeded by the runner
                        out, tgt = run(b)
                        loss = nn.functional.mse_loss(out, tgt)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                        opt.step()
                        sched.step()
                        cost.train_tokens += tgt.shape[0] * tgt.shape[1]
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
            bar.close()
            final = calib_loss()
        finally:
            for p in params:
                p.grad = None
            layer.to(dtype)
        return {"initial_loss": initial, "final_loss": final, "steps": total,
                "train_seconds": time.perf_counter() - t0}

