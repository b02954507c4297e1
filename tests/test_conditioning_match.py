"""A class-conditional network is compared with class-conditional theories driven by the same labels."""
from __future__ import annotations

import json

import torch

import scorefield as sf
from scorefield.experiments.networks import matched_conditioning


def _data() -> sf.data.ImageSet:
    g = torch.Generator().manual_seed(0)
    return sf.data.ImageSet(torch.rand(12, 1, 6, 6, generator=g) * 2 - 1, labels=torch.arange(12) % 3, name="c3")


def test_options_follow_the_network():
    data = _data()
    cond = sf.models.make("is", data, conditional=True)
    plain = sf.models.make("is", data)
    assert matched_conditioning(cond, "bbels", {"patch_size": 3}) == {"patch_size": 3, "conditional": True}
    assert matched_conditioning(cond, "bbels", {"conditional": False}) == {"conditional": False}
    assert matched_conditioning(plain, "bbels", {}) == {}
    assert matched_conditioning(cond, "no-such-theory", {}) == {}


def test_predicting_a_conditional_network_uses_conditional_theories(tmp_path):
    data = _data()
    network = sf.models.make("is", data, conditional=True)
    res = sf.experiments.predict(network, data, theories=["is", "ls"], schedule_from=3, seeds=range(3), steps=4,
                                 out=tmp_path, progress=False)
    config = json.loads((res.run_dir / "config.json").read_text())["theories"]
    assert config["is"]["conditional"] is True and config["ls"]["conditional"] is True
    # the conditional IS machine with the network's own labels reproduces the network (itself) exactly
    assert float(res.scores["is"]["r2"].min()) > 1 - 1e-6
