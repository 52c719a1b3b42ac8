from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers and apps that tests start keep chat history and the session secret in a temporary
    folder, never in the home directory (tests that care pass --data-dir themselves)."""
    os.environ.setdefault("CHATQUEUE_DATA", str(tmp_path_factory.mktemp("chatqueue-data")))
    yield
