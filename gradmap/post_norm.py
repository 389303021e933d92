"""Projection compensation where a norm follows the MLP (Gemma 2/3: `post_feedforward_layernorm` after `down_proj`).

The layer output is h = r + y with y = g * z / rms(z): z the MLP's output projection, g the RMSNorm's per-channel
gain (Gemma: g = 1 + weight). A map folded into `down_proj` changes z, but the norm keeps only z's direction, so
GradMAP's closed-form fit (methods/gradmap/projection.py) is not exact there. What can be folded, still with no extra
parameters (a standard Hugging Face checkpoint), is chosen by `post_norm`:

* `norm_scale` (exact): a per-channel scale s folded into the norm's gain, g <- s * g, fitted by least squares
  y*s ~ T (T = H_dense - r, what the sublayer should add) with the projection's ridge toward 1,
  s_c = (sum y_c T_c + lam) / (sum y_c^2 + lam), lam = alpha * mean_c sum y_c^2. The fit models the layer exactly,
  so the predicted error equals the measured one.
* `direction_approx` (approximate): a square A folded into `down_proj` (z <- A^T z), fitted through the norm with
  each token's normaliser held at its current value rho_t = rms(z_t): y_t ~ g * (A^T z_t) / rho_t. Per output
  channel c: (g_c^2 Zn^T Zn + lam I) a_c = g_c Zn^T T_c + lam e_c with Zn = Z / rho (one eigendecomposition serves
  every channel), lam = alpha * tr(Zn^T Zn) / d * mean(g^2). Exact at A = I; the norm then re-normalises each
  token, so a change of a token's magnitude is lost and only the direction part of the fit takes effect (the
  record compares the fit's predicted error with the measured one).
* `direction_approx_norm_scale`: `direction_approx`, then `norm_scale` refitted on the corrected outputs.
* `refuse` (the earlier behaviour): the compensation refuses the architecture.

What a map before the norm can and cannot remove, recorded per site relative to ||H_dense||^2 like the site's error:
* `rel_error_floor_before_norm`: the least error any pre-norm output could reach with the current gain, even one
  chosen per token: sum_t min over u with rms(u) = 1 of ||g * u - T_t||^2 (`sphere_floor`). No map folded into
  `down_proj` goes below it; only the gain (`norm_scale`) can.
* the split ||y - T||^2 = (||y|| - ||T||)^2 + 2 ||y|| ||T|| (1 - cos(y, T)) into a magnitude and a direction part.
  With a uniform gain the norm fixes ||y||, so the magnitude part would be a floor too; Gemma's gains are far from
  uniform, so a change of direction also moves the magnitude, and the floor above is the one that holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradmap.capture import FinalErrorSums
from gradmap.compensation import IncompatibleCompensationError
from gradmap.module_paths import POST_MLP_NORMS, first_path

POST_NORM_MODES = ("refuse", "norm_scale", "direction_approx", "direction_approx_norm_scale")


# ---------------------------------------------------------------- the norm's gain


def post_mlp_norm(layer: nn.Module) -> nn.Module | None:
    found = first_path(layer, POST_MLP_NORMS)
    return None if found is None else found[1]


def norm_eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    return 1e-6


@torch.no_grad()
def gain_offset(norm: nn.Module) -> float:
    """0 if the norm multiplies by `weight` (Llama-style RMSNorm), 1 if by `1 + weight` (Gemma): read off the norm's
    output on a unit-rms input. IncompatibleCompensationError if neither (a norm that is not a gained RMSNorm)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise IncompatibleCompensationError(f"{type(norm).__name__} has no per-channel weight to fold a scale into")
    x = torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device)
    gain = norm(x).double()[0] * (1.0 + norm_eps(norm)) ** 0.5
    for offset in (0.0, 1.0):
        if torch.allclose(gain, w.double() + offset, rtol=1e-4, atol=1e-5):
            return offset
    raise IncompatibleCompensationError(f"{type(norm).__name__} is not an RMSNorm with gain weight or 1 + weight; "
                                        "its scale cannot be folded")


def norm_gain(norm: nn.Module, offset: float) -> torch.Tensor:
    return norm.weight.detach().double() + offset


