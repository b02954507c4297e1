"""φ⁴ lattice fields: a 2-D periodic scalar field theory sampled by Hamiltonian Monte Carlo or Metropolis.

The RG slides (../shared/papers/rg-diffusion-slides.txt, "Summary": "Tried on 6x6 phi4 samples") train the
component-wise forward processes on φ⁴ samples and write the free part of the action as (k² + m²)/K_Λ(k)
("Recall Polchinski RG"); they give no lattice normalization, so this module fixes one and states it.

**The action** (lattice spacing 1, L × L sites, periodic, μ ∈ {x̂, ŷ}):

    S[φ] = Σ_x [ ½ Σ_μ (φ_{x+μ} − φ_x)² + ½ m² φ_x² + (λ/4!) φ_x⁴ ],      p(φ) ∝ exp(−S[φ]),

with m² = `mass2` (negative for the broken phase, as long as λ > 0) and λ = `coupling` ≥ 0. The free part is
½ φᵀ(−Δ + m²)φ, so at λ = 0 the field is Gaussian with covariance (−Δ + m²)⁻¹ and

    G(x) = ⟨φ_{y+x} φ_y⟩ = (1/L²) Σ_k e^{ik·x} / (m² + Σ_μ 4 sin²(k_μ/2)),   k_μ ∈ (2π/L)·{0, …, L−1}

(`free_two_point`), the lattice form of the slides' 1/(k² + m²). The hopping-parameter form used in much
lattice work, S = Σ_x [−2κ Σ_μ ϕ_x ϕ_{x+μ} + (1 − 2λ̃)ϕ_x² + λ̃ϕ_x⁴], is the same theory with φ = √(2κ)·ϕ,
m² = (1 − 2λ̃)/κ − 4, λ = 6λ̃/κ² (`from_hopping`).

**Observables.** magnetization M = (1/L²) Σ_x φ_x (the mean field, so Var M = 1/(m² L²) at λ = 0); the action
S per sample; the connected two-point function G_c(x) = (1/L²) Σ_y ⟨φ_{y+x} φ_y⟩ − ⟨M⟩² averaged over
translations (`two_point`).

**Sampling.** Batched independent chains in float64. HMC: H = ½|p|² + S, leapfrog with a step size tuned
during thermalization to a target acceptance and then frozen, a fixed trajectory length (each chain's step
jittered ±10% per trajectory so no mode of the free theory resonates with the trajectory), per-chain
accept/reject. Metropolis: checkerboard sweeps of single-site moves φ_x → φ_x + δ·U(−1, 1) (a sweep updates
every site once; sites of one colour have no common bond, so a colour is updated at once). Both measure the
acceptance rate and the integrated autocorrelation time τ_int of M, |M| and S (Sokal's automatic windowing,
`autocorrelation_time`), thermalize for at least 20 τ_int after tuning and keep every ⌈2 τ_int⌉-th
configuration. Time is counted in trajectories (HMC) or sweeps (Metropolis).

**Images.** `ImageSet` holds [N, C, H, W] float32 in [−1, 1], and a φ⁴ field is unbounded, so the dataset
stores x = φ / s with one scale s per set: by default s = max |φ| over the set (nothing is clipped, so the
physical field is φ = s·x up to float32 rounding, and the Z₂ symmetry φ → −φ stays x → −x), or a scale the
caller fixes (shared by train and test sets; a field outside it is an error, never clipped). The scale is
`provenance["field_scale"]`; `fields(data)` returns φ in float64. A clip would cut the tails that the
magnetization and action histograms compare, and a per-pixel standardization would change the spectrum, so
neither is used.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .imageset import DataError, ImageSet
from .registry import register_dataset
from .synthetic import _generator

Tensor = torch.Tensor

METHODS = ("hmc", "metropolis")
TARGET_ACCEPTANCE = {"hmc": 0.8, "metropolis": 0.5}
OBSERVABLES = ("magnetization", "abs_magnetization", "action")


# ---------------------------------------------------------------- checks


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise DataError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DataError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_parameters(size: object, mass2: object, coupling: object) -> tuple[int, float, float]:
    """(size, m², λ) validated: size ≥ 2, finite m² and λ ≥ 0, and an action bounded below (m² > 0 when λ = 0)."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 2:
        raise DataError(f"size must be an integer ≥ 2 (an L × L periodic lattice), got {size!r}")
    mass2, coupling = _finite("mass2", mass2), _finite("coupling", coupling)
    if coupling < 0:
        raise DataError(f"coupling λ = {coupling:g} < 0: the action is unbounded below (exp(−S) not normalizable)")
    if coupling == 0 and mass2 <= 0:
        raise DataError(f"mass2 = {mass2:g} ≤ 0 with coupling 0: the free action is unbounded below (the "
                        "k = 0 mode is flat or unstable); use mass2 > 0, or coupling > 0 for the broken phase")
    return int(size), mass2, coupling


