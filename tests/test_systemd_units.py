"""Tests for the files under systemd/: units checked by systemd-analyze,
sysusers and tmpfiles configs applied to a scratch root, and the example
config accepted by the daemon's config reader."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from netrpc.config import KNOWN_KEYS, Limits, merge_settings
from netrpc.identity import PeerIdentity
from netrpc.policy import access_for

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT_FILES = (
    "securerpc.service",
    "securerpc.socket",
    "securerpc-socket.service",
    "securerpc@.socket",
    "securerpc@.service",
)
# Template units are checked through one instance of each.
CHECKED_UNITS = (
    "securerpc.service",
    "securerpc.socket",
    "securerpc-socket.service",
    "securerpc@1.socket",
    "securerpc@1.service",
)
SERVICES = ("securerpc.service", "securerpc-socket.service", "securerpc@1.service")
MAX_EXPOSURE = 1.5
# Options that differ on purpose between the service that binds its own
# ports and the socket-activated ones.
NETWORK_OPTIONS = {"PrivateNetwork", "RestrictAddressFamilies"}
# Options that name the unit's own command line or instance.
PER_UNIT_OPTIONS = {"ExecStart", "SyslogIdentifier"}

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package: systemd)",
)


def _host_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    pytest.skip("no systemd unit folder with sysinit.target on this machine")


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A scratch root that contains what the units refer to: systemd's own units,
    /bin/kill, the twistd script of the venv and the project's unit files.
    """
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(_host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    shutil.copy(shutil.which("kill") or "/usr/bin/kill", root / "usr/bin/kill")

    venv_bin = root / "opt/netrpc/bin"
    venv_bin.mkdir(parents=True)
    shutil.copy(Path(sys.executable).parent / "twistd", venv_bin / "twistd")

    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copy(SYSTEMD_DIR / name, units / name)
    return root


def _analyze(root: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", f"--root={root}", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )


def _exposure(root: Path, unit: str) -> float:
    result = _analyze(root, "security", "--offline=true", unit)
    assert result.returncode == 0, result.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def _service_options(path: Path) -> list[tuple[str, str]]:
    """Return the (key, value) lines of a unit's [Service] section, in order."""
    options = []
    section = ""
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options.append((key, " ".join(value.split())))
    return options


class TestVerify:
    @pytest.mark.parametrize("unit", CHECKED_UNITS)
    def test_clean(self, unit_root: Path, unit: str) -> None:
        """systemd-analyze verify finds no error and no warning."""
        result = _analyze(unit_root, "verify", "--man=no", unit)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout == ""

    def test_catches_typo(self, unit_root: Path, tmp_path: Path) -> None:
        """A misspelt option is reported, so the clean result means something."""
        broken = tmp_path / "root"
        shutil.copytree(unit_root, broken, symlinks=True)
        unit = broken / "etc/systemd/system/securerpc.service"
        unit.write_text(unit.read_text().replace("ProtectClock=", "ProtectClok="))

        result = _analyze(broken, "verify", "--man=no", "securerpc.service")
        assert "Unknown key 'ProtectClok'" in result.stderr


class TestSecurity:
    def test_plain_service(self, unit_root: Path) -> None:
        assert _exposure(unit_root, "securerpc.service") <= MAX_EXPOSURE

    @pytest.mark.parametrize("unit", ["securerpc-socket.service", "securerpc@1.service"])
    def test_socket_activated(self, unit_root: Path, unit: str) -> None:
        """The socket-activated services rate strictly lower than the plain one."""
        assert _exposure(unit_root, unit) < _exposure(unit_root, "securerpc.service")

    def test_no_capabilities(self, unit_root: Path) -> None:
        for unit in SERVICES:
            result = _analyze(unit_root, "security", "--offline=true", unit)
            assert "✗ CapabilityBoundingSet" not in result.stdout, unit


class TestServiceFiles:
    def test_same_sandbox(self) -> None:
        """The socket-activated services drop nothing of the plain one's sandbox."""
        plain = _service_options(SYSTEMD_DIR / "securerpc.service")
        for name in ("securerpc-socket.service", "securerpc@.service"):
            other = _service_options(SYSTEMD_DIR / name)
            missing = [
                option
                for option in plain
                if option not in other and option[0] not in NETWORK_OPTIONS | PER_UNIT_OPTIONS
            ]
            assert missing == [], name

    def test_private_network(self) -> None:
        for name in ("securerpc-socket.service", "securerpc@.service"):
            options = dict(_service_options(SYSTEMD_DIR / name))
            assert options["PrivateNetwork"] == "yes", name
            assert options["RestrictAddressFamilies"] == "AF_UNIX", name

    @pytest.mark.parametrize("name", ["securerpc.service", "securerpc-socket.service", "securerpc@.service"])
    def test_logger_importable(self, name: str) -> None:
        """The --logger that twistd imports exists."""
        command = dict(_service_options(SYSTEMD_DIR / name))["ExecStart"]
        match = re.search(r"--logger=(\S+)", command)
        assert match, command
        module, _, attribute = match.group(1).rpartition(".")
        assert callable(getattr(importlib.import_module(module), attribute))

    def test_instance_name(self) -> None:
        command = dict(_service_options(SYSTEMD_DIR / "securerpc@.service"))["ExecStart"]
        assert "--instance=%i" in command

    def test_socket_port_privileged(self) -> None:
        """Both sockets listen below 1024, which the services could not bind."""
        for name in ("securerpc.socket", "securerpc@.socket"):
            text = (SYSTEMD_DIR / name).read_text()
            port = re.search(r"^ListenStream=\S*:(\d+)$", text, re.MULTILINE)
            assert port and int(port.group(1)) < 1024, name
        assert "ReusePort=yes" in (SYSTEMD_DIR / "securerpc@.socket").read_text()


class TestSysusersTmpfiles:
    def test_user_created(self, tmp_path: Path) -> None:
        (tmp_path / "etc").mkdir()
        _sysusers(tmp_path)

        passwd = (tmp_path / "etc/passwd").read_text()
        entry = next(line for line in passwd.splitlines() if line.startswith("securerpc:"))
        name, _, uid, gid, _, home, shell = entry.split(":")
        assert 0 < int(uid) < 1000
        assert home == "/var/lib/securerpc"
        assert shell == "/usr/sbin/nologin"
        assert f"securerpc:x:{gid}:" in (tmp_path / "etc/group").read_text()

    @pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles needs root to chown")
    def test_directories(self, tmp_path: Path) -> None:
        (tmp_path / "etc").mkdir()
        _sysusers(tmp_path)
        ids = _ids(tmp_path)

        subprocess.run(
            [
                "systemd-tmpfiles",
                f"--root={tmp_path}",
                "--create",
                str(SYSTEMD_DIR / "tmpfiles.d/securerpc.conf"),
            ],
            check=True,
            timeout=60,
        )

        config = (tmp_path / "etc/securerpc").stat()
        assert (config.st_mode & 0o7777, config.st_uid, config.st_gid) == (0o750, 0, ids[1])
        state = (tmp_path / "var/lib/securerpc").stat()
        assert (state.st_mode & 0o7777, state.st_uid, state.st_gid) == (0o700, *ids)


def _sysusers(root: Path) -> None:
    subprocess.run(
        [
            "systemd-sysusers",
            f"--root={root}",
            str(SYSTEMD_DIR / "sysusers.d/securerpc.conf"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _ids(root: Path) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "securerpc":
            return int(fields[2]), int(fields[3])
    raise AssertionError("no securerpc user in the scratch root")


class TestExampleConfig:
    def read(self, uncomment: bool = False) -> dict[str, object]:
        text = (SYSTEMD_DIR / "securerpc.toml.example").read_text()
        if uncomment:
            text = re.sub(r"^# ([a-z_]+ = |\[)", r"\1", text, flags=re.MULTILINE)
        return tomllib.loads(text)

    def test_accepted(self) -> None:
        """The daemon's config reader accepts the example as it stands."""
        settings = merge_settings(self.read(), {}, "securerpc.toml.example")
        assert settings.listen == ("mtls:port=8700:interface=127.0.0.1",)
        assert settings.methods == ("netrpc.demo",)
        assert settings.pki == Path("/etc/securerpc")
        assert settings.user is None
        assert settings.policy is None
        assert settings.audit is not None
        assert settings.audit.destination == "log"

    def test_defaults_true(self) -> None:
        """The commented-out values are the daemon's real defaults."""
        values = self.read(uncomment=True)
        settings = merge_settings(values, {}, "securerpc.toml.example")
        assert settings.limits == Limits()

    def test_every_key(self) -> None:
        """Every setting of the daemon is in the example."""
        keys = set(self.read(uncomment=True))
        assert keys == KNOWN_KEYS

    def test_example_policy(self) -> None:
        """The commented-out policy is valid and lets alice call the demo."""
        settings = merge_settings(self.read(uncomment=True), {}, "securerpc.toml.example")
        alice = access_for(settings.policy, PeerIdentity(common_name="alice"))
        mallory = access_for(settings.policy, PeerIdentity(common_name="mallory"))

        assert alice.allows("multiply")
        assert alice.max_connections == 4
        assert not mallory.allows("multiply")
        assert mallory.allows("system.health")
