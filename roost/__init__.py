"""roost: runs plugins as microVMs, each networked as vsock-only, bridged or dhcp."""

__version__ = "0.1.0"
