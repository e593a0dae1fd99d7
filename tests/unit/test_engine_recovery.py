"""Recovery on an engine over fakes: a VM that cannot be recovered is left as it is and
refuses operations, while the others are recovered."""

from __future__ import annotations

from pathlib import Path

import pytest

from roost.engine.recovery import Recovery
from roost.engine.settings import Orphans
from roost.errors import HostError
from roost.spec import VMConfig
from roost.state.vms import LiveRecord
from tests.engine_fakes import World


def test_one_vm_that_cannot_be_recovered_does_not_stop_the_others(tmp_path: Path) -> None:
    first = World(tmp_path)
    try:
        for name in ("a", "b", "c"):
            first.engine.create_vm(name, VMConfig(plugin="p"))
        running = {p.pid for p in first.driver.started}
        # a restart: a new engine on the same database, the old one's VMMs still running
        first.engine.watcher.close()
        again = World(tmp_path, install=False)
        adopt = again.engine.adopt

        def adopt_but_b(record: LiveRecord, process: object) -> None:
            if record.name == "b":
                raise HostError("the tap of b is not what it was")
            adopt(record, process)  # type: ignore[arg-type]

        again.engine.adopt = adopt_but_b  # type: ignore[method-assign]
        recovery = Recovery(again.engine, Orphans.REFUSE)
        recovery.check()
        recovery.start().join(10)
        assert recovery.finished.is_set()
        assert set(again.engine.live) == {"a", "c"}
        assert {live.process.pid for live in again.engine.live.values()} < running
        assert again.engine.pause_vm("a")["status"] == "paused"
        with pytest.raises(HostError, match="could not recover VM 'b'"):
            again.engine.stop_vm("b")
        assert again.engine.show_vm("b")["status"] == "running"  # left as it was
        assert again.engine.health()["status"] == "ok"
        again.close()
    finally:
        first.close()  # ends (and reaps) the VMMs
