"""Defaults the CLI shows in its help, kept free of pydantic (their layers re-export them) so
that building the command tree loads no model."""

from __future__ import annotations

from pathlib import Path

DEFAULT_SUBNET = "10.57.0.0/24"  # the daemon's default network (roost.plan.network)
CNI_CONF_DIR = Path("/etc/cni/net.d")  # roost serve --cni-conf-dir (roost.host.cni)
CNI_BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))  # --cni-bin-dir, in order
