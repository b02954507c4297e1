"""Every run directory records which route, implementation and device served each engine call, with bounds."""
import torch

import scorefield as sf
from scorefield.experiments import engine_log
from scorefield.experiments.sample_run import SampleConfig, run_sampling


def test_sampling_run_records_every_engine_call(tmp_path):
    cfg = SampleConfig(model="els", model_options={"patch_size": 3}, data="digits",
                       data_options={"subset": 40}, n=3, steps=4, batch_size=2)
    run = run_sampling(cfg, root=tmp_path, name="s", progress=False)
    rows = engine_log.read(run)
    assert len(rows) == 2 * 4                       # two batches × four denoiser calls (DDIM, 4 steps)
    assert {r["batch"] for r in rows} == {0, 1}
    for r in rows:
        assert r["cross_term"] in ("gemm", "box") and r["fold"] in ("compiled", "reference")
        assert r["device"] == "cpu" and r["patch_size"] == 3 and r["neglected_bound"] >= 0
    summary = run.read_json("summary.json")["engine"]
    assert summary["calls"] == 8 and sum(summary["by_route"].values()) == 8


def test_log_names_the_float64_reference_and_autograd_folds():
    data = sf.data.load("digits", subset=30)
    model = sf.models.make("bbels", data, patch_size=3, dtype="float64")
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    model(x, 0.5)
    model(x.clone().requires_grad_(True), 0.5)
    folds = [e["fold"] for e in model.engine_log()]
    assert folds == ["reference", "autograd"] and model.engine_log() == []


def test_torn_last_line_is_skipped(tmp_path):
    run = sf.runs.RunDir.create("test", {}, root=tmp_path, name="t")
    run.file("engine.jsonl").write_text('{"cross_term": "gemm", "fold": "compiled", "device": "cpu"}\n{"cross_')
    assert engine_log.summarize(run)["calls"] == 1