@torch.no_grad()
def scale_gain(norm: nn.Module, s: torch.Tensor | float, offset: float) -> None:
    """g <- s * g in place (s a scalar or per channel): exact, the norm's output is multiplied by s."""
    g = norm_gain(norm, offset) * (s.double().to(norm.weight.device) if isinstance(s, torch.Tensor) else float(s))
    norm.weight.copy_((g - offset).to(norm.weight.dtype))


# ---------------------------------------------------------------- pure tensor maths


def fit_channel_scale(yy: torch.Tensor, yt: torch.Tensor, alpha: float) -> torch.Tensor:
    """s minimising sum_t ||s*y_t - T_t||^2 + lam ||s - 1||^2, lam = alpha * mean(yy) (yy, yt: per-channel sums)."""
    yy, yt = yy.double(), yt.double()
    lam = alpha * yy.mean()
    return (yt + lam) / (yy + lam).clamp_min(1e-300)


def scale_error(yy: torch.Tensor, yt: torch.Tensor, tt: float, s: torch.Tensor) -> float:
    """sum_t ||s*y_t - T_t||^2 from the sums (exact: the model of `norm_scale` is the layer)."""
    return float((s * s * yy - 2 * s * yt).sum() + tt)


def sphere_floor(g: torch.Tensor, t: torch.Tensor, iters: int = 80) -> torch.Tensor:
    """Per row of t [n, d]: min over u with ||u||^2 = d of ||g * u - t||^2, in float64. The minimiser is
    u = g t / (g^2 + mu) with mu >= -min(g^2) the root of ||u(mu)||^2 = d (decreasing in mu), found by bisection."""
    g, t = g.double().to(t.device), t.double()
    d = t.shape[-1]
    g2 = g * g
    gt2 = (g * t) ** 2
    lo = torch.full(t.shape[:-1], -float(g2.min()), dtype=torch.float64, device=t.device)
    hi = lo + (gt2.sum(-1) / d).sqrt() + 1.0  # ||u||^2 <= sum (g t)^2 / (mu + min g^2)^2 < d at mu = hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = (gt2 / (g2 + mid[..., None]).clamp_min(1e-300) ** 2).sum(-1) > d
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    u = g * t / (g2 + hi[..., None]).clamp_min(1e-300)
    u = u * (d / u.pow(2).sum(-1, keepdim=True).clamp_min(1e-300)).sqrt()  # exactly on the sphere
    return (g * u - t).pow(2).sum(-1)


def fit_direction(zz: torch.Tensor, zt: torch.Tensor, g: torch.Tensor, alpha: float) -> torch.Tensor:
    """A [d, d] minimising sum_t ||g * (A^T zn_t) - T_t||^2 + lam ||A - I||^2 (zn_t = z_t / rho_t), column by column:
    (g_c^2 ZZ + lam I) a_c = g_c ZT[:, c] + lam e_c, lam = alpha * tr(ZZ)/d * mean(g^2); in float64."""
    zz, zt, g = zz.double(), zt.double(), g.double().to(zz.device)
    d = zz.shape[0]
    lam = alpha * torch.trace(zz) / d * (g * g).mean()
    evals, q = torch.linalg.eigh(zz)
    rhs = q.T @ (zt * g[None, :] + lam * torch.eye(d, dtype=torch.float64, device=zz.device))
    denom = evals.clamp_min(0)[:, None] * (g * g)[None, :] + lam
    return q @ (rhs / denom.clamp_min(1e-300))


def direction_error(zz: torch.Tensor, zt: torch.Tensor, tt: float, g: torch.Tensor, a: torch.Tensor) -> float:
    """sum_t ||g * (A^T zn_t) - T_t||^2 from the sums: the error the linearised fit predicts."""
    zz, zt, g, a = zz.double(), zt.double(), g.double().to(zz.device), a.double()
    quad = ((zz @ a) * a).sum(0)  # a_c^T ZZ a_c per column
    lin = (zt * a).sum(0)  # a_c^T ZT[:, c]
    return float((g * g * quad - 2 * g * lin).sum() + tt)


# ---------------------------------------------------------------- one pass over the calibration data


