import pytest


@pytest.fixture(autouse=True, scope="session")
def _pack_cache(tmp_path_factory):
    """Automatic expert packs (offload disk) go to a temporary folder, not ~/.cache."""
    from expert_cache.packs import PACK_CACHE_ENV

    mp = pytest.MonkeyPatch()
    mp.setenv(PACK_CACHE_ENV, str(tmp_path_factory.mktemp("packs")))
    yield
    mp.undo()
