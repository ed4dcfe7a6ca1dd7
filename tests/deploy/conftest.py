"""Every deploy test module runs on one torch thread (the shared `one_thread` fixture)."""
import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield
