"""The CNI runtime's side of the protocol, seen by a recording plugin: what each call gets in
its environment and on stdin, in which order plugins run, and how their failures read.

The plugin (written into a bin dir here) logs every call to the file its config names and
answers ADD with its prevResult plus one address of its own, or fails as its config says.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roost.errors import HostError, InvalidError
from roost.host.cni import AddUndoneError, Attachment, CniRuntime
from roost.host.netns import NetnsWorker
from roost.spec.cni import parse_conflist

RECORDER = f"""#!{sys.executable}
import json, os, sys, time
config = json.load(sys.stdin)
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
with open(config["log"], "a") as log:
    log.write(json.dumps({{"type": config["type"], "env": env, "config": config}}) + "\\n")
if config.get("sleep"):
    time.sleep(config["sleep"])
if env["CNI_COMMAND"] in config.get("fail", []):
    if config.get("quiet"):
        sys.stderr.write("something broke\\n")
    else:
        error = {{"code": 11, "msg": "it broke", "details": "on purpose"}}
        print(json.dumps({{"cniVersion": "1.0.0", **error}}))
    sys.exit(1)
if env["CNI_COMMAND"] == "ADD":
    result = config.get("prevResult") or {{"cniVersion": config["cniVersion"], "interfaces": [
        {{"name": env["CNI_IFNAME"], "mac": "02:00:00:00:00:01", "sandbox": env["CNI_NETNS"]}}]}}
    result.setdefault("ips", []).append({{"address": config["address"], "interface": 0}})
    print(json.dumps(result) if not config.get("garbage") else "not json")
