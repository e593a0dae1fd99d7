"""Firecracker under its jailer, as pure functions: the jailer's command line, the paths the
jailed Firecracker sees, the run dir's files in the chroot, and how a jailed VMM is known; and
what root does with whatever the jailed uid leaves in its chroot."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from roost.engine.settings import Settings, jail_chroot
from roost.errors import VMMFailedError
from roost.vmm import firecracker, supervisor
from roost.vmm.base import NIC, LaunchSpec, RunDir, Vsock, VsockBackend
from roost.vmm.firecracker import (
    Jail,
    boot_requests,
    firecracker_argv,
    jailed_spec,
    jailer_argv,
)
from roost.vmm.process import is_vmm_of

JAIL = Jail(Path("/opt/jailer"), 65534, 65534, Path("/var/lib/roost/jail"))
CHROOT = Path("/var/lib/roost/jail/firecracker/web/root")
JAILED = RunDir(Path("/run/roost/vms/web"), CHROOT)


def spec(run_dir: RunDir) -> LaunchSpec:
    return LaunchSpec(
        name="web",
        run_dir=run_dir,
        kernel=Path("/var/lib/roost/artifacts/ab/vmlinux"),
        initrd=Path("/var/lib/roost/artifacts/cd/initrd"),
        rootfs=Path("/var/lib/roost/disks/web.img"),
        boot_args="console=ttyS0",
        vcpus=1,
        memory_mib=128,
        nics=(NIC("rtap1", "02:00:00:00:00:01"),),
        vsock=Vsock(3, run_dir.vsock_socket, VsockBackend.FIRECRACKER),
    )


def test_the_chroot_is_the_jailers_own_layout_under_the_state_dir() -> None:
    assert Settings(state_dir=Path("/s")).chroot("web") is None
    jailed = Settings(state_dir=Path("/s"), jailer=Path("/j"), jail_uid=1, jail_gid=2)
    assert jailed.chroot("web") == Path("/s/jail/firecracker/web/root")
    assert jail_chroot(Path("/s/jail"), "web") == jailed.chroot("web")


def test_a_jailed_run_dir_keeps_the_vmms_files_in_the_chroot() -> None:
    assert JAILED.api_socket == CHROOT / "api.sock"
    assert JAILED.vsock_socket == CHROOT / "vsock.sock"
    assert JAILED.console_log == CHROOT / "console.log"
    assert RunDir(Path("/run/roost/vms/web")).api_socket == Path("/run/roost/vms/web/api.sock")


def test_the_jailer_execs_firecracker_with_its_paths_inside_the_chroot() -> None:
    argv = jailer_argv(JAIL, Path("/opt/firecracker"), "web", JAILED)
    assert argv == [
        "/opt/jailer",
        "--id",
        "web",
        "--exec-file",
        "/opt/firecracker",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--chroot-base-dir",
        "/var/lib/roost/jail",
        "--",
        "--api-sock",
        "/api.sock",
        "--log-path",
        "/vmm.log",
        "--level",
        "Info",
        "--show-level",
        "--metrics-path",
        "/metrics.json",
    ]
    assert "--daemonize" not in argv and "--new-pid-ns" not in argv


def test_unjailed_firecracker_keeps_its_id_and_host_paths() -> None:
    argv = firecracker_argv("web", RunDir(Path("/run/roost/vms/web")))
    assert argv[:4] == ["--api-sock", "/run/roost/vms/web/api.sock", "--id", "web"]


def test_the_jailed_vmm_is_told_the_paths_it_sees() -> None:
    seen = jailed_spec(spec(JAILED))
    requests = {path: body for _, path, body in boot_requests(seen)}
    assert requests["/boot-source"]["kernel_image_path"] == "/kernel"
    assert requests["/boot-source"]["initrd_path"] == "/initrd"
    assert requests["/drives/rootfs"]["path_on_host"] == "/rootfs"
    assert requests["/vsock"]["uds_path"] == "/vsock.sock"
    assert requests["/network-interfaces/eth0"]["host_dev_name"] == "rtap1"
    bare = jailed_spec(replace(spec(JAILED), initrd=None, rootfs=None))
    assert (bare.initrd, bare.rootfs) == (None, None)


@pytest.mark.root
def test_a_jailed_vmm_is_known_by_its_id_and_its_root(tmp_path: Path) -> None:
    """A stand-in for the jailed Firecracker: chrooted, `--id web` on its command line (and
    not its run dir)."""
    chroot, other = jail_chroot(tmp_path, "web"), jail_chroot(tmp_path, "other")
    chroot.mkdir(parents=True)
    other.mkdir(parents=True)
    code = "import os, sys, time; os.chroot(sys.argv[1]); print(flush=True); time.sleep(60)"
    argv = [sys.executable, "-c", code, str(chroot), "--id", "web"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as jailed:
        try:
            assert jailed.stdout is not None and jailed.stdout.readline() == b"\n"
            assert is_vmm_of(jailed.pid, tmp_path / "run", chroot)
            assert not is_vmm_of(jailed.pid, tmp_path / "run")  # not jailed: by run dir only
            assert not is_vmm_of(jailed.pid, tmp_path / "run", other)  # another VM's chroot
            assert not is_vmm_of(os.getpid(), tmp_path / "run", chroot)  # not chrooted there
        finally:
            jailed.kill()


def test_preparing_a_jailed_run_dir_empties_the_chroot_but_for_the_console(
    tmp_short: Path,
) -> None:
    run_dir = RunDir(tmp_short / "run" / "web", jail_chroot(tmp_short / "jail", "web"))
    run_dir.prepare()
    assert run_dir.chroot is not None
    (run_dir.chroot / "dev" / "net").mkdir(parents=True)
    (run_dir.chroot / "dev" / "net" / "tun").touch()
    (run_dir.chroot / "api.sock").touch()
    run_dir.console_log.write_text("boot\n")
    run_dir.prepare()
    assert [p.name for p in run_dir.chroot.iterdir()] == ["console.log"]
    (run_dir.chroot / "firecracker").touch()
    run_dir.remove_sockets()
    assert [p.name for p in run_dir.chroot.iterdir()] == ["console.log"]
    run_dir.remove()
    assert not run_dir.path.exists() and not run_dir.chroot.parent.exists()
    assert (tmp_short / "jail" / "firecracker").is_dir()


def test_the_vms_own_disk_is_never_copied_into_the_chroot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that cannot be hard-linked in is an error: a copy would take the guest's writes
    and go with the chroot when the VM stops."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"the guest's data")
    (tmp_path / "root").mkdir()
    jail = Jail(Path("/opt/jailer"), os.getuid(), os.getgid(), tmp_path)

    def refuse(source: Path, target: Path) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(firecracker.os, "link", refuse)
    with pytest.raises(VMMFailedError, match="cannot hard-link the VM's disk"):
        firecracker._into_chroot(disk, tmp_path / "root" / "rootfs", jail, own=True)
    assert not (tmp_path / "root" / "rootfs").exists()


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_console_log_the_jailed_uid_replaced_by_a_link_is_not_kept(
    tmp_short: Path, link: str
) -> None:
    """The chroot is the jailed uid's: a console log it made a link to a host file (by a
    symlink) or to another file (by a hard link) must not be appended to by root next boot."""
    run_dir = RunDir(tmp_short / "run" / "web", jail_chroot(tmp_short / "jail", "web"))
    run_dir.prepare()
    assert run_dir.chroot is not None
    host_file = tmp_short / "host-file"
    host_file.write_text("the host's\n")
    if link == "symlink":
        run_dir.console_log.symlink_to(host_file)
    else:
        os.link(host_file, run_dir.console_log)
    run_dir.prepare()
    assert list(run_dir.chroot.iterdir()) == []
    assert host_file.read_text() == "the host's\n"


def test_a_disk_link_swapped_by_the_jailed_vmm_gives_it_no_shared_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jailed VMM runs (and owns its chroot) while its disk is linked in: should it swap
    the link for a hard link to a shared artifact (its kernel), the disk goes to its uid, the
    artifact stays root's."""
    disk, shared = tmp_path / "disk.img", tmp_path / "root" / "kernel"
    disk.write_bytes(b"the guest's data")
    shared.parent.mkdir()
    shared.write_bytes(b"a shared kernel")
    target = tmp_path / "root" / "rootfs"
    real_link = os.link

    def link_then_swap(source: Path, to: Path) -> None:
        real_link(source, to)
        to.unlink()
        real_link(shared, to)  # the jailed VMM's move

    monkeypatch.setattr(firecracker.os, "link", link_then_swap)
    firecracker._into_chroot(
        disk, target, Jail(Path("/opt/jailer"), 4321, 4321, tmp_path), own=True
    )
    assert (disk.stat().st_uid, disk.stat().st_gid) == (4321, 4321)
    assert shared.stat().st_uid == os.getuid()


