"""A tiny search runs end to end on a generated shapes set and resumes to the same state."""
import json
import random

import pytest
import torch

from mobilezoo.data import shapes
from mobilezoo.engine.checkpoint import STATE
from mobilezoo.errors import UserError
from mobilezoo.models import create_model
from mobilezoo.models.weights import safe_torch_load
from mobilezoo.nas.latency import LatencyModel, features
from mobilezoo.nas.search import run_search
from mobilezoo.nas.space import from_arch, sample, validate_arch


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return shapes.ensure(tmp_path_factory.mktemp("shapes") / "shapes", num_train=10, num_val=2)


def _latency_model(space):
    # A synthetic cost model (exact on its own function): 1 ms per output channel of each layer.
    rng = random.Random(0)
    cs = [sample(space, rng) for _ in range(200)]
    ms = [sum(f[2] / 8 for f in features(space, c) if f[0] != "skip") for c in cs]
    return LatencyModel.fit(space, cs, ms, ridge=0)


def _run(root, out, space, lat, **kw):
    return run_search(str(root), target_ms=30.0, steps=4, out_dir=out, space=space, latency_model=lat,
                      batch_size=2, img_size=128, rl_warmup=0.0, controller_lr=0.05, ckpt_every=1,
                      progress=False, seed=3, **kw)


def _controller_logits(out):
    state = safe_torch_load(out / STATE, "trainer state")
    return state, [v for k, v in sorted(state["extra"]["controller"]["module"].items()) if k.startswith("logits")]


def test_tiny_search_end_to_end_and_resumable(tmp_path, shapes_root, tiny_space):
    space = tiny_space()
    lat = _latency_model(space)
    lat_path = lat.save(tmp_path / "lat.json")
    straight = _run(shapes_root, tmp_path / "a", space, lat_path)
    arch = validate_arch(straight)
    doc = json.loads(straight.read_text())
    assert from_arch(space, arch) == doc["search"]["choices"]
    create_model("ssdlite_mobiledet", arch=str(straight), num_classes=5)  # trains standalone
    for name in ("choice_probs.png", "quality_vs_latency.png", "search_log.jsonl"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    log = [json.loads(line) for line in (tmp_path / "a" / "search_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["reward"] == pytest.approx(r["quality"] - 0.5 * abs(r["latency_ms"] / 30.0 - 1)) for r in log)

    _run(shapes_root, tmp_path / "b", space, lat_path, stop_after=2)
    with pytest.raises(UserError, match="resume"):
        _run(shapes_root, tmp_path / "b", space, lat_path)
    resumed = _run(shapes_root, tmp_path / "b", space, lat_path, resume=True, workers=1)  # same batches in a worker
    state_a, logits_a = _controller_logits(tmp_path / "a")
    state_b, logits_b = _controller_logits(tmp_path / "b")
    assert state_a["step"] == state_b["step"] == 4
    assert any(float(v.abs().max()) > 0 for v in logits_a)  # the controller did learn something
    for a, b in zip(logits_a, logits_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert json.loads(resumed.read_text()) == doc
    assert (tmp_path / "b" / "search_log.jsonl").read_text() == (tmp_path / "a" / "search_log.jsonl").read_text()


def test_search_with_several_architectures_per_reward_batch(tmp_path, shapes_root, tiny_space):
    space = tiny_space()
    _run(shapes_root, tmp_path / "k", space, _latency_model(space), samples_per_step=3)
    log = [json.loads(line) for line in (tmp_path / "k" / "search_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for s in range(4):  # leave-one-out advantages of each step's three rewards
        rewards = [r["reward"] for r in log[3 * s: 3 * s + 3]]
        assert [r["advantage"] for r in log[3 * s: 3 * s + 3]] == pytest.approx(
            [x - (sum(rewards) - x) / 2 for x in rewards])
    with pytest.raises(UserError, match="samples_per_step"):
        _run(shapes_root, tmp_path / "k0", space, _latency_model(space), samples_per_step=0)


def test_search_rejects_a_latency_model_of_another_space(tmp_path, shapes_root, tiny_space):
    lat = _latency_model(tiny_space(("ibn",)))
    with pytest.raises(UserError, match="latency model was fit for search space"):
        _run(shapes_root, tmp_path / "c", tiny_space(), lat)
    with pytest.raises(UserError, match="needs a latency model"):
        _run(shapes_root, tmp_path / "c", tiny_space(), None)
