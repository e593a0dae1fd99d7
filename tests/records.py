"""Rows the state tests start from, written straight to a real database."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from roost.state.db import Database
from roost.state.hosts import HostRegistration
from roost.state.models import VM, Plugin


def make_vms(db: Database, count: int, prefix: str = "vm") -> list[int]:
    """`count` created VMs named `<prefix>-<i>` of one plugin `p` (made on first use); their
    ids."""

    def work(session: Session) -> list[int]:
        plugin = session.scalar(select(Plugin).where(Plugin.name == "p"))
        if plugin is None:
            plugin = Plugin(name="p", version="1", manifest={})
            session.add(plugin)
            session.flush()
        vms = [
            VM(
                name=f"{prefix}-{i}",
                plugin_id=plugin.id,
                status="created",
                vmm_kind="firecracker",
                network={},
            )
            for i in range(count)
        ]
        session.add_all(vms)
        session.flush()
        return [vm.id for vm in vms]

    return db.transact(work)


def host_registration(name: str, vtep: str) -> HostRegistration:
    """Host `name` of a cluster at VTEP `vtep`, with a Unix socket API no one answers, no labels
    or facts, 8 vCPUs and 4 GiB."""
    return HostRegistration(
        name=name,
        vtep_address=vtep,
        api=f"unix:///run/roost-{name}.sock",
        labels={},
        capacity_vcpus=8,
        capacity_memory_mib=4096,
        facts={},
    )