def test_a_copy_into_the_chroot_is_never_written_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that cannot be linked in is copied into a file of its own: a symlink the jailed
    VMM put in its place makes the launch fail, the file it names untouched."""
    kernel, victim = tmp_path / "vmlinux", tmp_path / "victim"
    kernel.write_bytes(b"a kernel")
    victim.write_text("a host file\n")
    (tmp_path / "root").mkdir()
    target = tmp_path / "root" / "kernel"

    def symlinked(source: Path, to: Path) -> None:
        to.symlink_to(victim)  # the jailed VMM's move, just before the link
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))

    monkeypatch.setattr(firecracker.os, "link", symlinked)
    jail = Jail(Path("/opt/jailer"), 4321, 4321, tmp_path)
    with pytest.raises(VMMFailedError, match="cannot copy"):
        firecracker._into_chroot(kernel, target, jail, own=False)
    assert victim.read_text() == "a host file\n"
    assert victim.stat().st_uid == os.getuid()


def make_no_regular_file(path: Path, kind: str) -> None:
    """What a jailed VMM's uid could leave at `path` in its chroot instead of a file."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
            bound.bind(str(path))  # the socket file stays once the socket is closed
    elif kind == "directory":
        path.mkdir()
        (path / "inside").touch()
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # as /dev/null
    else:
        path.symlink_to(path.parent / "elsewhere")


