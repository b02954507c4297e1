"""scorefield.experiments.criticality_run and `scorefield criticality` at tiny size."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

import scorefield as sf
from scorefield.analysis import criticality as cr
from scorefield.cli import main
from scorefield.data.synthetic import make_patch_dictionary
from scorefield.experiments.criticality_run import criticality_run

FILES = ("config.json", "summary.json", "trajectories.npz", "curves.csv", "softening.csv", "critical_times.csv",
         "critical_times.md", "criticality.png", "xi_eq.png", "snapshots.png", "parts/part-000.npz")


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_cli_dictionary_run_at_tiny_size(tmp_path, capsys):
    rc = main(["criticality", "--model", "dictionary", "--data", "patch-dictionary", "--data-opt", "size=10",
               "--data-opt", "n=4", "--n", "2", "--steps", "40", "--softening-every", "5", "--out", str(tmp_path),
               "--name", "tiny", "--no-progress"])
    assert rc == 0
    run = tmp_path / "tiny"
    for name in FILES:
        assert (run / name).is_file(), name
    printed = capsys.readouterr().out
    assert "two-state tree level" in printed and "run directory" in printed
    table = _rows(run / "critical_times.csv")
    two_state = next(r for r in table if r["estimate"].startswith("two-state"))
    assert float(two_state["t"]) == pytest.approx(math.log(26), rel=1e-12)
    kinds = {r["kind"] for r in table}
    assert kinds == {"theory", "measured"}
    assert any(r["estimate"].startswith("spectral criterion, dictionary") for r in table)
    assert any(r["estimate"].startswith("speciation (Biroli et al. 2024), data") for r in table)
    assert any(r["estimate"].startswith("empirical t_c") for r in table)
    assert "\\|Ω\\|" in (run / "critical_times.md").read_text()            # pipes escaped in the Markdown table
    curves = _rows(run / "curves.csv")
    assert len(curves) == 41 and float(curves[0]["t"]) == pytest.approx(50.0)
    assert float(curves[-1]["t"]) == pytest.approx(1e-3)
    assert len(_rows(run / "softening.csv")) == 9                           # steps 0, 5, …, 40
    config = json.loads((run / "config.json").read_text())
    assert config["schedule"] == "constant" and config["route"] == "convolution"
    assert config["model"]["options"]["patterns"].startswith("10 patterns")  # the data's own dictionary
    summary = json.loads((run / "summary.json").read_text())
    assert summary["route_max_abs_difference"] < 1e-10 and summary["n"] == 2
    z = np.load(run / "trajectories.npz")
    assert z["xi"].shape == (2, 41) and z["lam_i"].shape == (2, 9, 7) and z["snapshots"].shape == (2, 6, 1, 10, 10)


def _dictionary_machine(size: int = 10):
    d = make_patch_dictionary()
    data = sf.data.load("patch-dictionary", n=4, size=size)
    return sf.models.make("dictionary", data, patterns=d.patterns, priors=d.priors, dtype="float64"), data


def test_resume_recomputes_nothing_and_refuses_changed_options(tmp_path):
    machine, data = _dictionary_machine()
    kw = dict(n=3, steps=20, softening_every=4, out=tmp_path, progress=False, figures=False)
    run = criticality_run(machine, (1, 10, 10), name="a", **kw)
    first = run.load_arrays("trajectories")
    # an interrupted run: the last part and the analysis are gone
    (run.path / "parts/part-002.npz").unlink()
    (run.path / "trajectories.npz").unlink()
    saved = np.load(run.path / "parts/part-000.npz")["seconds"]
    again = criticality_run(machine, (1, 10, 10), resume=run.path, **{**kw, "out": None})
    second = again.load_arrays("trajectories")
    np.testing.assert_array_equal(first["xi"], second["xi"])
    np.testing.assert_array_equal(first["xi_eq"], second["xi_eq"])
    assert np.load(run.path / "parts/part-000.npz")["seconds"] == saved     # part 0 was read, not recomputed
    assert not (run.path / "criticality.png").exists()
    # a larger n adds trajectories with the next seeds, the first ones unchanged
    more = criticality_run(machine, (1, 10, 10), resume=run.path, **{**kw, "n": 5, "out": None})
    z = more.load_arrays("trajectories")
    assert z["seeds"].tolist() == [0, 1, 2, 3, 4] and more.config["n"] == 5
    np.testing.assert_array_equal(z["xi"][:3], first["xi"])
    # analysis-only options change on resume without recomputing a trajectory
    ranged = criticality_run(machine, (1, 10, 10), resume=run.path, **{**kw, "n": 5, "out": None, "smoothing": 0.2,
                                                                        "tc_range": (0.5, 5.0)})
    assert ranged.config["tc_range"] == [0.5, 5.0] and ranged.config["smoothing"] == 0.2
    assert "xi_eq_argmax_in_range" in ranged.read_json("summary.json")["measured"]
    with pytest.raises(ValueError, match="steps"):
        criticality_run(machine, (1, 10, 10), n=3, steps=30, softening_every=4, resume=run.path, progress=False,
                        figures=False)


def test_machine_and_convolution_routes_give_the_same_trajectories(tmp_path):
    machine, _ = _dictionary_machine()
    kw = dict(n=2, steps=15, softening_every=5, out=tmp_path, progress=False, figures=False)
    fast = criticality_run(machine, (1, 10, 10), name="fast", **kw).load_arrays("trajectories")
    slow = criticality_run(machine, (1, 10, 10), name="slow", route="machine", **kw).load_arrays("trajectories")
    np.testing.assert_allclose(fast["final"], slow["final"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast["lam_i"], slow["lam_i"], rtol=1e-5, atol=1e-5)


def test_network_run_with_data_theory(tmp_path):
    data = sf.data.load("digits")
    net = sf.models.make("convnet", data, preset="tiny", schedule="constant")
    run = criticality_run(net, (1, 8, 8), n=2, steps=12, softening_every=6, method="jvp", data=data,
                          patch_size=3, out=tmp_path, name="net", progress=False)
    table = _rows(run.path / "critical_times.csv")
    names = [r["estimate"] for r in table]
    assert "spectral criterion, covariance of the data's patches" in names
    assert "speciation (Biroli et al. 2024), data covariance" in names
    two_state = next(r for r in table if r["estimate"].startswith("two-state"))
    assert float(two_state["t"]) == pytest.approx(math.log(10))             # |Ω| = 3²
    spectral = next(r for r in table if r["estimate"].startswith("spectral"))
    lam = cr.top_eigenvalue(cr.patch_covariance_of_images(data.images.double(), 3))
    assert float(spectral["t"]) == pytest.approx(math.log1p(lam), rel=1e-6)
    z = run.load_arrays("trajectories")
    assert np.isfinite(z["lam_i"]).all() and z["xi"].shape == (2, 13)
    assert run.config["schedule"] == "constant" and run.config["route"] == "exact-eps"


def test_exact_eps_net_and_the_log_tau_grid():
    from scorefield.convert import score_from_x0
    from scorefield.experiments.criticality_run import ExactEpsNet, _grid
    from scorefield.schedules import get_schedule

    net = sf.models.make("convnet", sf.data.load("digits"), preset="tiny", schedule="constant")
    wrapped = ExactEpsNet(net)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    for ab in (math.exp(-50), 1e-6, 0.3):
        a = torch.full((2,), ab, dtype=torch.float64)
        with torch.no_grad():
            eps = net.predict_eps(x, a).double()
            score = score_from_x0(x, wrapped(x, a), a)
        torch.testing.assert_close(score, -eps / math.sqrt(1 - ab), rtol=1e-6, atol=1e-9)   # s = −ε̂/σ
    with torch.no_grad():                                                  # above the floor: the net's own call
        torch.testing.assert_close(wrapped(x, 0.3), net(x, 0.3).double(), rtol=1e-5, atol=1e-5)
    # log-tau: eq. 59's grid in τ = −log ᾱ on any schedule; the log grid in t on the constant one
    cosine = get_schedule("cosine")
    ts = _grid(cosine, "log-tau", 100, 0.99, 1e-3)
    tau = -torch.log(cosine.alpha_bar(ts))
    steps = torch.diff(tau.log())
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-6, atol=1e-9)
    constant = get_schedule("constant")
    torch.testing.assert_close(_grid(constant, "log-tau", 50, 50.0, 1e-3), _grid(constant, "log", 50, 50.0, 1e-3))


def test_bad_options_are_refused(tmp_path):
    machine, _ = _dictionary_machine()
    for bad, match in (({"n": 1}, "n must"), ({"grid": "karras"}, "grid"), ({"route": "fast"}, "route"),
                       ({"softening_every": 0}, "softening_every"), ({"t_min": 60.0}, "t_min"),
                       ({"method": "exact"}, "method")):
        with pytest.raises(ValueError, match=match):
            criticality_run(machine, (1, 10, 10), out=tmp_path, progress=False, **{"n": 2, "steps": 5, **bad})
    net = sf.models.make("convnet", sf.data.load("digits"), preset="tiny")
    with pytest.raises(ValueError, match="convolution"):
        criticality_run(net, (1, 8, 8), n=2, steps=5, route="convolution", out=tmp_path, progress=False)
