"""A VM's own configuration: which plugin, and what it overrides of the plugin's defaults."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from roost.errors import InvalidError
from roost.spec.common import BootArgs, Labels, Name, ResourcesOverride, Spec, VMMKind
from roost.spec.network import NetworkConfig, network_errors


def _check_override(network: NetworkConfig | None) -> None:
    """What can be judged of a VM's network override before it meets the plugin's."""
    errors = [] if network is None else network_errors(network, "vm")
    if errors:
        raise InvalidError.of(errors)


class VMConfig(Spec):
    """What an operator chose for one VM; unset fields fall back to the plugin's."""

    plugin: Name
    resources: ResourcesOverride = ResourcesOverride()
    boot_args: BootArgs | None = None
    network: NetworkConfig | None = None
    labels: Labels = Field(default_factory=dict)
    vmm: VMMKind | None = None

    @model_validator(mode="after")
    def _rules(self) -> Self:
        _check_override(self.network)
        return self


class VMConfigPatch(Spec):
    """A change to a VM's config: an absent member is unchanged, `null` returns to the plugin's
    default, `resources` merges per field and `network` is replaced as a whole."""

    resources: ResourcesOverride | None = None
    boot_args: BootArgs | None = None
    network: NetworkConfig | None = None
    labels: Labels | None = None
    vmm: VMMKind | None = None

    @model_validator(mode="after")
    def _rules(self) -> Self:
        _check_override(self.network)
        return self

    def apply(self, config: VMConfig) -> VMConfig:
        """The config this patch turns `config` into (validated again as a whole)."""
        data = config.model_dump(exclude_none=True)
        for field, value in self.model_dump(include=self.model_fields_set).items():
            if field == "resources" and self.resources is not None:
                named = self.resources.model_fields_set
                data["resources"] = {**data["resources"], **{k: value[k] for k in named}}
            elif value is None:
                data.pop(field, None)
            else:
                data[field] = value
        return VMConfig.model_validate(data)
