"""Component-wise forward processes of the RG slides (rg-diffusion-slides.txt): bases, per-component schedules, noise
colour, exact marginals, exact denoisers, samplers and score-matching losses under each process.

    proc = sf.forward.make("component", data, basis="fourier", schedule="rg-cutoff", colour="matched")
    mean_factor, var = proc.marginal(t)                  # per component, exact
    xt = proc.noise(x0, t, generator=g)                   # a forward sample
    net = sf.training.train(model, data, process=proc)    # DSM under the process
    x = sf.sampling.sample(model, noise, process=proc, steps=20, sampler="ddim")

Named configurations: 'standard' (the toolkit's diffusion), 'matched', 'rg-cutoff', 'matched-rg', 'scale-by-scale',
'matched-scale-by-scale', 'wavelet' (Guth et al.'s wavelet score model), and the presets 'heat-dissipation'
(Rissanen et al.) and 'blurring' (Hoogeboom & Salimans). See `presets.make`. `denoising_check(process, net, images)`
measures a trained net under its own process (`scorefield load` on a process-trained run).
"""
from __future__ import annotations

from .bases import BASES, Basis, BasisError, make_basis
from .denoisers import (
    GaussianProcessDenoiser,
    IdealProcessDenoiser,
    NetProcessDenoiser,
    ProcessDenoiser,
    as_process_denoiser,
    denoising_check,
    gaussian_denoiser,
)
from .presets import NAMED, PRESETS, PROCESSES, available_processes, from_spec, make
from .process import ComponentProcess, DataStatistics, ProcessError
from .sampling import PROCESS_SAMPLERS, process_grid, sample_process
from .schedules import COMPONENT_SCHEDULES, EqualSchedule, RGCutoffSchedule, ScaleByScaleSchedule
from .training import process_loss


def ideal_denoiser(process: ComponentProcess, data) -> IdealProcessDenoiser:  # noqa: ANN001
    """The exact posterior mean of `data`'s empirical distribution under `process`."""
    return IdealProcessDenoiser(process, data)


def load_run(run_dir) -> tuple[ComponentProcess, object]:  # noqa: ANN001
    """(process, trained net) of a training run made with `train(..., process=...)`: the process is rebuilt from
    the run's config on its recorded dataset."""
    import scorefield as sf

    from ..runs import RunDir

    run = RunDir.open(run_dir)
    config = run.config
    spec = (config.get("training") or {}).get("process")
    if not spec:
        raise ProcessError(f"{run.path} was not trained under a component process")
    data_spec = dict(config.get("data") or {})
    if not data_spec.get("name"):
        raise ProcessError(f"{run.path} was trained on in-memory data: rebuild the process with "
                           "sf.forward.from_spec(spec, data)")
    data = sf.data.load(**data_spec)
    process = from_spec(spec, data)
    net = sf.models.load(run_dir)
    net.process_parametrization = {"prediction": process.prediction, "free_theory": process.free_theory}
    net.process = process
    return process, net


__all__ = [
    "BASES", "COMPONENT_SCHEDULES", "NAMED", "PRESETS", "PROCESSES", "PROCESS_SAMPLERS", "Basis", "BasisError",
    "ComponentProcess", "DataStatistics", "EqualSchedule", "GaussianProcessDenoiser", "IdealProcessDenoiser",
    "NetProcessDenoiser", "ProcessDenoiser", "ProcessError", "RGCutoffSchedule", "ScaleByScaleSchedule",
    "as_process_denoiser", "available_processes", "denoising_check", "from_spec", "gaussian_denoiser",
    "ideal_denoiser", "load_run", "make", "make_basis", "process_grid", "process_loss", "sample_process",
]