class PostNormSums(FinalErrorSums):
    """At kept layer `site`: the sums the post-norm fits need (hooks on the output projection, the norm and the
    layer), the magnitude/direction split of the site's error, and the relative squared error at the last kept
    layer on the same pass (the projection guard's free check)."""

    def __init__(self, site: int, last: int, targets: list[torch.Tensor], final_targets: list[torch.Tensor],
                 direction: bool, eps: float):
        super().__init__(last, final_targets)
        self.site, self.targets = site, targets
        self.direction, self.eps = direction, eps
        self.sums: dict[str, Any] = {"yy": 0.0, "yt": 0.0, "tt": 0.0, "zz": 0.0, "zt": 0.0, "err": 0.0,
                                     "magnitude": 0.0, "floor": 0.0, "dense": 0.0}
        self.gain: torch.Tensor | None = None  # the norm's gain, for the floor (set by post_norm_sums)
        self.z: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def on_projection(self, _module, _args, out: torch.Tensor) -> None:
        self.z = out.detach()

    def on_norm(self, _module, _args, out: torch.Tensor) -> None:
        self.y = out.detach()

    def on_layer(self, pos: int, _inp: torch.Tensor, out: torch.Tensor) -> None:
        b, s = self.batch, self.sums
        if pos == self.site:
            y = self.y.double().flatten(0, -2)
            hd = self.targets[b].double().flatten(0, -2).to(y.device)
            t = hd - (out.detach().double().flatten(0, -2) - y)
            s["yy"] = s["yy"] + (y * y).sum(0)
            s["yt"] = s["yt"] + (y * t).sum(0)
            s["tt"] += float((t * t).sum())
            s["err"] += float((y - t).pow(2).sum())
            s["magnitude"] += float((y.norm(dim=-1) - t.norm(dim=-1)).pow(2).sum())
            if self.gain is not None:
                s["floor"] += float(sphere_floor(self.gain, t).sum())
            s["dense"] += float(hd.pow(2).sum())
            if self.direction:
                z = self.z.double().flatten(0, -2)
                zn = z / (z.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
                s["zz"] = s["zz"] + zn.T @ zn
                s["zt"] = s["zt"] + zn.T @ t
        if pos == self.last:
            self.add_final(b, out)


@torch.no_grad()
def post_norm_sums(model: nn.Module, calib, site: int, proj: nn.Module, norm: nn.Module, targets: list[torch.Tensor],
                   last: int, final_targets: list[torch.Tensor], direction: bool) -> PostNormSums:
    sums = PostNormSums(site, last, targets, final_targets, direction, norm_eps(norm))
    sums.gain = norm_gain(norm, gain_offset(norm))
    sums.stream(model, calib, {site, last},
                [proj.register_forward_hook(sums.on_projection), norm.register_forward_hook(sums.on_norm)])
    return sums


def error_split(sums: PostNormSums) -> dict[str, float]:
    """The site's relative error before the fold and its magnitude / direction parts (module docstring)."""
    s, den = sums.sums, max(sums.sums["dense"], 1e-30)
    return {"rel_error_at_fit": s["err"] / den, "rel_error_floor_before_norm": s["floor"] / den,
            "rel_error_magnitude_part": s["magnitude"] / den,
            "rel_error_direction_part": (s["err"] - s["magnitude"]) / den}


def fit_scale_from(sums: PostNormSums, alpha: float) -> tuple[torch.Tensor, float]:
    s = fit_channel_scale(sums.sums["yy"], sums.sums["yt"], alpha)
    den = max(sums.sums["dense"], 1e-30)
    return s, scale_error(sums.sums["yy"], sums.sums["yt"], sums.sums["tt"], s) / den


def fit_direction_from(sums: PostNormSums, g: torch.Tensor, alpha: float) -> tuple[torch.Tensor, float]:
    a = fit_direction(sums.sums["zz"], sums.sums["zt"], g, alpha)
    den = max(sums.sums["dense"], 1e-30)
    return a, direction_error(sums.sums["zz"], sums.sums["zt"], sums.sums["tt"], g, a) / den


def modules_of(mode: str, proj: nn.Module, norm: nn.Module) -> Sequence[nn.Module]:
    """The modules a mode's folds change (what the guard must be able to restore)."""
    return {"norm_scale": (norm,), "direction_approx": (proj,), "direction_approx_norm_scale": (proj, norm)}[mode]
