"""Sample-by-sample agreement of two denoisers' outputs (kamb-ganguli Tables 1–2, Fig. 1, Fig. 10).

Two numbers per sample b, both over all pixels and channels of the pair (ref_b, cand_b):

    r²      = 1 − Σ(ref − cand)² / Σ(ref − mean(ref))²      the coefficient of determination of cand as a
                                                             prediction of ref (the paper's definition; it
                                                             can be negative, and a constant shift lowers it)
    pearson = Pearson correlation of ref and cand           (what the authors' released evaluation computes
                                                             while calling it r²; blind to shifts and scales)

The headline number of every table is the median r² (the coefficient of determination); Pearson r is always
reported beside it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor


class AgreementError(ValueError):
    """The two image batches cannot be compared."""


def _as_batch(images: Any, name: str) -> Tensor:
    x = torch.as_tensor(images.detach().cpu() if isinstance(images, Tensor) else np.asarray(images))
    if x.ndim != 4:
        raise AgreementError(f"{name} must be a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise AgreementError(f"{name} contains NaN or infinite values")
    return x.to(torch.float64)


def agreement(reference: Any, candidate: Any) -> dict[str, Tensor]:
    """{"r2": [B], "pearson": [B]} of `candidate` [B, C, H, W] as a prediction of `reference` [B, C, H, W].

    A constant reference image has no variance: its r² and Pearson r are NaN (undefined), never a number."""
    ref, cand = _as_batch(reference, "reference"), _as_batch(candidate, "candidate")
    if ref.shape != cand.shape:
        raise AgreementError(f"reference {tuple(ref.shape)} and candidate {tuple(cand.shape)} differ in shape")
    ref, cand = ref.flatten(1), cand.flatten(1)                     # [B, D]
    ref_c = ref - ref.mean(1, keepdim=True)
    cand_c = cand - cand.mean(1, keepdim=True)
    ss_tot = ref_c.pow(2).sum(1)
    ss_res = (ref - cand).pow(2).sum(1)
    nan = torch.full_like(ss_tot, float("nan"))
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), nan)
    denom = (ss_tot * cand_c.pow(2).sum(1)).sqrt()
    pearson = torch.where(denom > 0, (ref_c * cand_c).sum(1) / denom.clamp_min(1e-300), nan)
    return {"r2": r2, "pearson": pearson}


def _quartiles(values: np.ndarray) -> tuple[float, float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return (float("nan"),) * 3
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return float(med), float(q1), float(q3)


def agreement_table(scores: Mapping[str, Mapping[str, Tensor]], baseline: str | None = "is") -> list[dict[str, Any]]:
    """One row per compared denoiser, in the paper's format: median r² with quartiles, median Pearson r with
    quartiles, and the fraction of samples on which its r² beats the baseline's (the IS machine: memorization)."""
    base = None if baseline is None or baseline not in scores else scores[baseline]["r2"].numpy()
    rows = []
    for name, s in scores.items():
        r2, pearson = s["r2"].numpy(), s["pearson"].numpy()
        med, q1, q3 = _quartiles(r2)
        p_med, p_q1, p_q3 = _quartiles(pearson)
        row: dict[str, Any] = {"theory": name, "n": int(r2.size), "r2_median": med, "r2_q25": q1, "r2_q75": q3,
                               "pearson_median": p_med, "pearson_q25": p_q1, "pearson_q75": p_q3}
        if base is not None:
            row[f"fraction_beats_{baseline}"] = (float(np.mean(r2 > base)) if name != baseline
                                                 else float("nan"))
        rows.append(row)
    return rows


def per_sample_rows(scores: Mapping[str, Mapping[str, Tensor]], seeds: Sequence[int],
                    labels: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One row per sample: its seed (and label), then r² and Pearson r of every compared denoiser."""
    rows = []
    for i, seed in enumerate(seeds):
        row: dict[str, Any] = {"sample": i, "seed": int(seed)}
        if labels is not None:
            row["label"] = int(labels[i])
        for name, s in scores.items():
            row[f"{name}_r2"] = float(s["r2"][i])
            row[f"{name}_pearson"] = float(s["pearson"][i])
        rows.append(row)
    return rows
