"""`roost policy create|apply|show|list|rm`: network policies, stored by the daemon and
attached by name to VMs' interfaces (`--network-policy`, `--interface ...,policies=a;b`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from roost.cli.apps import PLAIN_HELP, app
from roost.cli.files import read_json
from roost.cli.options import JSONOpt
from roost.cli.output import err, fields, out, print_json, table
from roost.cli.reach import daemon
from roost.cli.views import show
from roost.errors import InvalidError, RoostError
from roost.names import check_name

STDIN = "-"

policy_app = typer.Typer(
    help="Network policies: create, apply, show, list, rm.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
app.add_typer(policy_app, name="policy")

PolicyNameArg = Annotated[str, typer.Argument(help="The policy's name.")]
PolicyFileOpt = Annotated[
    str,
    typer.Option(
        "--file",
        "-f",
        metavar="POLICY.json",
        help='The policy as JSON ({"description", "ingress": [...], "egress": [...]}; its '
        '"name" is optional and must equal NAME); - reads it from stdin.',
    ),
]


def policy_path(name: str) -> str:
    return f"/v1/policies/{check_name(name)}"


def policy_body(name: str, file: str) -> dict[str, Any]:
    """The policy in `file` (stdin for `-`), judged here as the daemon will judge it (but for
    its `@network`s, which only the daemon knows), named NAME."""
    from roost.spec import load_json
    from roost.spec.policy import parse_policy

    if file == STDIN:
        try:
            data = load_json(sys.stdin.buffer.read())
        except RoostError as error:
            raise InvalidError.at("-", f"stdin: {error.message}") from None
    else:
        data = read_json(Path(file))
    parse_policy(data, check_name(name))
    return {**data, "name": name}


def _peers(rule: dict[str, Any]) -> str:
    peers = rule.get("source") or rule.get("destination")
    return ", ".join(peers) if peers else "any"


def _ports(rule: dict[str, Any]) -> str | None:
    ports = [
        f"{word} {rule[key]}"
        for word, key in (("sport", "source_port"), ("dport", "destination_port"))
        if rule.get(key) is not None
    ]
    if rule.get("icmp_type") is not None:
        ports.append(f"type {rule['icmp_type']}")
    return " ".join(ports) or None


def _counted(rule: dict[str, Any], key: str) -> Any:
    counters = rule.get("counters")
    return None if counters is None else counters[key]


def show_policy(policy: dict[str, Any]) -> None:
    """A policy as a human reads it: what it is, who names it, then its rules in order with
    what each matched (`-` where this daemon does not enforce policies)."""
    fields(
        [
            ("policy", policy["name"]),
            ("description", policy["description"] or None),
            ("used by", ", ".join(policy["used_by"]) or "no VM"),
            ("created", policy["created_at"]),
            ("updated", policy["updated_at"]),
        ]
    )
    rows = [
        (
            direction,
            index,
            rule["action"],
            rule.get("protocol") or "any",
            _peers(rule),
            _ports(rule),
            "yes" if rule.get("log") else "no",
            _counted(rule, "packets"),
            _counted(rule, "bytes"),
            rule.get("description") or None,
        )
        for direction in ("ingress", "egress")
        for index, rule in enumerate(policy[direction])
    ]
    out.print()
    if not rows:
        out.print("no rules: only the interfaces' defaults decide", markup=False)
        return
    columns = ["DIRECTION", "#", "ACTION", "PROTOCOL", "PEERS", "PORTS", "LOG"]
    table([*columns, "PACKETS", "BYTES", "DESCRIPTION"], rows)


@policy_app.command("create")
def policy_create(name: PolicyNameArg, file: PolicyFileOpt, as_json: JSONOpt = False) -> None:
    """Create a policy (an error if one of that name exists; policy apply replaces)."""
    with daemon(as_json) as client:
        policy = client.call("POST", "/v1/policies", body=policy_body(name, file))
    show(policy, as_json, show_policy)


@policy_app.command("apply")
def policy_apply(name: PolicyNameArg, file: PolicyFileOpt, as_json: JSONOpt = False) -> None:
    """Create a policy, or replace it: every VM interface attaching it gets the new rules at
    once, in one firewall transaction, without a restart."""
    with daemon(as_json) as client:
        policy = client.call("PUT", policy_path(name), body=policy_body(name, file))
    show(policy, as_json, show_policy)


@policy_app.command("show")
def policy_show(name: PolicyNameArg, as_json: JSONOpt = False) -> None:
    """Show a policy: its rules with the packets and bytes each matched, and the VMs naming
    it."""
    with daemon(as_json) as client:
        policy = client.call("GET", policy_path(name))
    show(policy, as_json, show_policy)


@policy_app.command("list")
def policy_list(as_json: JSONOpt = False) -> None:
    """List policies, their rule counts and the VMs naming them."""
    with daemon(as_json) as client:
        policies = client.call("GET", "/v1/policies")

    def human(items: list[dict[str, Any]]) -> None:
        rows = [
            (
                p["name"],
                len(p["ingress"]),
                len(p["egress"]),
                ", ".join(p["used_by"]) or None,
                p["description"] or None,
            )
            for p in items
        ]
        table(["NAME", "INGRESS", "EGRESS", "USED BY", "DESCRIPTION"], rows)

    show(policies, as_json, human)


@policy_app.command("rm")
def policy_rm(name: PolicyNameArg, as_json: JSONOpt = False) -> None:
    """Remove a policy no VM names (patch their policies first)."""
    with daemon(as_json) as client:
        client.call("DELETE", policy_path(name))
    if as_json:
        print_json({"removed": name})
    else:
        err.print(f"removed policy {name}", markup=False)
