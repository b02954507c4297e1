"""Component-wise forward processes: a basis, a mean factor and a variance per component (rg-diffusion-slides.txt,
"Forward process: Component-wise schedules").

Every process here is diagonal in an orthonormal basis Q (`forward.bases`): with c = Q φ,

    c_k(t) | c_k(0) ~ N(m_k(t) c_k(0), v_k(t))       independently per component,           (1)

the exact marginal of the linear SDE dc_k = a_k(t) c_k dt + g_k(t) dw_k with a_k = d log m_k/dt and
g_k² = dv_k/dt − 2 a_k v_k (the slides' "simultaneously diagonalizable" dφ = U A U† φ dt + U B U† dw). The
variance-preserving Ornstein–Uhlenbeck members dφ = −½ U β U† φ dt + U √β S U† dw have

    m_k = √ᾱ_k(t),  v_k = S_k² (1 − ᾱ_k(t)),  ᾱ_k(t) = exp(−∫₀ᵗ β_k)                        (2)

with a per-component schedule ᾱ_k (`forward.schedules`) and a noise colour S_k²: "white" (S = I) or "matched" to
the data's power ⟨|c_k|²⟩ (the slides' Σ_kk = ⟨|φ_k|²⟩), so that the process ends at the Gaussian "free theory"
N(0, diag⟨|c_k|²⟩) instead of white noise, or "shell": that power averaged over each shell of |k| (`Basis.shells`;
Haar: over each level), i.e. the coefficients are normalized per scale as wavelet score models whiten theirs.
Heat dissipation and blurring diffusion are members of (1) that are not of the form (2) (`forward.presets`).

Denoising score matching only needs (1): x_t = Qᵀ(m ⊙ Q x₀ + √v ⊙ Q ε) with ε ~ N(0, I) white in pixel space
(Q ε is white in component space, Q being orthonormal), and the Tweedie relations per component,

    E[c₀ | c_t] = (c_t + v ⊙ ∇ log p_t)/m,     ẑ = (c_t − m ⊙ ĉ₀)/√v,     score = −ẑ/√v        (3)

so denoisers, samplers and training use nothing but `marginal(t)` and the basis.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from ..schedules import Schedule, get_schedule
from .bases import Basis
from .schedules import ComponentSchedule

Tensor = torch.Tensor
Coefficients = Callable[[Tensor], tuple[Tensor, Tensor]]

PREDICTIONS = ("eps", "x0")
PRIORS = ("noise", "gaussian")
COLOURS = ("white", "matched", "shell")
# ODE samplers of VP processes start where the toolkit's do (sampling.SIGMA_VE_START): σ_VE = 80
SIGMA_VE_START = 80.0


class ProcessError(ValueError):
    """An invalid process, option or call."""


MAX_PRIOR_COVARIANCE = 4096        # components up to which the data's full covariance is kept (the Gaussian prior)


class DataStatistics:
    """Per-component mean μ_k, power ⟨c_k²⟩ and centred variance of the training data in a basis ([D] float64),
    and their full covariance [D, D] in the basis (None above MAX_PRIOR_COVARIANCE components)."""

    def __init__(self, mean: Tensor, power: Tensor, n: int, covariance: Tensor | None = None) -> None:
        self.mean = mean.to(torch.float64)
        self.power = power.to(torch.float64)
        self.variance = (self.power - self.mean**2).clamp_min(0.0)
        self.n = int(n)
        self.covariance = None if covariance is None else covariance.to(torch.float64)

    @classmethod
    def of(cls, basis: Basis, images: Tensor) -> DataStatistics:
        c = basis.forward(images.to(torch.float64))                       # [N, D]
        cov = None
        if c.shape[1] <= MAX_PRIOR_COVARIANCE and c.shape[0] > 1:
            centred = c - c.mean(0)
            cov = centred.T @ centred / c.shape[0]
        return cls(c.mean(0), (c**2).mean(0), c.shape[0], cov)

    @classmethod
    def of_gaussian(cls, basis: Basis, mean: Tensor, cov: Tensor) -> DataStatistics:
        """The statistics of N(mean, cov) (pixel space) exactly."""
        Q = basis.matrix
        mu = Q @ torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov_c = Q @ torch.as_tensor(cov, dtype=torch.float64) @ Q.T
        return cls(mu, cov_c.diagonal() + mu**2, 0, 0.5 * (cov_c + cov_c.T))


class ComponentProcess:
    """A forward process diagonal in `basis` (module docstring, eq. 1).

    Give either a per-component `schedule` (variance-preserving, eq. 2) with a `colour` S² [D], or
    `coefficients(t [T]) -> (m [T, D], v [T, D])` for any other member of the family.

    t runs over [t_min, t_max]; t_min is the data. `prediction` is how a network is parametrized under the process
    ('eps': the white noise ε; 'x0': the clean image); `free_theory` adds the Gaussian part analytically (the net
    learns the correction, slides "Noise Spectrum"); `prior` is how samplers start: 'noise' draws from N(0, v(t))
    (the process's end point), 'gaussian' from the Gaussian fit of p_t, N(m μ, m² Var + v) per component.
    """

    def __init__(self, basis: Basis, *, name: str = "component", schedule: ComponentSchedule | None = None,
                 colour: Tensor | None = None, colour_name: str = "white",
                 coefficients: Coefficients | None = None, t_range: tuple[float, float] | None = None,
                 statistics: DataStatistics | None = None, prediction: str = "eps", free_theory: bool = False,
                 prior: str = "noise", ode_t_start: float | None = None, spec: dict[str, Any] | None = None,
                 jump_at_t_min: bool = False) -> None:
        if (schedule is None) == (coefficients is None):
            raise ProcessError("give a per-component schedule (with a colour) or coefficients(t), not both")
        if prediction not in PREDICTIONS:
            raise ProcessError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if prior not in PRIORS:
            raise ProcessError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        self.basis = basis
        self.name = name
        self.schedule = schedule
        self.coefficients_fn = coefficients
        D = basis.dim
        self.colour = (torch.ones(D, dtype=torch.float64) if colour is None
                       else torch.as_tensor(colour, dtype=torch.float64).reshape(D))
        self.colour_name = colour_name
        self.statistics = statistics
        self.prediction = prediction
        self.free_theory = bool(free_theory)
        self.prior_kind = prior
        if schedule is not None:
            self.t_min, self.t_max = schedule.t_min, schedule.t_max
        else:
            self.t_min, self.t_max = t_range if t_range is not None else (0.0, 1.0)
        self._ode_t_start = ode_t_start
        # the marginal jumps at t_min (heat dissipation: from the finest blur to the data), so the ODE samplers'
        # last step lands on x̂₀ as DDIM's does
        self.jump_at_t_min = bool(jump_at_t_min)
        self._spec = dict(spec or {"name": name})
        if self.free_theory and statistics is None:
            raise ProcessError("the free-theory parametrization needs the data's statistics (make the process "
                               "with data)")

    # ---- what the process is ---------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.basis.image_shape

    @property
    def dim(self) -> int:
        return self.basis.dim

    @property
    def variance_preserving(self) -> bool:
        return self.schedule is not None

    @property
    def is_standard(self) -> bool:
        """True when the process is the toolkit's standard VP diffusion: equal ᾱ_k, S = I (any orthonormal basis:
        the noise law N(0, I) does not depend on it)."""
        return self.schedule is not None and self.schedule.equal and bool((self.colour == 1).all())

    @property
    def base_schedule(self) -> Schedule | None:
        return None if self.schedule is None else self.schedule.base

    def spec(self) -> dict[str, Any]:
        """Plain data that rebuilds the process with `sf.forward.make(**spec, data=the same data)`."""
        return {**self._spec, "prediction": self.prediction, "free_theory": self.free_theory, "prior": self.prior_kind}

    def parametrized(self, prediction: str | None = None, free_theory: bool | None = None) -> ComponentProcess:
        """A copy with another network parametrization (same forward process)."""
        other = copy.copy(self)
        other.prediction = self.prediction if prediction is None else prediction
        other.free_theory = self.free_theory if free_theory is None else bool(free_theory)
        if other.prediction not in PREDICTIONS:
            raise ProcessError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {other.prediction!r}")
        if other.free_theory and other.statistics is None:
            raise ProcessError("the free-theory parametrization needs the data's statistics (make the process "
                               "with data)")
        return other

    def __repr__(self) -> str:
        return f"ComponentProcess({self.spec()})"

    # ---- marginals -------------------------------------------------------------------------------------------
    def _times(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return t.reshape(-1)

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """ᾱ_k(t) [T, D] of a variance-preserving process (eq. 2)."""
        if self.schedule is None:
            raise ProcessError(f"process '{self.name}' is not variance-preserving: it has no ᾱ_k; use marginal(t)")
        return self.schedule.alpha_bar(self._times(t))

    def coefficients(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(m [T, D], v [T, D]) float64: mean factor and variance of every component at the times t [T]."""
        t = self._times(t)
        if self.schedule is not None:
            ab = self.schedule.alpha_bar(t)
            return ab.sqrt(), self.colour[None, :] * (1 - ab)
        return self.coefficients_fn(t)

    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Exact per-component marginal p_t(c_k | c_k(0)) = N(mean_factor·c_k(0), var): ([D], [D]) for a scalar t,
        ([T, D], [T, D]) for t [T] (components in the basis order, `basis.k_abs` gives their |k|)."""
        scalar = not isinstance(t, Tensor) or t.ndim == 0
        m, v = self.coefficients(t)
        return (m[0], v[0]) if scalar else (m, v)

    def derivatives(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(m, v, dm/dt, dv/dt), each [T, D], by forward-mode differentiation of the coefficients."""
        t = self._times(t)
        (m, v), (dm, dv) = torch.func.jvp(self.coefficients, (t,), (torch.ones_like(t),))
        return m, v, dm, dv

    def drift_coefficients(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(a, g²) [T, D] of the SDE dc = a c dt + g dw whose marginals are (1): a = d log m/dt, g² = dv/dt − 2 a v
        (β_k = −2a and S_k² = g²/β_k for the VP members)."""
        m, v, dm, dv = self.derivatives(t)
        a = dm / m
        return a, dv - 2 * a * v

    # ---- applying it -----------------------------------------------------------------------------------------
    def _per_sample(self, t: Tensor | float, batch: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ProcessError(f"t must be a scalar or have one time per sample ({batch}), got {t.numel()}")
        return t.to(device)

    def noise_scales(self, t: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(m, √v) [B, D] in `dtype`, computed as the standard process does for the VP members
        (√ᾱ and √(1 − ᾱ) of ᾱ cast to the dtype first), so the standard process is reproduced bit for bit."""
        t = t.to("cpu")
        if self.schedule is not None:
            ab = self.schedule.alpha_bar(t).to(dtype)                                  # [B, D]
            sd = (1 - ab).sqrt()
            if not bool((self.colour == 1).all()):
                sd = sd * self.colour.sqrt().to(dtype)
            return ab.sqrt().to(device), sd.to(device)
        m, v = self.coefficients_fn(t)
        return m.to(dtype=dtype, device=device), v.sqrt().to(dtype=dtype, device=device)

    def noise_with(self, x0: Tensor, t: Tensor | float, eps: Tensor) -> Tensor:
        """x_t = Qᵀ(m ⊙ Q x₀ + √v ⊙ Q ε) for given white pixel noise ε [B, C, H, W] (eq. 1)."""
        t = self._per_sample(t, x0.shape[0], x0.device)
        m, sd = self.noise_scales(t, x0.dtype, x0.device)
        c = m * self.basis.forward(x0) + sd * self.basis.forward(eps)
        return self.basis.inverse(c)

    def noise(self, x0: Tensor, t: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """A forward sample x_t ~ p_t(· | x₀): x0 [B, C, H, W], t a float or [B]; ε drawn from `generator`."""
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return self.noise_with(x0, t, eps)

    def mean(self, x0: Tensor, t: Tensor | float) -> Tensor:
        """E[x_t | x₀] = Qᵀ(m ⊙ Q x₀) (the blur of the heat-dissipation presets), same shape as x0."""
        t = self._per_sample(t, x0.shape[0], x0.device)
        m, _ = self.coefficients(t.cpu())
        c = self.basis.forward(x0.to(torch.float64)) * m.to(x0.device)
        return self.basis.inverse(c).to(x0.dtype)

    def prior(self, z: Tensor, t: Tensor | float | None = None) -> Tensor:
        """The sampler's starting state at time t (default t_max) from standard normal z [B, C, H, W], float64.
        'noise': the process's fixed point, Qᵀ(S ⊙ Q z) for the VP members (white noise for the standard process,
        the free theory N(0, diag⟨|c_k|²⟩) for the matched colour; at any t, as the toolkit's ODE samplers take the
        noise itself as their first state), Qᵀ(√v ⊙ Q z) for the others. 'gaussian': p_t of the data's Gaussian fit
        N(μ, Σ), Qᵀ(m μ + L Q z) with L Lᵀ = M Σ M + V (diagonal Σ when the full one was not kept)."""
        t = self.t_max if t is None else t
        m, v = self.coefficients(self._times(t)[:1])
        m, v = m[0], v[0]
        if self.prior_kind == "noise" and self.schedule is not None and bool((self.colour == 1).all()):
            return self.basis.inverse(self.basis.forward(z.to(torch.float64)))     # S = I: z itself (pixels: exactly)
        zc = self.basis.forward(z.to(torch.float64))
        if self.prior_kind == "gaussian":
            if self.statistics is None:
                raise ProcessError(f"process '{self.name}' starts from the data's Gaussian fit: make it with data")
            s = self.statistics
            if s.covariance is None:                                  # diagonal fit
                return self.basis.inverse(m * s.mean + (m**2 * s.variance + v).sqrt() * zc)
            cov_t = m[:, None] * s.covariance * m[None, :] + torch.diag(v)          # M Σ M + V: p_t of N(μ, Σ)
            L = torch.linalg.cholesky(cov_t + 1e-12 * float(cov_t.diagonal().mean()) * torch.eye(len(v),
                                                                                                dtype=cov_t.dtype))
            return self.basis.inverse(m * s.mean + zc @ L.T)
        scale = self.colour.sqrt() if self.schedule is not None else v.sqrt()
        return self.basis.inverse(scale * zc)

    def ode_t_start(self) -> float:
        """Where probability-flow samplers start: for VP processes the toolkit's σ_VE = 80 point of the base
        schedule (where d log m/dt is finite), else t_max."""
        if self._ode_t_start is not None:
            return float(self._ode_t_start)
        if self.schedule is not None:
            ab_start = torch.tensor(1.0 / (1.0 + SIGMA_VE_START**2), dtype=torch.float64)
            return min(self.t_max, self.schedule.ode_t_start(ab_start))
        return self.t_max

    # ---- the ε a network predicts --------------------------------------------------------------------------
    @property
    def eps_scale(self) -> Tensor:
        """S [D]: a network under the process predicts the noise as it is drawn, e = Qᵀ(S ⊙ z) (white ε for S = I),
        so that its loss weighs each component as the data's units do (the colour S of the VP members; 1 otherwise).
        A whitened target z would weight MNIST's k = 0 component (S ≈ 21) as much as a pixel-scale one (S ≈ 0.01),
        and an error in it becomes S times larger in x̂₀."""
        return self.colour.sqrt() if self.schedule is not None else torch.ones_like(self.colour)

    def eps_target(self, eps: Tensor) -> Tensor:
        """The network's target e = Qᵀ(S ⊙ Q ε) for the white pixel noise ε [B, C, H, W] that made x_t (ε itself for
        S = I, bit for bit)."""
        if bool((self.eps_scale == 1).all()):
            return eps
        return self.basis.inverse(self.basis.forward(eps) * self.eps_scale.to(eps))

    # ---- Tweedie (eq. 3) and the free theory ----------------------------------------------------------------
    def score_from_x0(self, x: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        """∇ log p_t(x) = Qᵀ((m ⊙ ĉ₀ − c)/v) from the posterior mean x̂₀ (eq. 3), float64 [B, C, H, W]."""
        t = self._per_sample(t, x.shape[0], torch.device("cpu"))
        m, v = (u.to(x.device) for u in self.coefficients(t))
        c, c0 = self.basis.forward(x.to(torch.float64)), self.basis.forward(x0.to(torch.float64))
        return self.basis.inverse((m * c0 - c) / v.clamp_min(1e-300))

    def free_theory_x0(self, c: Tensor, m: Tensor, v: Tensor) -> Tensor:
        """Posterior mean of the diagonal Gaussian fit N(μ_k, Var_k) of the data in this basis, per component:
        ĉ₀ = μ + m Var (c − m μ)/(m² Var + v); c, m, v: [B, D] -> [B, D]."""
        s = self.statistics
        if s is None:
            raise ProcessError("the free theory needs the data's statistics (make the process with data)")
        mu, var = s.mean.to(c), s.variance.to(c)
        return mu + m * var * (c - m * mu) / (m**2 * var + v).clamp_min(1e-300)

    def free_theory_eps(self, c: Tensor, m: Tensor, v: Tensor) -> Tensor:
        """ẑ of the free theory, √v (c − m μ)/(m² Var + v) = −√v·(−Σ_t⁻¹ (c − m μ)) [B, D]: the analytic part of
        s_θ = −Σ_t⁻¹ φ + NN(φ, t) in ε units (slides, "Noise Spectrum")."""
        s = self.statistics
        if s is None:
            raise ProcessError("the free theory needs the data's statistics (make the process with data)")
        mu, var = s.mean.to(c), s.variance.to(c)
        return v.sqrt() * (c - m * mu) / (m**2 * var + v).clamp_min(1e-300)

    # ---- the network's time input ----------------------------------------------------------------------------
    def time_label(self, t: Tensor, schedule: Schedule | str) -> Tensor:
        """The ᾱ [B] a network is handed as its time input at process time t [B]. For a variance-preserving process
        it is the base schedule's ᾱ(t) — the noise level of the standard process, which is what the net is handed
        under the standard process, so a net trained either way reads it alike. Otherwise it is ᾱ_net(t') of the
        network's own `schedule`, t' the process time mapped linearly onto its range, so that the net's
        t_from_alpha_bar recovers t."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.schedule is not None:
            return self.schedule.base_alpha_bar(t)
        sched = get_schedule(schedule)
        if (sched.t_min, sched.t_max) != (self.t_min, self.t_max):
            t = sched.t_min + (t - self.t_min) / (self.t_max - self.t_min) * (sched.t_max - sched.t_min)
        return sched.alpha_bar(t).clamp(0.0, 1.0)


def matched_colour(statistics: DataStatistics, metric: Tensor, floor: float = 1e-4) -> Tensor:
    """S_k² = ⟨c_k²⟩/metric_k (the data's power in the basis, whitened coordinates for whitened PCA), raised to
    floor·mean where it is smaller (a component the data never uses, e.g. k = 0 of zero-mean fields), so the
    noise never vanishes."""
    power = statistics.power / metric
    return power.clamp_min(float(floor) * float(power.mean()) + 1e-300)


def shell_colour(statistics: DataStatistics, metric: Tensor, shells: Tensor, floor: float = 1e-4) -> Tensor:
    """S_k² = the mean of ⟨c_j²⟩/metric_j over the components j of k's shell (Haar: k's level), floored as
    `matched_colour`: noise normalized per scale (Guth et al.'s whitening of each scale's wavelet coefficients)."""
    power = statistics.power / metric
    shells = torch.as_tensor(shells, dtype=torch.int64)
    n = int(shells.max()) + 1
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, shells, power)
    per_shell = sums / torch.bincount(shells, minlength=n).to(torch.float64)
    return per_shell[shells].clamp_min(float(floor) * float(power.mean()) + 1e-300)


def check_time(t: float, process: ComponentProcess) -> None:
    if not (process.t_min - 1e-12 <= t <= process.t_max + 1e-12) or not math.isfinite(t):
        raise ProcessError(f"t = {t} lies outside the process's [{process.t_min}, {process.t_max}]")