def _lattice(phi: Tensor) -> Tensor:
    """Fields [n, L, L] (float64) from [L, L], [n, L, L] or [n, 1, L, L]."""
    phi = torch.as_tensor(phi)
    if phi.ndim == 4:
        if phi.shape[1] != 1:
            raise DataError(f"φ⁴ fields have one channel; got shape {tuple(phi.shape)}")
        phi = phi[:, 0]
    elif phi.ndim == 2:
        phi = phi[None]
    elif phi.ndim != 3:
        raise DataError(f"fields must be [L, L], [n, L, L] or [n, 1, L, L]; got shape {tuple(phi.shape)}")
    return phi.to(torch.float64)


# ---------------------------------------------------------------- action, force, observables


def laplacian(phi: Tensor) -> Tensor:
    """Periodic lattice Laplacian (Δφ)_x = Σ_μ (φ_{x+μ} + φ_{x−μ} − 2φ_x) over the last two dims."""
    return (phi.roll(1, -1) + phi.roll(-1, -1) + phi.roll(1, -2) + phi.roll(-1, -2)) - 4 * phi


def action(phi: Tensor, mass2: float, coupling: float) -> Tensor:
    """S[φ] of each field (see the module docstring): [n, L, L] or [n, 1, L, L] → [n] float64."""
    phi = _lattice(phi)
    kinetic = (phi.roll(-1, -1) - phi) ** 2 + (phi.roll(-1, -2) - phi) ** 2  # [n, L, L]
    density = 0.5 * kinetic + 0.5 * mass2 * phi**2 + (coupling / 24.0) * phi**4
    return density.sum(dim=(-2, -1))


def force(phi: Tensor, mass2: float, coupling: float) -> Tensor:
    """∂S/∂φ_x = −(Δφ)_x + m² φ_x + (λ/6) φ_x³, same shape as phi (any leading dims, lattice last)."""
    return -laplacian(phi) + mass2 * phi + (coupling / 6.0) * phi**3


def magnetization(phi: Tensor) -> Tensor:
    """M = (1/L²) Σ_x φ_x per field: [n, L, L] or [n, 1, L, L] → [n] float64."""
    return _lattice(phi).mean(dim=(-2, -1))


def correlators(phi: Tensor) -> Tensor:
    """Per-field translation-averaged products C_i(x) = (1/L²) Σ_y φ_i(y + x) φ_i(y): [n, L, L] float64
    (displacement x in fft order: index [r, 0] is r sites along the first axis, periodic)."""
    phi = _lattice(phi)
    f = torch.fft.fft2(phi)
    return torch.fft.ifft2(f.abs() ** 2).real / (phi.shape[-1] * phi.shape[-2])


def two_point(phi: Tensor, connected: bool = True) -> Tensor:
    """Estimator of the two-point function G(x) = (1/L²) Σ_y ⟨φ_{y+x} φ_y⟩ (− ⟨M⟩² if connected) from
    samples [n, L, L] or [n, 1, L, L]: [L, L] float64, displacement in fft order (G[r, 0] is distance r).

    The sample average of `correlators`; connected subtracts the squared sample mean of the field (zero in
    expectation by the Z₂ symmetry φ → −φ; in the broken phase without tunnelling it removes the vev)."""
    c = correlators(phi).mean(dim=0)
    if connected:
        c = c - magnetization(phi).mean() ** 2
    return c


