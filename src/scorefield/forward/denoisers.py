"""Denoisers under a component process: x̂₀ = E[x₀ | x_t] as a function of (x_t, t).

A process denoiser is called as `denoiser(x [B, C, H, W], t [B] float64, labels=None) -> x̂₀ [B, C, H, W]` (x's
dtype). The toolkit's denoisers take ᾱ instead of t; under the standard process they are adapted exactly
(`as_process_denoiser`), under any other process only denoisers that know the process apply:

- `GaussianProcessDenoiser`: the exact posterior mean for Gaussian data N(μ, Σ) (any Σ, not only one diagonal in the
  process basis): with A = diag(m), N = diag(v) in the basis, ĉ₀ = μ_c + Σ_c A (A Σ_c A + N)⁻¹ (c − A μ_c);
  `covariance="diagonal"` keeps only the diagonal of Σ in the process basis (the free theory of the process: exact
  for stationary data in the Fourier basis), ĉ₀ = μ + m Var (c − m μ)/(m² Var + v).
- `IdealProcessDenoiser`: the exact posterior mean of the empirical distribution of a training set (the ideal
  score machine of kamb-ganguli under the process): weights ∝ exp(−½ Σ_k (c_k − m_k c_k^(n))²/v_k).
- `NetProcessDenoiser`: a network trained under the process (`forward.training`), ε- or x₀-parametrized, optionally
  with the free-theory part s = −Σ_t⁻¹ φ + NN(φ, t) added analytically.
"""
from __future__ import annotations

from typing import Any

import torch

from ..models.base import Denoiser
from .process import ComponentProcess, ProcessError

Tensor = torch.Tensor

ALPHA_BAR_FLOOR = 1e-4           # as models/nets.py: x̂₀ = (x − √v ε̂)/m with m ≥ √1e-4
QUERY_CHUNK = 256


class ProcessDenoiser(torch.nn.Module):
    """Base: `denoise(x, t, labels)` on validated inputs; `process` is the process it denoises under."""

    conditional = False

    def __init__(self, process: ComponentProcess) -> None:
        super().__init__()
        self.process = process

    def denoise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != self.process.image_shape:
            raise ProcessError(f"x must be [B, {', '.join(map(str, self.process.image_shape))}], got "
                               f"{tuple(getattr(x, 'shape', ()))}")
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        if t.numel() != x.shape[0]:
            raise ProcessError(f"t must be a scalar or [B] = [{x.shape[0]}], got {t.numel()} times")
        return self.denoise(x, t.cpu(), labels)

    def score(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """∇ log p_t(x) from x̂₀ by Tweedie per component, float64."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        return self.process.score_from_x0(x, self(x, t, labels), t)

    def _coefficients(self, t: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        m, v = self.process.coefficients(t)
        return m.to(device), v.to(device)


class GaussianProcessDenoiser(ProcessDenoiser):
    """Exact posterior mean for x₀ ~ N(mean, cov) under the process (module docstring)."""

    def __init__(self, process: ComponentProcess, mean: Tensor, cov: Tensor | None = None,
                 covariance: str = "full", variance: Tensor | None = None) -> None:
        super().__init__(process)
        basis, D = process.basis, process.dim
        if covariance not in ("full", "diagonal"):
            raise ProcessError(f"covariance must be 'full' or 'diagonal', got {covariance!r}")
        self.covariance = covariance
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        if mean.shape[1] != D:
            raise ProcessError(f"mean must have {D} entries, got {mean.shape[1]}")
        self.register_buffer("mean_c", basis.forward(mean)[0])                               # μ_c [D]
        Q = basis.matrix
        if covariance == "full":
            if cov is None or tuple(cov.shape) != (D, D):
                raise ProcessError(f"a full covariance must be [{D}, {D}]")
            cov = torch.as_tensor(cov, dtype=torch.float64)
            self.register_buffer("cov_c", Q @ (0.5 * (cov + cov.T)) @ Q.T)                   # Σ_c [D, D]
        else:
            if variance is None:
                if cov is None:
                    raise ProcessError("a diagonal Gaussian needs cov or the per-component variance")
                cov = torch.as_tensor(cov, dtype=torch.float64)
                variance = torch.einsum("kd,de,ke->k", Q, cov, Q)
            self.register_buffer("var_c", torch.as_tensor(variance, dtype=torch.float64).reshape(D))

    def denoise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        basis = self.process.basis
        c = basis.forward(x.to(torch.float64))                                              # [B, D]
        mu = self.mean_c
        if self.covariance == "diagonal":
            m, v = self._coefficients(t, x.device)
            var = self.var_c
            c0 = mu + m * var * (c - m * mu) / (m**2 * var + v).clamp_min(1e-300)
            return basis.inverse(c0).to(x.dtype)
        c0 = torch.empty_like(c)
        for tv in torch.unique(t):
            rows = (t == tv).to(x.device)
            m, v = self._coefficients(tv.reshape(1), x.device)
            m, v = m[0], v[0]                                                               # [D]
            K = m[:, None] * self.cov_c * m[None, :] + torch.diag(v)                        # A Σ A + N
            if float(v.min()) <= 0:                                                         # t = t_min: Σ alone
                K = K + torch.eye(len(v), dtype=K.dtype, device=K.device) * 1e-12 * float(K.diagonal().mean())
            X = torch.linalg.solve(K, m[:, None] * self.cov_c)                              # K⁻¹ A Σ
            c0[rows] = mu + (c[rows] - m * mu) @ X
        return basis.inverse(c0).to(x.dtype)


def gaussian_denoiser(process: ComponentProcess, data: Any, covariance: str = "full",
                      shrinkage: float = 0.0) -> GaussianProcessDenoiser:
    """The Gaussian denoiser of the data's mean and covariance under `process` ('full', or 'diagonal' in the process
    basis: the free theory the matched processes end at); shrinkage blends the full covariance with its diagonal."""
    images = data.images if hasattr(data, "images") else torch.as_tensor(data)
    x = images.reshape(images.shape[0], -1).to(torch.float64)
    if covariance == "diagonal":
        c = process.basis.forward(x)
        return GaussianProcessDenoiser(process, x.mean(0), covariance="diagonal", variance=c.var(0, correction=1))
    cov = torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])
    if shrinkage:
        cov = (1 - shrinkage) * cov + shrinkage * torch.diag(torch.diagonal(cov))
    return GaussianProcessDenoiser(process, x.mean(0), cov, covariance="full")


class IdealProcessDenoiser(ProcessDenoiser):
    """Exact posterior mean of the training set's empirical distribution under the process (module docstring)."""

    def __init__(self, process: ComponentProcess, data: Any) -> None:
        super().__init__(process)
        images = data.images if hasattr(data, "images") else torch.as_tensor(data)
        flat = images.reshape(images.shape[0], -1).to(torch.float64)                       # [N, D]
        self.register_buffer("images", flat)
        self.register_buffer("components", process.basis.forward(flat))                   # C_n [N, D]

    def denoise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        c = self.process.basis.forward(x.to(torch.float64))                               # [B, D]
        m, v = self._coefficients(t, x.device)
        v = v.clamp_min(1e-20)                                                            # t = t_min: nearest image
        Cn = self.components
        out = torch.empty(c.shape[0], self.images.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, c.shape[0], QUERY_CHUNK):
            cb, mb, vb = c[s:s + QUERY_CHUNK], m[s:s + QUERY_CHUNK], v[s:s + QUERY_CHUNK]
            # −½ Σ_k (c_k − m_k C_nk)²/v_k up to the n-independent ‖c‖² term
            logits = (cb * mb / vb) @ Cn.T - 0.5 * (mb**2 / vb) @ (Cn**2).T               # [b, N]
            out[s:s + QUERY_CHUNK] = torch.softmax(logits, dim=1) @ self.images
        return out.reshape(x.shape).to(x.dtype)


