"""Search space: restrictions, architecture JSON round trip and validation."""
import json
import random

import pytest

from mobilezoo.errors import UserError
from mobilezoo.models import create_model
from mobilezoo.models.mobiledet import ARCHS
from mobilezoo.nas.space import SPACES, canonical, from_arch, get_space, sample, save_arch, to_arch, validate_arch


def test_restricted_spaces_hold_only_their_families():
    ops = {name: {o.split("_")[0] for d in s.decisions if d.position >= 0 for o in d.options}
           for name, s in SPACES.items()}
    # block 1 is a depthwise-separable conv (ibn_noexp) in every space; skip for layers 2-4
    assert ops["ibn"] == {"ibn", "skip"}
    assert ops["ibn_fused"] == {"ibn", "fused", "skip"}
    assert ops["ibn_fused_tucker"] == {"ibn", "fused", "tucker", "skip"}
    assert get_space("ibn+fused+tucker") is SPACES["ibn_fused_tucker"]
    full = SPACES["ibn_fused_tucker"]
    # spec §5.2: 4 IBN + 4 fused + 4 Tucker ops (+ skip) on a skippable layer
    assert len(full.layer_ops(3, 1)) == 13 and len(full.layer_ops(3, 0)) == 12
    assert full.num_positions == 23  # stem + 1 + 5 x 4 + 1 (MobileDet-CPU: 20 layers, 3 skipped)
    with pytest.raises(UserError, match="unknown search space"):
        get_space("ibn_only")


def test_released_cpu_backbone_is_in_the_cpu_space():
    # Spec §5.2: with the multipliers 0.5/0.625/0.75 the MobileDet-CPU widths are reachable from the
    # base widths, its block 2 keeps 1 of 4 layers, and its ops are IBNs (+SE, hard-swish).
    space = get_space({**SPACES["cpu_ibn_fused_tucker"].to_dict(), "multipliers": [0.5, 0.625, 0.75, 1.0]})
    choices = from_arch(space, ARCHS["cpu"])
    assert to_arch(space, choices) == ARCHS["cpu"]
    names = {d.name: d.options[c] for d, c in zip(space.decisions, choices)}
    assert names["block2.layer1.op"] == "skip" and names["block6.width"] == 0.625
    assert names["block4.layer0.op"] == "ibn_k5_e8"


def test_json_round_trip_builds_the_same_detector(tmp_path, tiny_space):
    space = tiny_space()
    rng = random.Random(3)
    for _ in range(5):
        choices = sample(space, rng)
        arch = to_arch(space, choices)
        path = save_arch(arch, tmp_path / "arch.json", search={"choices": choices})
        loaded = validate_arch(path)
        assert loaded == arch
        assert from_arch(space, loaded) == canonical(space, choices)
        assert to_arch(space, from_arch(space, loaded)) == arch
    model = create_model("ssdlite_mobiledet", arch=str(path), num_classes=3)
    assert len(model.backbone.layers) == len(arch)


def test_skips_are_canonical(tiny_space):
    space = tiny_space()
    c = [0] * len(space.decisions)
    k = [d.name for d in space.decisions].index("block4.layer1.op")
    skip = space.decisions[k].options.index("skip")
    a, b = list(c), list(c)
    a[k] = skip          # skip layer 1 of block 4, keep layer 2
    b[k + 1] = skip      # skip layer 2, keep layer 1
    assert to_arch(space, a) == to_arch(space, b)
    assert canonical(space, a) == b


@pytest.mark.parametrize("field, value, message", [
    ("kernel", "3", "layer 4: field 'kernel'"),
    ("stride", 3, "layer 4: field 'stride'"),
    ("out", -8, "layer 4: field 'out'"),
    ("expansion", 1, "layer 4: field 'expansion'"),
    ("residual", "yes", "layer 4: field 'residual'"),
])
def test_malformed_file_names_the_bad_field(tmp_path, field, value, message, tiny_space):
    arch = to_arch(tiny_space(("ibn",)), [0] * len(tiny_space(("ibn",)).decisions))
    assert arch[4]["type"] == "ibn"
    arch[4][field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"layers": arch}))
    with pytest.raises(UserError, match=message):
        validate_arch(path)


def test_residual_on_a_width_change_is_rejected_and_unknown_ops_named(tmp_path, tiny_space):
    space = tiny_space(("ibn",))
    arch = to_arch(space, [0] * len(space.decisions))
    bad = [dict(layer) for layer in arch]
    bad[2]["residual"] = True  # first layer of block 2: stride 2
    with pytest.raises(UserError, match="layer 2: field 'residual'"):
        validate_arch(bad)
    tucker = [dict(layer) for layer in arch]
    tucker[3] = {"type": "tucker", "kernel": 3, "stride": 1, "out": arch[3]["out"], "ratios": [0.25, 0.25],
                 "residual": True, "act": "relu6"}
    with pytest.raises(UserError, match="layer 3: op tucker_0.25_0.25 is not allowed"):
        from_arch(space, tucker)
    with pytest.raises(UserError, match="cannot read"):
        validate_arch(tmp_path / "missing.json")
