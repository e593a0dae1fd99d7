"""`--interface SPEC`, the command line's form of a VM's `interfaces` (how they read in
tables is roost.cli.views').

A SPEC is one interface as comma-separated KEY=VALUE pairs (`mode=bridged,network=lan,
ip=10.1.0.5`); the option is repeated for each interface, in the guest's device order. The
parser only splits the text: what the values mean is judged by the VM config's validation,
whose errors name `interfaces.<i>.<field>` like those of a config file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer

from roost.cli.options import NetworkFlags
from roost.cli.output import usage_error

# the fields of an interface (roost.spec.InterfaceConfig), in the order the help names them
SPEC_KEYS = (
    "name",
    "mode",
    "network",
    "subnet",
    "gateway",
    "auto_assign",
    "ip",
    "mac",
    "ipv6",
    "default_route",
    "policies",
    "policy_defaults",
    "cni",
)
BOOLEAN_KEYS = ("auto_assign", "default_route")
SPEC_EXAMPLE = "mode=bridged,network=lan,ip=10.1.0.5"
HOW_TO_WRITE = f"write KEY=VALUE pairs separated by commas, e.g. --interface {SPEC_EXAMPLE}"

InterfaceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--interface",
        metavar="SPEC",
        help=(
            "One network interface (repeat for each, in the guest's order), as KEY=VALUE "
            f"pairs such as {SPEC_EXAMPLE}. Keys: {', '.join(SPEC_KEYS)} "
            "(ipv6=ADDRESS, default_route=true, policies=web-in;no-egress, "
            "policy_defaults=ingress:drop;egress:allow, cni=NETWORK with mode=cni: a CNI "
            "network or conflist name). The list replaces any other interfaces or network; "
            "not with the --network-* flags."
        ),
        show_default=False,
    ),
]


class SpecError(ValueError):
    """A SPEC that is not KEY=VALUE pairs of an interface's fields."""


def parse_interface_spec(spec: str) -> dict[str, Any]:
    """One `--interface` SPEC as an interface object (`ipv6=X` is `{"ip": X}`, booleans are
    booleans, `policies=a;b` a list (`policies=` an empty one), `policy_defaults=ingress:drop`
    an object, `cni=NAME` `{"network": NAME}`; every other value stays a string for
    validation to judge)."""
    if not spec.strip():
        raise SpecError(f"--interface {spec!r} is empty; {HOW_TO_WRITE}")
    interface: dict[str, Any] = {}
    for pair in spec.split(","):
        key, equals, value = (part.strip() for part in pair.partition("="))
        if not equals:
            if not pair.strip():
                raise SpecError(
                    f"--interface {spec!r}: an empty pair (a stray comma); {HOW_TO_WRITE}"
                )
            raise SpecError(f"--interface {spec!r}: {pair.strip()!r} has no '='; {HOW_TO_WRITE}")
        if not key:
            raise SpecError(f"--interface {spec!r}: {pair.strip()!r} has no key; {HOW_TO_WRITE}")
        if key not in SPEC_KEYS:
            raise SpecError(
                f"--interface {spec!r}: unknown key {key!r}; the keys are {', '.join(SPEC_KEYS)}"
            )
        if key in interface:
            raise SpecError(
                f"--interface {spec!r}: {key} is given twice; give each key once (repeat "
                "--interface for another interface)"
            )
        interface[key] = _value(spec, key, value)
    return interface


def _value(spec: str, key: str, value: str) -> Any:
    if key in BOOLEAN_KEYS:
        if value.lower() not in ("true", "false"):
            raise SpecError(
                f"--interface {spec!r}: {key}={value!r} is not a boolean; write {key}=true or "
                f"{key}=false"
            )
        return value.lower() == "true"
    if key == "ipv6":
        return {"ip": value}
    if key == "policies":  # ';' because ',' separates the pairs
        return [name.strip() for name in value.split(";")] if value else []
    if key == "policy_defaults":
        return _policy_defaults(spec, value)
    if key == "cni":  # args and capability_args only from a config file
        return {"network": value}
    return value


def _policy_defaults(spec: str, value: str) -> dict[str, str]:
    """`ingress:drop;egress:allow` (either may be left out) as `{"ingress": "drop", ...}`."""
    defaults: dict[str, str] = {}
    for item in value.split(";"):
        direction, colon, action = (part.strip() for part in item.partition(":"))
        if not colon or not direction or direction in defaults:
            raise SpecError(
                f"--interface {spec!r}: policy_defaults={value!r} is not DIRECTION:ACTION "
                "pairs; write e.g. policy_defaults=ingress:drop;egress:allow"
            )
        defaults[direction] = action
    return defaults


def interfaces_from(
    specs: Sequence[str] | None, flags: NetworkFlags
) -> list[dict[str, Any]] | None:
    """The interfaces the `--interface` options give (None: none given), or a usage error for
    a malformed SPEC or one mixed with the single-NIC `--network-*` flags."""
    if not specs:
        return None
    if flags.given:
        usage_error(
            f"--interface cannot be combined with {', '.join(flags.names)}: --interface lists "
            "every interface (several NICs), the --network-* flags change one network (one "
            "NIC); use one form"
        )
    try:
        return [parse_interface_spec(spec) for spec in specs]
    except SpecError as error:
        usage_error(str(error))
