"""NetnsWorker.inside(): the calling thread is in the namespace for the block, and only then."""

from __future__ import annotations

import os
import threading

import pytest

from roost.host.netns import NetnsWorker, netns_path
from tests.harness import network_namespace

pytestmark = pytest.mark.root


def current_namespace() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def test_inside_moves_the_calling_thread_and_brings_it_back_even_on_error() -> None:
    own = current_namespace()
    with network_namespace() as name:
        target = f"net:[{netns_path(name).stat().st_ino}]"
        worker = NetnsWorker(name)
        try:
            seen_by_another_thread: list[str] = []
            look, looked = threading.Event(), threading.Event()

            def another_thread() -> None:
                look.wait(5)
                seen_by_another_thread.append(current_namespace())
                looked.set()

            other = threading.Thread(target=another_thread)
            other.start()
            with worker.inside():
                assert current_namespace() == target
                look.set()
                assert looked.wait(5)
            other.join()
            assert current_namespace() == own
            assert seen_by_another_thread == [own]  # setns moves the calling thread only

            with pytest.raises(RuntimeError), worker.inside():
                raise RuntimeError("inside")
            assert current_namespace() == own
            assert worker.run(current_namespace) == target
        finally:
            worker.close()