def free_two_point(size: int, mass2: float) -> Tensor:
    """Exact G(x) of the free theory (λ = 0) on the periodic size × size lattice, [size, size] float64 in fft
    order: G(x) = (1/L²) Σ_k e^{ik·x} / (m² + Σ_μ 4 sin²(k_μ/2)), the inverse of −Δ + m²."""
    size, mass2, _ = check_parameters(size, mass2, 0.0)
    k = 2 * math.pi * torch.arange(size, dtype=torch.float64) / size
    lam = 4 * torch.sin(k / 2) ** 2
    propagator = 1.0 / (mass2 + lam[:, None] + lam[None, :])  # [L, L] in momentum space
    return torch.fft.ifft2(propagator).real


def from_hopping(kappa: float, lam: float) -> tuple[float, float, float]:
    """(mass2, coupling, field_scale) of this module's action for the hopping-parameter action
    S = Σ_x [−2κ Σ_μ ϕ_x ϕ_{x+μ} + (1 − 2λ̃)ϕ_x² + λ̃ ϕ_x⁴]: φ = field_scale·ϕ with field_scale = √(2κ),
    m² = (1 − 2λ̃)/κ − 4, λ = 6λ̃/κ² (expand ½(φ_{x+μ} − φ_x)² and match the three terms; 2-D)."""
    kappa, lam = _finite("kappa", kappa), _finite("lam", lam)
    if kappa <= 0:
        raise DataError(f"kappa must be positive, got {kappa:g}")
    return (1 - 2 * lam) / kappa - 4.0, 6 * lam / kappa**2, math.sqrt(2 * kappa)


# ---------------------------------------------------------------- autocorrelation


@dataclass
class AutocorrelationTime:
    """τ_int = ½ + Σ_{t=1}^{W} ρ(t) (so Var(mean) = 2 τ_int Var/N), its error, the window W, and whether
    Sokal's criterion W ≥ c·τ_int(W) was met inside the series (if not, τ is a lower bound)."""

    tau: Tensor
    error: Tensor
    window: Tensor
    converged: Tensor

    def as_dict(self) -> dict[str, Any]:
        return {"tau": self.tau.tolist(), "error": self.error.tolist(), "window": self.window.tolist(),
                "converged": self.converged.tolist()}


