"""Fixtures of the server tests (helpers live in srv_helpers.py)."""
import pytest

from server.async_engine import AsyncEngine
from srv_helpers import live_server, make_engine


@pytest.fixture(scope="session")
def srv(mixtral_dir):
    """The shared server: batch of 8, a 64 KiB body limit, no API key."""
    with live_server(AsyncEngine(make_engine(mixtral_dir, max_num_seqs=8), max_queue=64), max_body_bytes=65536) as s:
        yield s

