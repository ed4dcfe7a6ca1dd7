"""A tiny search space (the real skeleton's shape, narrow widths) so that supernet tests stay fast."""
import pytest
import torch

from mobilezoo.nas.space import Block, SearchSpace

TINY_SKELETON = (Block(2, 1, 16), Block(1, 1, 8), Block(2, 2, 16), Block(2, 2, 16), Block(2, 3, 24),
                 Block(1, 2, 24), Block(2, 2, 32), Block(1, 1, 40))


def tiny_space(families=("ibn", "fused", "tucker"), se: bool = False, act: str = "relu6") -> SearchSpace:
    """The MobileDets space on a narrow skeleton with two width multipliers."""
    return SearchSpace("tiny", families, (0.5, 1.0), act=act, se=se, skeleton=TINY_SKELETON)


@pytest.fixture(name="tiny_space")
def tiny_space_fixture():
    """The `tiny_space(families=..., se=..., act=...)` helper."""
    return tiny_space


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