def autocorrelation_time(series: Tensor, c: float = 5.0) -> AutocorrelationTime:
    """Integrated autocorrelation time by Sokal's automatic windowing (Madras & Sokal 1988, App. C;
    Sokal, "Monte Carlo methods in statistical mechanics", 1996, §3).

    series: [T] or [chains, T, *D] (independent chains of one stationary process; D are separate
    observables). The autocovariance Γ(t) is averaged over chains about the global mean with 1/(N − t)
    weights, ρ(t) = Γ(t)/Γ(0), τ(W) = ½ + Σ_{t≤W} ρ(t), and W is the smallest window with W ≥ c·τ(W).
    Error: δτ ≈ τ √(2(2W + 1)/N), N = chains·T. A constant series has τ = ½."""
    x = torch.as_tensor(series, dtype=torch.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim < 2 or x.shape[1] < 2:
        raise DataError(f"autocorrelation_time needs a series [chains, T ≥ 2, ...], got shape {tuple(x.shape)}")
    chains, steps = x.shape[:2]
    x = x - x.mean(dim=(0, 1), keepdim=True)
    f = torch.fft.rfft(x, n=2 * steps, dim=1)
    gamma = torch.fft.irfft(f * f.conj(), n=2 * steps, dim=1)[:, :steps].sum(0)  # [T, *D]
    lags = torch.arange(steps, dtype=torch.float64).reshape(-1, *([1] * (gamma.ndim - 1)))
    gamma = gamma / (chains * (steps - lags))
    var = gamma[0]
    rho = gamma / torch.where(var > 0, var, torch.ones_like(var))
    tau_w = 0.5 + torch.cumsum(rho[1:], dim=0)  # [T − 1, *D]: τ(W) for W = 1 … T − 1
    windows = lags[1:].expand_as(tau_w)
    ok = windows >= c * tau_w
    converged = ok.any(dim=0)
    first = torch.where(converged, ok.to(torch.int8).argmax(dim=0), torch.full_like(var, steps - 2, dtype=torch.int64))
    tau = tau_w.gather(0, first[None]).squeeze(0)
    window = first + 1
    constant = var <= 0
    tau = torch.where(constant, torch.full_like(tau, 0.5), tau)
    converged = converged | constant
    n = chains * steps
    error = tau.abs() * torch.sqrt(2 * (2 * window.to(torch.float64) + 1) / n)
    return AutocorrelationTime(tau, error, window, converged)


def mean_and_error(values: Tensor, chains: int = 1, c: float = 5.0) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, standard error, τ_int) of per-sample values [n, *D] ordered time-major ([T, chains] flattened:
    sample i is time i // chains of chain i % chains, as `sample_phi4` returns them). The error is
    √(2 τ_int Var / N) with τ_int from `autocorrelation_time` on the complete time rows."""
    v = torch.as_tensor(values, dtype=torch.float64)
    chains = _positive_int("chains", chains)
    steps = v.shape[0] // chains
    if steps < 2:
        raise DataError(f"need at least 2 samples per chain for an error bar; got {v.shape[0]} for {chains} chains")
    v = v[: steps * chains].reshape(steps, chains, *v.shape[1:]).transpose(0, 1)  # [chains, T, *D]
    tau = autocorrelation_time(v, c).tau.clamp(min=0.5)
    n = steps * chains
    var = v.var(dim=(0, 1), unbiased=True) if n > 1 else torch.zeros_like(tau)
    return v.mean(dim=(0, 1)), torch.sqrt(2 * tau * var / n), tau


# ---------------------------------------------------------------- HMC and Metropolis


def leapfrog(phi: Tensor, momentum: Tensor, step_size: float | Tensor, n_steps: int, mass2: float,
             coupling: float) -> tuple[Tensor, Tensor]:
    """n_steps of the leapfrog (kick–drift–kick) integrator for H = ½|p|² + S[φ]; phi, momentum [C, L, L];
    step_size a number or [C, 1, 1] (one per chain). Time-reversible and volume-preserving; the energy error
    after a fixed trajectory length is O(ε²)."""
    phi, p = phi.clone(), momentum - 0.5 * step_size * force(phi, mass2, coupling)
    for i in range(n_steps):
        phi = phi + step_size * p
        if i < n_steps - 1:
            p = p - step_size * force(phi, mass2, coupling)
    p = p - 0.5 * step_size * force(phi, mass2, coupling)
    return phi, p


def hamiltonian(phi: Tensor, momentum: Tensor, mass2: float, coupling: float) -> Tensor:
    """H = ½ Σ_x p_x² + S[φ] per chain: [C]."""
    return 0.5 * (momentum**2).sum(dim=(-2, -1)) + action(phi, mass2, coupling)


def hmc_trajectory(phi: Tensor, step_size: float, n_steps: int, mass2: float, coupling: float,
                   generator: torch.Generator, jitter: float = 0.1) -> tuple[Tensor, Tensor]:
    """One HMC update of every chain: fresh Gaussian momenta, a leapfrog trajectory with each chain's step
    ε·U(1 − jitter, 1 + jitter), Metropolis accept/reject per chain on exp(−ΔH).
    Returns (new phi [C, L, L], acceptance probability min(1, e^{−ΔH}) per chain [C]; NaN ΔH is rejected)."""
    chains = phi.shape[0]
    p0 = _randn(phi.shape, generator, phi.device)
    eps = step_size * (1 + jitter * (2 * _rand((chains, 1, 1), generator, phi.device) - 1))
    h0 = hamiltonian(phi, p0, mass2, coupling)
    new, p1 = leapfrog(phi, p0, eps, n_steps, mass2, coupling)
    dh = hamiltonian(new, p1, mass2, coupling) - h0
    dh = torch.where(torch.isfinite(dh), dh, torch.full_like(dh, math.inf))
    accept_prob = torch.exp(-dh.clamp(min=0))
    accept = _rand((chains,), generator, phi.device) < accept_prob
    return torch.where(accept[:, None, None], new, phi), accept_prob


def _colours(size: int) -> tuple[Tensor, int]:
    """A proper colouring of the periodic L × L lattice (no bond joins two sites of one colour): the
    checkerboard for even L; for odd L the last row/column gets a third class a = 2 and colour = (a_x + a_y)
    mod 3. Returns (colour [L, L], number of colours)."""
    a = torch.arange(size) % 2
    if size % 2:
        a[-1] = 2
        return (a[:, None] + a[None, :]) % 3, 3
    return (a[:, None] + a[None, :]) % 2, 2


def metropolis_sweep(phi: Tensor, delta: float, mass2: float, coupling: float,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One sweep of single-site Metropolis: every site gets one proposal φ_x + δ·U(−1, 1), colour by colour.
    The local action of site x is s(φ_x) = (2 + m²/2) φ_x² − φ_x Σ_{±μ} φ_{x±μ} + (λ/24) φ_x⁴.
    Returns (new phi [C, L, L], fraction of accepted site updates per chain [C])."""
    colour, n_colours = _colours(phi.shape[-1])
    colour = colour.to(phi.device)
    accepted = torch.zeros(phi.shape[0], dtype=torch.float64, device=phi.device)
    for k in range(n_colours):
        mask = colour == k  # [L, L]
        neighbours = phi.roll(1, -1) + phi.roll(-1, -1) + phi.roll(1, -2) + phi.roll(-1, -2)
        proposal = phi + delta * (2 * _rand(phi.shape, generator, phi.device) - 1)

        def local(v: Tensor, nb: Tensor = neighbours) -> Tensor:
            return (2 + 0.5 * mass2) * v**2 - v * nb + (coupling / 24.0) * v**4

        ds = local(proposal) - local(phi)
        accept = (_rand(phi.shape, generator, phi.device) < torch.exp(-ds.clamp(min=0))) & mask
        phi = torch.where(accept, proposal, phi)
        accepted += accept.sum(dim=(-2, -1))
    return phi, accepted / (phi.shape[-1] * phi.shape[-2])


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    # drawn on the generator's (CPU) device so a seed gives the same stream whatever device runs the chains
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


# ---------------------------------------------------------------- the sampler


@dataclass
class Phi4Samples:
    """Fields [n, 1, L, L] float64 (time-major: sample i is time i // chains of chain i % chains), the
    chain count, and the sampler's diagnostics (plain data; see `sample_phi4`)."""

    fields: Tensor
    chains: int
    diagnostics: dict[str, Any] = field(default_factory=dict)


class _Chains:
    """The state of C chains and the update that advances them by one trajectory / sweep."""

    def __init__(self, phi: Tensor, method: str, mass2: float, coupling: float, generator: torch.Generator,
                 step: float, trajectory_length: float, z2_flip: bool) -> None:
        self.phi, self.method, self.mass2, self.coupling = phi, method, mass2, coupling
        self.generator, self.step, self.trajectory_length, self.z2_flip = generator, step, trajectory_length, z2_flip

    def n_steps(self) -> int:
        """Leapfrog steps of the next trajectory: T/ε rounded up or down at random (probability the
        fractional part), so the mean trajectory length is T and the acceptance is continuous in ε (a fixed
        rounding would make the step tuning hover at a jump of round(T/ε)); drawn independently of the
        state, so detailed balance holds."""
        ratio = self.trajectory_length / self.step
        up = _rand((1,), self.generator, torch.device("cpu")).item() < ratio - math.floor(ratio)
        return max(1, math.floor(ratio) + int(up))

    def update(self) -> Tensor:
        """Advance every chain once; the acceptance (probability for HMC, fraction for Metropolis) [C]."""
        if self.method == "hmc":
            self.phi, acc = hmc_trajectory(self.phi, self.step, self.n_steps(), self.mass2, self.coupling,
                                           self.generator)
        else:
            self.phi, acc = metropolis_sweep(self.phi, self.step, self.mass2, self.coupling, self.generator)
        if self.z2_flip:
            # φ → −φ is an exact symmetry of S: flipping with probability ½ is a Metropolis move with
            # acceptance 1, which carries chains between the two vacua of the broken phase
            flip = _rand((self.phi.shape[0], 1, 1), self.generator, self.phi.device) < 0.5
            self.phi = torch.where(flip, -self.phi, self.phi)
        return acc

    def observables(self) -> Tensor:
        """[C, 3]: M, |M|, S of every chain."""
        m = self.phi.mean(dim=(-2, -1))
        return torch.stack([m, m.abs(), action(self.phi, self.mass2, self.coupling)], dim=1)


def default_chains(size: int, n: int) -> int:
    """Chains run side by side: about 2¹⁵ lattice sites in all (the per-op overhead is amortized from there
    on CPU, and it is torch's grain below which an elementwise op stays on one thread), at least 16, at most n."""
    return max(1, min(n, max(16, (1 << 15) // (size * size))))


def sample_phi4(size: int = 6, mass2: float = 0.5, coupling: float = 3.0, n: int = 1000,
                seed: int | torch.Generator = 0, method: str = "hmc", chains: int | None = None,
                step_size: float | None = None, trajectory_length: float = 1.0,
                target_acceptance: float | None = None, tune: int = 200,
                thermalization: int | None = None, thin: int | None = None, thin_factor: float = 2.0,
                min_thermalization: int = 100, max_pilot: int = 5000, z2_flip: bool = False,
                device: str | torch.device | None = None) -> Phi4Samples:
    """n independent-chain samples of the φ⁴ theory on the periodic size × size lattice (module docstring).

    Schedule, with time in trajectories (HMC) or sweeps (Metropolis):
    1. `chains` chains start from φ ~ N(0, 1) per site; `tune` updates adapt the step (the leapfrog ε, or
       the Metropolis δ) toward `target_acceptance` (0.8 HMC, 0.5 Metropolis) by Robbins–Monro in log step,
       then the step is frozen (unless `step_size` is given, which is used throughout).
    2. Thermalization: with `thermalization=None` a pilot run of at least `min_thermalization` updates is
       extended (doubling, up to `max_pilot`) until Sokal's window has converged for M, |M| and S and the
       pilot is ≥ 20 τ_max long; the pilot is discarded. An integer runs exactly that many updates.
    3. Production: ⌈n / chains⌉ samples per chain, one every `thin` updates (default ⌈thin_factor · τ_max⌉
       with τ_max the largest pilot τ_int among the observables whose window converged; with a given
       `thermalization` and no `thin`, thin = 1 and τ is only measured afterwards). Samples are stored
       time-major and cut to n.

    Diagnostics (all plain data): acceptance (mean, min and max over chains, production), step, leapfrog
    steps, τ_int with error, window and convergence for each observable in the pilot and in production
    (units: updates), thin, thermalization, wall time and samples/s. A τ whose window did not converge
    within `max_pilot` gives a warning: in the broken phase M tunnels between the vacua so rarely that each
    chain stays in one (the ensemble of many chains still holds both), and z2_flip=True adds the exact
    global move φ → −φ that makes M mix."""
    size, mass2, coupling = check_parameters(size, mass2, coupling)
    n = _positive_int("n", n)
    if method not in METHODS:
        raise DataError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
    chains = default_chains(size, n) if chains is None else _positive_int("chains", chains)
    chains = min(chains, n)
    per_chain = -(-n // chains)
    chains = -(-n // per_chain)  # as few chains as give n samples in per_chain rows
    target = TARGET_ACCEPTANCE[method] if target_acceptance is None else _finite("target_acceptance",
                                                                                 target_acceptance)
    if not 0 < target < 1:
        raise DataError(f"target_acceptance must lie in (0, 1), got {target:g}")
    trajectory_length = _finite("trajectory_length", trajectory_length)
    if trajectory_length <= 0:
        raise DataError(f"trajectory_length must be positive, got {trajectory_length:g}")
    if step_size is not None and (_finite("step_size", step_size) <= 0):
        raise DataError(f"step_size must be positive, got {step_size!r}")
    tune = _positive_int("tune", tune, minimum=0)
    if thermalization is not None:
        thermalization = _positive_int("thermalization", thermalization, minimum=0)
    if thin is not None:
        thin = _positive_int("thin", thin)
    thin_factor = _finite("thin_factor", thin_factor)
    if thin_factor <= 0:
        raise DataError(f"thin_factor must be positive, got {thin_factor:g}")
    min_thermalization = _positive_int("min_thermalization", min_thermalization, minimum=2)
    max_pilot = _positive_int("max_pilot", max_pilot, minimum=min_thermalization)
    if isinstance(seed, torch.Generator):
        generator = seed
    else:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise DataError(f"seed must be an integer or a torch.Generator, got {seed!r}")
        generator = torch.Generator().manual_seed(int(seed))
    device = torch.device("cpu" if device is None else device)

    start = time.perf_counter()
    phi0 = _randn((chains, size, size), generator, device)
    if step_size is None:
        # stable leapfrog needs ε·ω_max < 2, ω_max² = m² + 8 at λ = 0; start well inside, then adapt
        step = 0.5 / math.sqrt(8 + abs(mass2)) if method == "hmc" else 1.0
    else:
        step = float(step_size)
    sampler = _Chains(phi0, method, mass2, coupling, generator, step, trajectory_length, z2_flip)
    tune_acc, log_steps = [], []
    largest = trajectory_length if method == "hmc" else 1e3  # an HMC step never exceeds its trajectory
    with torch.inference_mode():
        for i in range(tune):
            acc = sampler.update().mean().item()
            tune_acc.append(acc)
            if step_size is None:
                # Robbins–Monro in log step on the chain-averaged acceptance probability
                log_step = math.log(sampler.step) + (acc - target) * 2.0 / (1 + i) ** 0.6
                sampler.step = min(math.exp(log_step), largest)
                log_steps.append(math.log(sampler.step))
        if log_steps:
            # the frozen step: the average of the last quarter of the iterates (less noisy than the last one)
            sampler.step = math.exp(sum(log_steps[-(len(log_steps) // 4 or 1):]) / (len(log_steps) // 4 or 1))

        pilot: dict[str, Any] | None = None
        if thermalization is None:
            history = [sampler.observables()]
            length = min_thermalization
            while True:
                while len(history) < length:
                    sampler.update()
                    history.append(sampler.observables())
                series = torch.stack(history, dim=1)  # [C, T, 3]
                tau = autocorrelation_time(series)
                # an observable whose window never converged (M tunnelling between the vacua of the broken
                # phase) has only a lower bound on τ; it is reported and warned about, not thinned by
                measured = tau.tau[tau.converged] if bool(tau.converged.any()) else tau.tau
                tau_max = float(measured.max())
                if (bool(tau.converged.all()) and length >= 20 * tau_max) or length >= max_pilot:
                    break
                length = min(2 * length, max_pilot)
            thermalization = length
            pilot = _tau_report(tau)
            if thin is None:
                thin = max(1, math.ceil(thin_factor * tau_max))
        else:
            for _ in range(thermalization):
                sampler.update()
            if thin is None:
                thin = 1

        samples, acceptance, history = [], [], []
        for _ in range(per_chain):
            for _ in range(thin):
                acceptance.append(sampler.update())
                history.append(sampler.observables())
            samples.append(sampler.phi.clone())
    elapsed = time.perf_counter() - start

    fields = torch.stack(samples).reshape(per_chain * chains, 1, size, size)[:n].cpu()  # time-major
    acc = torch.stack(acceptance).mean(dim=0)  # per chain [C]
    production = (_tau_report(autocorrelation_time(torch.stack(history, dim=1).cpu()))
                  if len(history) >= 2 else None)
    updates = tune + thermalization + per_chain * thin
    diagnostics: dict[str, Any] = {
        "method": method, "size": size, "mass2": mass2, "coupling": coupling, "n": n, "chains": chains,
        "samples_per_chain": per_chain, "z2_flip": bool(z2_flip), "device": str(device),
        "acceptance": float(acc.mean()), "acceptance_min_chain": float(acc.min()),
        "acceptance_max_chain": float(acc.max()), "target_acceptance": target,
        "tune_acceptance_last": float(sum(tune_acc[-20:]) / max(1, len(tune_acc[-20:]))) if tune_acc else None,
        "step_size" if method == "hmc" else "proposal_width": sampler.step,
        "time_unit": "trajectory" if method == "hmc" else "sweep",
        "tune": tune, "thermalization": thermalization, "thin": thin, "updates_per_chain": updates,
        "tau_int_pilot": pilot, "tau_int_production": production,
        "seconds": elapsed, "samples_per_second": n / elapsed if elapsed > 0 else None,
    }
    if method == "hmc":
        diagnostics.update(leapfrog_steps_mean=max(1.0, trajectory_length / sampler.step),
                           trajectory_length=trajectory_length)
    # a production series shorter than a pilot (explicit thermalization and thin) is too short to judge
    report = pilot or (production if len(history) >= min_thermalization else None)
    if report is not None and not all(report[name]["converged"] for name in OBSERVABLES):
        bad = [name for name in OBSERVABLES if not report[name]["converged"]]
        warnings.warn(f"φ⁴ sampler: the autocorrelation window did not converge for {', '.join(bad)} "
                      f"(τ_int is a lower bound, not used for thinning; thin = {thin}). In the broken phase pass "
                      "z2_flip=True; else run longer (max_pilot) or with a longer trajectory_length.",
                      RuntimeWarning, stacklevel=2)
    return Phi4Samples(fields, chains, diagnostics)


def _tau_report(tau: AutocorrelationTime) -> dict[str, dict[str, Any]]:
    return {name: {"tau": float(tau.tau[i]), "error": float(tau.error[i]), "window": int(tau.window[i]),
                   "converged": bool(tau.converged[i])} for i, name in enumerate(OBSERVABLES)}


# ---------------------------------------------------------------- the dataset


@register_dataset("phi4")
def load_phi4(split: str = "train", size: int = 6, mass2: float = 0.5, coupling: float = 3.0, n: int = 10000,
              method: str = "hmc", chains: int | None = None, scale: float | None = None,
              trajectory_length: float = 1.0, z2_flip: bool = False, seed: int = 0) -> ImageSet:
    """2-D periodic φ⁴ lattice fields (HMC or Metropolis), images x = φ / field_scale in [-1, 1].

    S = Σ_x [½ Σ_μ (φ_{x+μ} − φ_x)² + ½ m² φ² + (λ/4!) φ⁴] with m² = mass2 (< 0 allowed when coupling > 0) and
    λ = coupling (see `scorefield.data.phi4`). field_scale = max |φ| over the set unless `scale` fixes it
    (then |φ| > scale is an error). `fields(data)` gives φ back; provenance holds the sampler's acceptance,
    τ_int of M, |M| and S, thinning and thermalization. `train` and `test` draw from disjoint streams."""
    generator = _generator(seed, split)
    result = sample_phi4(size=size, mass2=mass2, coupling=coupling, n=n, seed=generator, method=method,
                         chains=chains, trajectory_length=trajectory_length, z2_flip=z2_flip)
    largest = float(result.fields.abs().max())
    if scale is None:
        field_scale = largest if largest > 0 else 1.0
    else:
        field_scale = _finite("scale", scale)
        if field_scale <= 0:
            raise DataError(f"scale must be positive, got {field_scale:g}")
        if largest > field_scale:
            raise DataError(f"scale = {field_scale:g} is smaller than the largest |φ| = {largest:.4g} of this set; "
                            f"images would be clipped. Use scale ≥ {largest:.4g} or scale=None (automatic)")
    images = (result.fields / field_scale).clamp(-1, 1)
    provenance = {"source": "φ⁴ lattice fields, 2-D periodic, S = Σ[½(∂φ)² + ½m²φ² + (λ/4!)φ⁴] "
                            "(scorefield.data.phi4)",
                  "split": split, "seed": seed, "field_scale": field_scale,
                  "normalization": f"x = φ / {field_scale:.6g} (max |φ| of the set unless fixed); φ = fields(data)",
                  "sampler": result.diagnostics}
    return ImageSet(images, name="phi4", provenance=provenance)


def field_scale(data: ImageSet) -> float:
    """The factor s with φ = s·x for a `phi4` ImageSet (also converts generated samples in its units)."""
    try:
        return float(data.provenance["field_scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"ImageSet '{data.name}' has no field_scale in its provenance: not a phi4 set") from exc


def fields(data: ImageSet | Tensor, scale: float | None = None) -> Tensor:
    """The physical fields φ [n, 1, L, L] float64 of a `phi4` ImageSet (its images times its field_scale), or
    of image-unit tensors x (generated samples) with an explicit `scale` (use `field_scale(train_data)`)."""
    if isinstance(data, ImageSet):
        return data.images.to(torch.float64) * (field_scale(data) if scale is None else float(scale))
    if scale is None:
        raise DataError("fields(x) of a tensor needs the scale: fields(x, scale=field_scale(data))")
    return torch.as_tensor(data).to(torch.float64) * float(scale)


__all__ = ["AutocorrelationTime", "Phi4Samples", "action", "autocorrelation_time", "check_parameters",
           "correlators", "field_scale", "fields", "force", "free_two_point", "from_hopping", "hamiltonian",
           "hmc_trajectory", "laplacian", "leapfrog", "load_phi4", "magnetization", "mean_and_error",
           "metropolis_sweep", "sample_phi4", "two_point"]
