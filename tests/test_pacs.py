"""tools.pacs without a bundle: a PACS that is down or hangs is reported within the timeout, not waited on."""

from __future__ import annotations

import socket
import time

import pytest

from tools.pacs import PacsUnavailableError, connect


def test_a_pacs_that_is_down_is_refused_at_once():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(PacsUnavailableError, match=rf"the PACS at http://127.0.0.1:{port}/dicom-web did not answer"):
        connect(f"http://127.0.0.1:{port}/dicom-web", timeout=5)
    assert time.monotonic() - started < 5


def test_a_pacs_that_hangs_times_out_instead_of_hanging():
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/dicom-web"
        started = time.monotonic()
        with pytest.raises(PacsUnavailableError, match=r"within 1 s \(ReadTimeout"):
            connect(url, timeout=1)
        assert time.monotonic() - started < 5
