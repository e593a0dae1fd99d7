"""Typer (0.29 and later) turns every value a command receives into its parameter's type with a
pydantic TypeAdapter, built on first use; importing pydantic and building the adapters is most
of what a command that only asks the daemon something spends before it starts.

Most values need no conversion: an option not given (None) and a string for a `str` parameter
come out as they went in. `PlainValuesGroup`, the root group's class, gives every parameter in
the tree a coercion that returns those values at once, exactly as Typer's own would, and hands
any other value to Typer's own (pydantic and all), which is built as before when first needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

# Typer's own coercion layer (private: tests/unit/test_cli_fast.py holds it to its behaviour)
from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
from typer.core import TyperGroup, _TyperParameter


@dataclass(frozen=True)
class PlainValues(RuntimeParam):
    """Typer's RuntimeParam (which returns None as it is), with a `str` parameter's string
    returned as it is too; any other value goes to the coercion Typer would have used."""

    descriptor: TypeDescriptor

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        if type(value) is str and self.annotation is str and self.parameter_info.parser is None:
            return value
        return self._typer._coerce_value(value, param=param, ctx=ctx)

    @cached_property
    def _typer(self) -> RuntimeParam:
        return build_runtime_param(self.descriptor)


def _plain_values(command: Any, ctx: Any) -> None:
    help_option = command.get_help_option(ctx)  # made once per command, and kept
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if isinstance(param, _TyperParameter) and param._runtime_param is None:
            descriptor = param.type_descriptor
            param._runtime_param = PlainValues(
                parameter_info=descriptor.parameter_info,
                annotation=descriptor.annotation,
                descriptor=descriptor,
            )
    for sub in getattr(command, "commands", {}).values():
        _plain_values(sub, ctx)


class PlainValuesGroup(TyperGroup):
    """The root group: before it parses a command line, every parameter of the tree (each
    command's --help too) converts the values that need no conversion without pydantic."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _plain_values(self, ctx)
        return super().parse_args(ctx, args)
