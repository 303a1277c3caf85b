"""Test-wide settings: latency measurements go to a per-session cache, never to the user's."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("DATD_CACHE_DIR", str(tmp_path_factory.mktemp("datd-cache")))
    yield
    patch.undo()
