"""Kept at its old path for the modules that still import it (tests/e2e, tests/integration/test_cli.py);
new code imports tests.support.servers."""

from tests.support.servers import CHATQUEUE, Server, free_port, running_server

__all__ = ["CHATQUEUE", "Server", "free_port", "running_server"]