"""


@pytest.fixture
def bin_dirs(tmp_path: Path) -> list[Path]:
    first, second = tmp_path / "bin1", tmp_path / "bin2"
    first.mkdir()
    second.mkdir()
    for directory, name in ((first, "rec"), (second, "rec2")):
        plugin = directory / name
        plugin.write_text(RECORDER)
        plugin.chmod(0o755)
    return [first, second]


@pytest.fixture
def runtime(tmp_path: Path, bin_dirs: list[Path]) -> Iterator[CniRuntime]:
    worker = NetnsWorker(None)
    (tmp_path / "net.d").mkdir()
    yield CniRuntime(tmp_path / "net.d", bin_dirs, worker, timeout=5)
    worker.close()


def plugin(tmp_path: Path, address: str, kind: str = "rec", **more: Any) -> dict[str, Any]:
    return {"type": kind, "log": str(tmp_path / "calls.log"), "address": address, **more}


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "calls.log"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def attachment(runtime: CniRuntime, *plugins: dict[str, Any], **more: Any) -> Attachment:
    conflist = parse_conflist({"cniVersion": "1.0.0", "name": "net", "plugins": list(plugins)})
    return runtime.attachment(
        container_id="roost-7",
        netns="/run/netns/roost-vm-a",
        ifname="eth0",
        conflist=conflist,
        **more,
    )


def test_add_chains_results_through_the_list_with_the_runtimes_environment(
    tmp_path: Path, runtime: CniRuntime, bin_dirs: list[Path]
) -> None:
    wanted = attachment(
        runtime,
        plugin(tmp_path, "10.0.0.2/24"),
        plugin(
            tmp_path, "fd00::2/64", "rec2", capabilities={"portMappings": True, "bandwidth": False}
        ),
        args={"IgnoreUnknown": "1"},
        capability_args={"portMappings": [{"hostPort": 80}], "bandwidth": {"rate": 1}, "other": 1},
    )
    result = runtime.add(wanted)
    assert [str(ip.address) for ip in result.ips] == ["10.0.0.2/24", "fd00::2/64"]

    first, second = calls(tmp_path)
    assert first["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "roost-7",
        "CNI_NETNS": "/run/netns/roost-vm-a",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": f"{bin_dirs[0]}:{bin_dirs[1]}",
        "CNI_ARGS": "IgnoreUnknown=1",
    }
    assert first["config"]["name"] == "net" and first["config"]["cniVersion"] == "1.0.0"
    assert "prevResult" not in first["config"] and "runtimeConfig" not in first["config"]
    assert second["config"]["prevResult"]["ips"] == [{"address": "10.0.0.2/24", "interface": 0}]
    # only the capabilities the plugin asks for, and holds true
    assert second["config"]["runtimeConfig"] == {"portMappings": [{"hostPort": 80}]}


def test_del_runs_in_reverse_with_the_cached_result_and_check_in_order(
    tmp_path: Path, runtime: CniRuntime
) -> None:
    wanted = attachment(
        runtime, plugin(tmp_path, "10.0.0.2/24"), plugin(tmp_path, "10.0.0.3/24", "rec2")
    )
    result = runtime.add(wanted)
    runtime.check(wanted, result)
    runtime.delete(wanted, result)
    runtime.delete(wanted, None)
    made = [
        (c["env"]["CNI_COMMAND"], c["type"], "prevResult" in c["config"]) for c in calls(tmp_path)
    ]
    assert made == [
        ("ADD", "rec", False),
        ("ADD", "rec2", True),
        ("CHECK", "rec", True),
        ("CHECK", "rec2", True),
        ("DEL", "rec2", True),
        ("DEL", "rec", True),
        ("DEL", "rec2", False),
        ("DEL", "rec", False),
    ]
    cached = calls(tmp_path)[4]["config"]["prevResult"]
    assert cached == result.to_json()


def test_a_failed_add_undoes_the_plugins_run_and_raises_the_plugins_message(
    tmp_path: Path, runtime: CniRuntime
) -> None:
    wanted = attachment(
        runtime,
        plugin(tmp_path, "10.0.0.2/24"),
        plugin(tmp_path, "10.0.0.3/24", "rec2", fail=["ADD"]),
        plugin(tmp_path, "10.0.0.4/24"),
    )
    with pytest.raises(AddUndoneError) as failed:  # nothing held: its record may go
        runtime.add(wanted)
    assert failed.value.message == (
        "CNI plugin 'rec2' (ADD on network 'net') failed: it broke (on purpose) [CNI error code 11]"
    )
    made = [(c["env"]["CNI_COMMAND"], c["type"]) for c in calls(tmp_path)]
    assert made == [("ADD", "rec"), ("ADD", "rec2"), ("DEL", "rec2"), ("DEL", "rec")]


def test_a_failed_undo_is_told_with_the_failure(tmp_path: Path, runtime: CniRuntime) -> None:
    wanted = attachment(
        runtime,
        plugin(tmp_path, "10.0.0.2/24", fail=["DEL"], quiet=True),
        plugin(tmp_path, "10.0.0.3/24", "missing"),
    )
    with pytest.raises(HostError) as failed:
        runtime.add(wanted)
    assert not isinstance(failed.value, AddUndoneError)  # the rec plugin may still hold some
    assert failed.value.message.startswith("CNI plugin 'missing' of network 'net' is not in ")
    assert failed.value.message.endswith(
        "; undoing it failed too: CNI plugin 'rec' (DEL on network 'net') failed: something "
        "broke (exit status 1)"
    )


def test_check_is_skipped_where_the_list_disables_it_or_predates_it(
    tmp_path: Path, runtime: CniRuntime
) -> None:
    for changes in ({"disableCheck": True}, {"cniVersion": "0.3.1"}):
        data = {
            "cniVersion": "1.0.0",
            "name": "net",
            "plugins": [plugin(tmp_path, "10.0.0.2/24")],
            **changes,
        }
        wanted = runtime.attachment(
            container_id="c", netns="/run/netns/x", ifname="eth0", conflist=parse_conflist(data)
        )
        result = runtime.add(wanted)
        runtime.check(wanted, result)
    assert [c["env"]["CNI_COMMAND"] for c in calls(tmp_path)] == ["ADD", "ADD"]


def test_a_plugin_that_hangs_is_killed_at_the_timeout(tmp_path: Path, bin_dirs: list[Path]) -> None:
    worker = NetnsWorker(None)
    try:
        runtime = CniRuntime(tmp_path, bin_dirs, worker, timeout=0.3)
        wanted = attachment(runtime, plugin(tmp_path, "10.0.0.2/24", sleep=30))
        with pytest.raises(HostError) as failed:
            runtime.delete(wanted, None)
    finally:
        worker.close()
    assert failed.value.message == (
        "CNI plugin 'rec' (DEL on network 'net') did not finish within 0.3 s and was killed"
    )


def test_an_add_answered_with_no_json_is_a_host_error_and_undone(
    tmp_path: Path, runtime: CniRuntime
) -> None:
    wanted = attachment(runtime, plugin(tmp_path, "10.0.0.2/24", garbage=True))
    with pytest.raises(HostError, match="printed no JSON result: 'not json'"):
        runtime.add(wanted)
    assert [c["env"]["CNI_COMMAND"] for c in calls(tmp_path)] == ["ADD", "DEL"]


def test_the_conf_dir_is_read_afresh_at_each_lookup_and_takes_single_plugin_confs(
    tmp_path: Path, runtime: CniRuntime
) -> None:
    with pytest.raises(InvalidError) as failed:
        runtime.find("net")
    assert failed.value.details[0].loc == "cni.network"
    assert failed.value.message.startswith(
        f"cni.network: no CNI conflist named 'net' in {runtime.conf_dir}"
    )

    (runtime.conf_dir / "00-other.conflist").write_text("{not json")
    (runtime.conf_dir / "10-net.conf").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "net", **plugin(tmp_path, "10.0.0.2/24")})
    )
    assert [p.type for p in runtime.find("net").plugins] == ["rec"]

    (runtime.conf_dir / "05-net.conflist").write_text(
        json.dumps({"cniVersion": "9", "name": "net", "plugins": []})
    )
    with pytest.raises(InvalidError) as failed:
        runtime.find("net")
    assert failed.value.message.startswith(
        f"cni.network: conflist {runtime.conf_dir / '05-net.conflist'}: "
    )
    assert "cniVersion" in failed.value.message


def test_an_attachment_needs_a_network_or_a_conflist_and_valid_args(runtime: CniRuntime) -> None:
    with pytest.raises(InvalidError, match=r"cni\.network: is required"):
        runtime.attachment(container_id="c", netns="/run/netns/x", ifname="eth0")
    with pytest.raises(InvalidError, match=r"cni\.args\.K"):
        runtime.attachment(
            container_id="c",
            netns="/run/netns/x",
            ifname="eth0",
            conflist=parse_conflist({"cniVersion": "1.0.0", "name": "n", "type": "rec"}),
            args={"K": "a;b"},
        )
