"""The public API page (docs/API.md) is the contract: every `sf.` name it lists resolves, and its examples run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scorefield as sf

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "API.md"


def listed_names() -> list[str]:
    """Every dotted `sf.` name in the page's inline code and code blocks (call arguments dropped)."""
    names = set(re.findall(r"\bsf(?:\.[A-Za-z_][A-Za-z0-9_]*)+", API_PAGE.read_text()))
    return sorted(names)


def resolve(name: str):
    obj = sf
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_the_page_lists_the_contract():
    names = listed_names()
    assert len(names) > 50
    for core in ("sf.models.make", "sf.sampling.sample", "sf.experiments.calibrate", "sf.analysis.agreement",
                 "sf.forward.make", "sf.models.adapters.from_diffusers"):
        assert core in names


def test_every_listed_name_resolves_after_a_plain_import():
    """In a fresh interpreter (other tests import submodules, which would hide a name missing from a plain
    `import scorefield as sf`)."""
    script = ("import json, sys, scorefield as sf\nmissing = []\nfor name in json.loads(sys.argv[1]):\n"
              "    obj = sf\n    try:\n        for part in name.split('.')[1:]:\n            obj = getattr(obj, part)\n"
              "    except AttributeError:\n        missing.append(name)\nprint(json.dumps(missing))")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(listed_names())], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("name", listed_names())
def test_every_listed_name_is_public(name):
    obj = resolve(name)
    assert not any(part.startswith("_") for part in name.split(".")), name
    assert obj is not None


def test_the_call_convention():
    g = torch.Generator().manual_seed(0)
    data = sf.data.ImageSet(torch.rand(6, 1, 9, 9, generator=g) * 2 - 1, name="contract")
    x, ab = torch.randn(2, 1, 9, 9, generator=g), torch.tensor([0.3, 0.8])
    for name, opts in [("els", {"patch_size": 5, "padding": "circular"}), ("is", {}), ("gaussian", {})]:
        out = sf.models.make(name, data, **opts)(x, ab)
        assert out.shape == x.shape and torch.isfinite(out).all()
    samples = sf.sampling.sample(sf.models.make("is", data), torch.randn(2, 1, 9, 9, generator=g), steps=5,
                                 sampler="ddim", schedule="cosine")
    assert samples.shape == (2, 1, 9, 9)
    scores = sf.analysis.agreement(samples, samples)
    assert torch.allclose(torch.as_tensor(scores["r2"]), torch.ones(2).double(), atol=1e-6)