class StandardUnderProcess(ProcessDenoiser):
    """A toolkit denoiser (called with ᾱ) under a process that is the standard VP diffusion: x̂₀ = model(x, ᾱ(t))."""

    def __init__(self, model: Any, process: ComponentProcess) -> None:
        super().__init__(process)
        self.model = model
        self.conditional = bool(getattr(model, "conditional", False))

    def denoise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        ab = self.process.schedule.base_alpha_bar(t).to(dtype=x.dtype, device=x.device)
        return self.model(x, ab, labels)


def network_output(net: Any, x: Tensor, t: Tensor, process: ComponentProcess, labels: Tensor | None,
                   prediction: str, free_theory: bool) -> Tensor:
    """The net's prediction under the process in pixel space, x's dtype: the noise ê = Qᵀ(S ⊙ ẑ) (prediction 'eps',
    S = process.eps_scale) or x̂₀ ('x0'); with the free theory the Gaussian part Qᵀ(S ⊙ ẑ_G) (resp. Qᵀ ĉ₀_G) is added
    to the network's output, so the network learns
    the correction (rg slides: s_θ = −Σ_t⁻¹ φ + NN(φ, t)). x: [B, C, H, W], t: [B] float64."""
    label = process.time_label(t.cpu(), net.schedule).to(x.device)                  # [B] the net's time input
    out = net.predict_eps(x, label, labels)                                          # [B, C, H, W]
    if free_theory:
        m, v = process.coefficients(t.cpu())
        m, v = m.to(dtype=x.dtype, device=x.device), v.to(dtype=x.dtype, device=x.device)
        c = process.basis.forward(x)
        if prediction == "eps":
            part = process.free_theory_eps(c, m, v) * process.eps_scale.to(c)          # ê_G = Qᵀ(S ⊙ ẑ_G)
        else:
            part = process.free_theory_x0(c, m, v)
        out = out + process.basis.inverse(part)
    return out


