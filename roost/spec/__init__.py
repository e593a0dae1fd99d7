"""The pure data model of plugins and VMs, and every rule of the three network modes."""

from roost.spec.common import Resources, ResourcesOverride, VMMKind
from roost.spec.interfaces import InterfaceConfig, IPv6Static
from roost.spec.manifest import Artifact, Manifest
from roost.spec.network import NetworkConfig, NetworkMode
from roost.spec.parse import load_json, parse
from roost.spec.vmconfig import VMConfig, VMConfigPatch

__all__ = [
    "Artifact",
    "IPv6Static",
    "InterfaceConfig",
    "Manifest",
    "NetworkConfig",
    "NetworkMode",
    "Resources",
    "ResourcesOverride",
    "VMConfig",
    "VMConfigPatch",
    "VMMKind",
    "load_json",
    "parse",
]