NO_REGULAR_FILES = ["fifo", "socket", "directory", "device"]


@pytest.mark.parametrize("kind", NO_REGULAR_FILES)
def test_a_console_log_the_jailed_uid_made_no_regular_file_is_removed_before_the_next_boot(
    tmp_short: Path, kind: str
) -> None:
    """Or the supervisor (root) would open it to append the next boot's console: a FIFO
    nobody reads would hold that open for ever."""
    run_dir = RunDir(tmp_short / "run" / "web", jail_chroot(tmp_short / "jail", "web"))
    run_dir.prepare()
    assert run_dir.chroot is not None
    make_no_regular_file(run_dir.console_log, kind)
    run_dir.prepare()
    assert list(run_dir.chroot.iterdir()) == []


@pytest.mark.parametrize("kind", [*NO_REGULAR_FILES, "symlink"])
def test_the_supervisor_refuses_an_output_file_that_is_no_regular_file_at_once(
    tmp_short: Path, kind: str
) -> None:
    """A FIFO nobody reads is refused, not waited on: the open never blocks."""
    output = tmp_short / "console.log"
    make_no_regular_file(output, kind)
    with pytest.raises(OSError, match=f"^{output} is not a regular file"):
        supervisor.open_output(str(output))


def test_the_supervisor_starts_nothing_with_a_fifo_for_output_even_while_it_is_read(
    tmp_short: Path,
) -> None:
    output = tmp_short / "console.log"
    os.mkfifo(output)
    reader = os.open(output, os.O_RDONLY | os.O_NONBLOCK)  # a jailed VMM could hold this end
    children: dict[int, tuple[int, str]] = {}
    try:
        command = {
            "run_dir": str(tmp_short),
            "argv": ["/bin/true"],
            "output": str(output),
            "pid_file": "vmm.pid",
            "exit_file": "exit",
        }
        with pytest.raises(OSError, match="is not a regular file"):
            supervisor.launch(command, children)
    finally:
        os.close(reader)
    assert children == {}
    assert not (tmp_short / "vmm.pid").exists()


def test_the_supervisor_appends_both_outputs_to_a_regular_file_opened_blocking(
    tmp_short: Path,
) -> None:
    output = tmp_short / "console.log"
    output.write_text("earlier boot\n")
    children: dict[int, tuple[int, str]] = {}
    command = {
        "run_dir": str(tmp_short),
        "argv": ["/bin/sh", "-c", "echo out; grep ^flags: /proc/self/fdinfo/1 >&2"],
        "output": str(output),
        "pid_file": "vmm.pid",
        "exit_file": "exit",
    }
    pid = supervisor.launch(command, children)["pid"]
    try:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        os.close(children.pop(pid)[0])
    earlier, out, flags = output.read_text().splitlines()
    assert (earlier, out) == ("earlier boot", "out")
    mode = int(flags.split()[1], 8)
    assert mode & os.O_APPEND and not mode & os.O_NONBLOCK
    assert (tmp_short / "vmm.pid").read_text() == f"{pid}\n"


@pytest.mark.parametrize("kind", [*NO_REGULAR_FILES, "symlink"])
def test_firecrackers_log_is_never_made_through_what_the_jailed_uid_left(
    tmp_short: Path, kind: str
) -> None:
    """Root makes the log and metrics files and gives them to the uid: never through a
    symlink, never opening a FIFO blocking, never giving away anything but a regular file."""
    elsewhere = tmp_short / "elsewhere"
    elsewhere.write_text("the host's\n")
    log = tmp_short / "vmm.log"
    make_no_regular_file(log, kind)
    jail = Jail(Path("/opt/jailer"), 65534, 65534, tmp_short)
    with pytest.raises(VMMFailedError, match=str(log)):
        firecracker._make_file(log, jail)
    assert elsewhere.stat().st_uid == os.getuid()


def test_firecrackers_log_is_made_for_the_jailed_uid(tmp_short: Path) -> None:
    log = tmp_short / "vmm.log"
    firecracker._make_file(log, Jail(Path("/opt/jailer"), 65534, 65534, tmp_short))
    status = log.lstat()
    assert stat.S_ISREG(status.st_mode) and status.st_size == 0
    if os.geteuid() == 0:
        assert (status.st_uid, status.st_gid) == (65534, 65534)