class NetProcessDenoiser(ProcessDenoiser):
    """A network trained under the process: x̂₀ from its noise estimate ê (ẑ = Q ê / S, ĉ₀ = (c − √v ẑ)/max(m, 0.01))
    or its x̂₀."""

    def __init__(self, net: Any, process: ComponentProcess, prediction: str | None = None,
                 free_theory: bool | None = None) -> None:
        super().__init__(process)
        self.net = net
        own = getattr(net, "process_parametrization", None) or {}
        self.prediction = prediction or own.get("prediction") or process.prediction
        self.free_theory = bool(own.get("free_theory", process.free_theory) if free_theory is None else free_theory)
        self.conditional = bool(getattr(net, "conditional", False))

    def denoise(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        out = network_output(self.net, x, t, self.process, labels, self.prediction, self.free_theory)
        if self.prediction == "x0":
            return out
        basis = self.process.basis
        m, v = self._coefficients(t, x.device)
        c, z = basis.forward(x.to(torch.float64)), basis.forward(out.to(torch.float64))
        z = z / self.process.eps_scale.to(z)                                           # ê = Qᵀ(S ⊙ ẑ)
        c0 = (c - v.sqrt() * z) / m.clamp_min(ALPHA_BAR_FLOOR**0.5)
        return basis.inverse(c0).to(x.dtype)


def as_process_denoiser(model: Any, process: ComponentProcess) -> ProcessDenoiser:
    """`model` as a denoiser under `process`: a ProcessDenoiser is checked against it, a trainable net is read with
    the process's parametrization (or the one it was trained with), and any other toolkit denoiser is accepted
    only under the standard process (it knows nothing of component schedules or noise colour)."""
    from ..models.nets import NetDenoiser

    if isinstance(model, ProcessDenoiser):
        if model.process is not process and model.process.spec() != process.spec():
            raise ProcessError(f"this denoiser was built for process {model.process.spec()}, not {process.spec()}")
        return model
    if isinstance(model, NetDenoiser):
        own = getattr(model, "process_parametrization", None) or {}
        prediction = own.get("prediction", process.prediction)
        free = bool(own.get("free_theory", process.free_theory))
        if process.is_standard and prediction == "eps" and not free:
            return StandardUnderProcess(model, process)
        return NetProcessDenoiser(model, process, prediction, free)
    if isinstance(model, Denoiser) or callable(model):
        if process.is_standard:
            return StandardUnderProcess(model, process)
        raise ProcessError(f"{type(model).__name__} denoises the standard VP process (it takes ᾱ); under process "
                           f"'{process.name}' use a network trained with it or sf.forward.gaussian_denoiser / "
                           "IdealProcessDenoiser")
    raise ProcessError(f"cannot use {type(model).__name__} as a denoiser")


CHECK_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)           # fractions of the process's time range (non-VP processes)


def check_times(process: ComponentProcess, alpha_bars: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
                ) -> list[float]:
    """Times at which to check a denoiser under `process`, from the noisiest down: where the base schedule has
    these ᾱ for a variance-preserving process (the standard check's noise levels), else CHECK_TIMES of its range."""
    if process.schedule is not None:
        ab = torch.tensor(alpha_bars, dtype=torch.float64)
        return [float(t) for t in process.schedule.base.t_from_alpha_bar(ab).clamp(process.t_min, process.t_max)]
    span = process.t_max - process.t_min
    return [process.t_min + f * span for f in reversed(CHECK_TIMES)]


def denoising_check(process: ComponentProcess, model: Any, images: Tensor, times: list[float] | None = None,
                    seed: int = 0) -> list[dict[str, float]]:
    """MSE of x̂₀ against x₀ for x_t ~ p_t(· | x₀) of `process` (its own noise, not the standard one), at each
    time, next to two baselines: the free theory (the posterior mean of the diagonal Gaussian fit in the
    process basis, when the process holds the data's statistics) and the data-mean image. images [N, C, H, W];
    model: a net trained under the process or any ProcessDenoiser. One row per time: t, base ᾱ(t) (VP processes),
    mse, mse_free_theory, mse_mean_image."""
    denoiser = as_process_denoiser(model, process)
    free = None
    if process.statistics is not None:
        s = process.statistics
        free = GaussianProcessDenoiser(process, process.basis.inverse(s.mean[None]).reshape(-1), covariance="diagonal",
                                       variance=s.variance)
    g = torch.Generator().manual_seed(seed)
    x0 = images.to(torch.float32)
    rows = []
    for t in (check_times(process) if times is None else times):
        xt = process.noise(x0, t, generator=g)
        tt = torch.full((len(x0),), float(t), dtype=torch.float64)
        with torch.no_grad():
            x0_hat = denoiser(xt, tt)
            row = {"t": round(float(t), 4)}
            if process.schedule is not None:
                row["alpha_bar"] = round(float(process.schedule.base_alpha_bar(tt[:1])[0]), 4)
            row["mse"] = float((x0_hat.float() - x0).pow(2).mean())
            if free is not None:
                row["mse_free_theory"] = float((free(xt.double(), tt).float() - x0).pow(2).mean())
            row["mse_mean_image"] = float((x0.mean(0, keepdim=True) - x0).pow(2).mean())
        rows.append(row)
    return rows
