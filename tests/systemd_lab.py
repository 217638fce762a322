"""
Boot a real systemd in a container so tests can drive the shipped units.

The container is a Debian bookworm root made with debootstrap once per machine
and cached under ``LAB_DIR``. Each boot runs ``systemd-nspawn --boot`` with a
volatile overlay, so every boot starts from the pristine root and nothing
written inside survives shutdown. The container has only a loopback
interface (``--private-network``). Commands run inside through ``nsenter``,
because ``--register=no`` leaves no machined to talk to.

Everything here needs root on the host. ``unavailable_reason()`` returns why a
machine cannot run the lab, so tests can skip with that reason.

Run ``python tests/systemd_lab.py build`` to build the root ahead of a test
run, and ``python tests/systemd_lab.py shell`` to look around in a booted
container.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LAB_DIR = Path(os.environ.get("NETRPC_SYSTEMD_LAB", "/var/cache/netrpc-systemd-lab"))
ROOT = LAB_DIR / "root"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# bookworm's python3 is 3.11, the same minor version as the host venv, so the
# wheels pip builds or downloads on the host install inside unchanged.
ROOT_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "procps",
    "iproute2",
)
HOST_PACKAGES = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"}

# The stamp records what the root was built with, so a change to
# ROOT_PACKAGES, SUITE or the files _build_root() writes (count it in
# ROOT_REVISION) rebuilds it instead of reusing a stale one.
STAMP_NAME = ".netrpc-lab-stamp"
ROOT_REVISION = 2

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STAGE_MOUNT = "/mnt/stage"

# Bounds for every wait. Measured boots take about one second and a build
# about one or two minutes on a two-core VM; these leave a wide margin.
APT_TIMEOUT = 600.0
BUILD_TIMEOUT = 1200.0
BOOT_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0
POLL_INTERVAL = 0.1


class LabError(Exception):
    """The lab could not be built, booted or driven."""


def unavailable_reason() -> str | None:
    """
    Return why this machine cannot run the lab, or None when it can.

    Missing host packages are not a reason: ``ensure_host_tools()`` installs
    them with apt when apt is there.
    """
    if sys.platform != "linux":
        return f"systemd-nspawn needs Linux, this is {sys.platform!r}"
    if os.geteuid() != 0:
        return "booting systemd-nspawn needs root (run the tests as root)"
    missing = [tool for tool in HOST_PACKAGES if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install them"
    return None


def ensure_host_tools() -> None:
    """Install systemd-nspawn and debootstrap with apt when they are missing."""
    missing = [pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], timeout=APT_TIMEOUT, env=env)
    _run(["apt-get", "install", "-y", "-qq", *missing], timeout=APT_TIMEOUT, env=env)


def ensure_root() -> Path:
    """
    Return the cached container root, building it first when it is missing.

    A lock file serialises concurrent test runs, so only one of them builds
    and the others wait for it and reuse the result.
    """
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(LAB_DIR / "build.lock"):
        if _read_stamp(ROOT) == _root_stamp():
            return ROOT
        ensure_host_tools()
        _build_root()
    return ROOT


def _root_stamp() -> str:
    return f"{SUITE} {','.join(ROOT_PACKAGES)} revision {ROOT_REVISION}\n"


def _read_stamp(root: Path) -> str | None:
    try:
        return (root / STAMP_NAME).read_text()
    except OSError:
        return None


def _build_root() -> None:
    partial = LAB_DIR / "root.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(ROOT_PACKAGES)}",
            SUITE,
            str(partial),
            _mirror(),
        ],
        timeout=BUILD_TIMEOUT,
    )

    # An empty machine-id makes systemd generate a fresh one on every boot.
    (partial / "etc/machine-id").write_text("")
    (partial / "etc/hostname").write_text("netrpc-lab\n")
    # debootstrap writes no /etc/hosts, which an installed Debian has; without
    # it "localhost" does not resolve.
    (partial / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (partial / STAMP_NAME).write_text(_root_stamp())

    shutil.rmtree(ROOT, ignore_errors=True)
    partial.rename(ROOT)


def _mirror() -> str:
    """Return the host's Debian mirror, so the build uses the same one as apt."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return DEFAULT_MIRROR


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command and raise LabError with its output when it fails."""
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as error:
        raise LabError(f"{argv[0]} did not finish within {timeout:.0f} s") from error
    if result.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} failed with exit status {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


class Container:
    """
    One booted container on the cached root.

    Use it as a context manager: entering boots and waits until systemd
    runs, leaving powers it off and cleans up what nspawn leaves behind.
    ``stage`` is a host folder visible read-only at ``/mnt/stage`` inside.
    """

    def __init__(self, root: Path, stage: Path, log_path: Path) -> None:
        self.root = root
        self.stage = stage
        self.log_path = log_path
        self.machine = f"netrpc-lab-{uuid.uuid4().hex[:8]}"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._cgroups: list[Path] = []

    def __enter__(self) -> Container:
        self.boot()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def boot(self) -> None:
        """Start nspawn and wait until systemd inside reaches running."""
        self._cgroups = _own_cgroups(self.machine)
        for cgroup in self._cgroups:
            cgroup.mkdir()
        nspawn = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.root}",
            "--boot",
            f"--machine={self.machine}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--volatile=overlay",
            "--console=pipe",
            f"--bind-ro={self.stage}:{STAGE_MOUNT}",
        ]
        # The shell moves itself into the container's own cgroups, then
        # becomes nspawn, so nspawn's PID is the one Popen returns.
        enter_cgroups = 'for dir in $LAB_CGROUPS; do echo $$ > "$dir/cgroup.procs"; done; exec "$@"'
        environ = dict(os.environ, LAB_CGROUPS=" ".join(map(str, self._cgroups)))
        with open(self.log_path, "wb") as log:
            # A session of its own keeps a Ctrl-C in the test run from
            # reaching nspawn directly; shutdown() stops it in order.
            self._nspawn = subprocess.Popen(
                ["sh", "-c", enter_cgroups, "sh", *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=environ,
            )
        try:
            self._wait_until_running()
        except BaseException:
            self.shutdown()
            raise

    def _wait_until_running(self) -> None:
        # The console prints nothing useful with --console=pipe, so ask
        # systemd itself. "degraded" also means the boot has finished.
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = "not started"
        while time.monotonic() < deadline:
            if self._nspawn is None or self._nspawn.poll() is not None:
                raise LabError(f"systemd-nspawn exited during boot:\n{self.console_log()}")
            if self.leader_pid() is not None:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(POLL_INTERVAL)
        raise LabError(
            f"systemd in the container did not finish booting within "
            f"{BOOT_TIMEOUT:.0f} s (last state {state!r}):\n{self.console_log()}"
        )

    def leader_pid(self) -> int | None:
        """Return the host PID of the container's PID 1, nspawn's only child."""
        if self._nspawn is None:
            return None
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
        cwd: str = "/",
    ) -> subprocess.CompletedProcess[str]:
        """
        Run a command inside the container, in all its namespaces.

        The environment is reset so nothing from the test run leaks in.
        Raises LabError when ``check`` is set and the command fails.
        """
        leader = self.leader_pid()
        if leader is None:
            raise LabError(f"container {self.machine} is not running")
        wrapped = [
            "nsenter",
            f"--target={leader}",
            "--all",
            "--",
            "env",
            "-i",
            f"PATH={CONTAINER_PATH}",
            "HOME=/root",
            "LANG=C.UTF-8",
            "TERM=dumb",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
            # nsenter --wd would resolve the folder on the host, so change
            # to it once inside.
            "sh",
            "-c",
            'cd "$1" && shift && exec "$@"',
            "sh",
            cwd,
            *argv,
        ]
        try:
            result = subprocess.run(
                wrapped, capture_output=True, text=True, timeout=timeout, input=input
            )
        except subprocess.TimeoutExpired as error:
            raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from error
        if check and result.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} failed in the container with exit status "
                f"{result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def shutdown(self) -> None:
        """Power the container off, waiting a bounded time, then clean up."""
        nspawn = self._nspawn
        if nspawn is not None and nspawn.poll() is None:
            try:
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            except LabError:
                nspawn.send_signal(signal.SIGTERM)
            try:
                nspawn.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                # SIGTERM asks nspawn for an orderly halt; SIGKILL is the
                # last resort, aimed only at the nspawn this object started.
                nspawn.send_signal(signal.SIGTERM)
                try:
                    nspawn.wait(SHUTDOWN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    nspawn.kill()
                    nspawn.wait(SHUTDOWN_TIMEOUT)
        self._nspawn = None
        _remove_nspawn_leftovers(self.machine, self._cgroups)

    def console_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no console log)"


def _own_cgroups(machine: str) -> list[Path]:
    """
    Return a cgroup for the container in each hierarchy systemd uses, or
    none on a host whose own systemd manages the cgroups.

    Without systemd as PID 1 on the host, nspawn with ``--keep-unit`` puts
    the container in ``payload`` under the caller's cgroup. Two containers
    started from the same cgroup would share it, and the systemd of one
    would see, and at shutdown kill, the processes of the other. A cgroup
    of its own under each hierarchy's root keeps them apart.
    """
    if Path("/run/systemd/system").exists():
        return []
    hierarchies = [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")]
    if not hierarchies[0].is_dir():
        hierarchies = [Path("/sys/fs/cgroup")]
    return [
        hierarchy / machine
        for hierarchy in hierarchies
        if (hierarchy / "cgroup.procs").exists()
    ]


def _remove_nspawn_leftovers(machine: str, cgroups: Sequence[Path]) -> None:
    """
    Remove the container's cgroups and the empty folder nspawn leaves in /run.

    nspawn does not remove the cgroups it made under ours. rmdir removes only
    empty cgroups, which the kernel allows once no process is left in them.
    """
    for cgroup in cgroups:
        if not cgroup.is_dir():
            continue
        for directory in sorted(cgroup.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            try:
                directory.rmdir()
            except OSError:
                pass
    try:
        Path("/run/systemd/nspawn/propagate", machine).rmdir()
    except OSError:
        pass


class GuideBlock:
    """One shell code block of a Markdown guide, with where it should run."""

    def __init__(self, section: str, where: str, script: str) -> None:
        self.section = section
        self.where = where
        self.script = script

    def __repr__(self) -> str:
        return f"GuideBlock({self.section!r}, {self.where!r})"


def read_guide(path: Path) -> list[GuideBlock]:
    """
    Return the ``sh`` code blocks of a Markdown guide, in order.

    Each block belongs to the latest ``##`` heading above it. A block runs
    on the server unless the HTML comment ``<!-- run: host -->`` sits on
    the line before its opening fence. Blocks in other languages (``text``,
    ``toml``, ``ini``) are examples and are not run.
    """
    blocks: list[GuideBlock] = []
    section = ""
    where = "server"
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.strip() == "<!-- run: host -->":
            where = "host"
            continue
        elif line.strip() == "```sh":
            script = []
            for body in lines:
                if body.strip() == "```":
                    break
                script.append(body)
            blocks.append(GuideBlock(section, where, "\n".join(script) + "\n"))
        where = "server"
    return blocks


def guide_section(blocks: Sequence[GuideBlock], section: str) -> list[GuideBlock]:
    """Return the blocks under one heading; raise LabError if there are none."""
    found = [block for block in blocks if block.section == section]
    if not found:
        headings = sorted({block.section for block in blocks})
        raise LabError(f"no sh blocks under '## {section}' in the guide; found {headings}")
    return found


def main(argv: Sequence[str]) -> int:
    """Build the root, or boot a container and open a shell in it."""
    command = argv[1] if len(argv) > 1 else ""
    if command not in ("build", "shell"):
        print(f"usage: {argv[0]} build|shell", file=sys.stderr)
        return 2

    reason = unavailable_reason()
    if reason is not None:
        print(f"systemd lab unavailable: {reason}", file=sys.stderr)
        return 1
    root = ensure_root()
    print(f"container root: {root}")
    if command == "shell":
        stage = LAB_DIR / "stage"
        stage.mkdir(exist_ok=True)
        with Container(root, stage, LAB_DIR / "console.log") as container:
            leader = container.leader_pid()
            subprocess.run(["nsenter", f"--target={leader}", "--all", "--", "bash", "-l"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
