"""The field's other analytic theories of diffusion generalization, behind the one denoiser interface.

- `wiener`: the Wiener filter, the exact posterior mean of Gaussian data (= `gaussian`; also one per class);
  the linear theory.
- `pca-locality`: the posterior over training images with distances inside per-pixel masks read off the
  Wiener filter (Lukoianov et al. 2025).
- `cfdm`: the ideal denoiser averaged over noise-perturbed copies of its input (Scarvelis et al. 2023).
- `pspc`: position-specific patch posteriors, overlapping patch means averaged per pixel (Niedoba et al. 2024).
- `topk`: the ideal denoiser on each sample's k nearest training images (exact search), the neglected
  posterior mass bounded.
- `nearest`: the nearest training image.

Where a theory is a patch or image posterior it is folded by the engine (`scorefield.engine`).
"""
from . import cfdm, neighbours, pca_locality, pspc, wiener  # noqa: F401  (each registers its models)
