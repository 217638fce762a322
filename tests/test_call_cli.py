"""
Tests of ``netrpc call``: each option and each exit status, in-process
through ``netrpc.cli.main`` against the real daemon, plus runs of the
installed console script.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netrpc import call_cli
from netrpc.certs import PKI, Usage
from netrpc.cli import main
from netrpc.passphrase import PASSPHRASE_VARIABLE, forget_passphrases
from tests.daemon_process import DaemonProcess
from tests.scripted_server import ScriptedServer, ServerConnection

NETRPC = str(Path(sys.executable).with_name("netrpc"))
UNPRIVILEGED_USER = "nobody"
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def daemon_port(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Run ``twistd -n securerpc`` on the demo service and return its port."""
    privileges = ["--user", UNPRIVILEGED_USER] if os.geteuid() == 0 else []
    daemon = DaemonProcess(
        ["--pki", str(pki.directory), "--listen", "mtls:port=0:interface=127.0.0.1", *privileges],
        cwd=tmp_path_factory.mktemp("daemon"),
    )
    try:
        yield daemon.wait_for_port()
    finally:
        daemon.stop()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """
    Run each test without the NETRPC_ variables of the shell that started
    pytest, and without the passphrases an earlier test unlocked.
    """
    for variable in [*call_cli.ENVIRONMENT_DEFAULTS.values(), PASSPHRASE_VARIABLE]:
        monkeypatch.delenv(variable, raising=False)
    forget_passphrases()
    yield
    forget_passphrases()


def files_of(pki: PKI, name: str = "alice") -> list[str]:
    return [
        "--cert", str(pki.client_cert(name)),
        "--key", str(pki.client_key(name)),
        "--ca", str(pki.server_ca_cert),
    ]


def call(port: int, pki: PKI, *arguments: str) -> int:
    """Run ``netrpc call`` in-process with alice's files and return its exit status."""
    return main(["call", "--server", f"127.0.0.1:{port}", *files_of(pki), *arguments])


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def test_call_prints_result(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(daemon_port, pki, "multiply", "6", "7") == call_cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == "42\n"
    assert captured.err == ""


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ('{"a": [1, 2]}', {"a": [1, 2]}),
        ("six", "six"),
        ('"6"', "6"),
        ("6.5", 6.5),
        ("null", None),
        ("true", True),
        ("NaN", "NaN"),
        ("1e999", "1e999"),
        ("{not json", "{not json"),
    ],
)
def test_call_param_parsing(
    param: str, expected: object, daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert call(daemon_port, pki, "echo", "--", param) == call_cli.EXIT_OK
    assert json.loads(capsys.readouterr().out) == expected


def test_call_named_params(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(daemon_port, pki, "--params", '{"a": 3, "b": 4}', "multiply") == call_cli.EXIT_OK
    assert capsys.readouterr().out == "12\n"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--params", '{"a": 1}', "multiply", "2"], "not both"),
        (["--params", "{oops", "multiply"], "is not valid JSON"),
        (["--params", "42", "multiply"], "give a JSON object"),
        ([], "no METHOD given"),
    ],
)
def test_call_params_usage_error(
    arguments: list[str], message: str, daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    assert call(daemon_port, pki, *arguments) == call_cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_call_list_methods(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(daemon_port, pki, "system.listMethods") == call_cli.EXIT_OK
    assert {"echo", "multiply", "sleep", "whoami"} <= set(json.loads(capsys.readouterr().out))


def test_call_rpc_error(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(daemon_port, pki, "no.such.method") == call_cli.EXIT_RPC_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "'no.such.method' failed: Method not found (code -32601)" in captured.err
    assert len(captured.err.splitlines()) == 1


def test_call_timeout(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(daemon_port, pki, "--timeout", "0.2", "sleep", "1") == call_cli.EXIT_TIMEOUT
    assert "got no reply within its deadline" in capsys.readouterr().err


def test_call_timeout_invalid(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        call(daemon_port, pki, "--timeout", "-1", "echo", "1")
    assert caught.value.code == call_cli.EXIT_USAGE
    assert "positive number of seconds" in capsys.readouterr().err


def test_call_connection_refused(pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(free_port(), pki, "echo", "1") == call_cli.EXIT_CONNECTION
    assert "cannot connect to 127.0.0.1" in capsys.readouterr().err


def test_call_unknown_ca(
    daemon_port: int, pki: PKI, other_pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([
        "call", "--server", f"127.0.0.1:{daemon_port}",
        "--cert", str(pki.client_cert("alice")), "--key", str(pki.client_key("alice")),
        "--ca", str(other_pki.server_ca_cert), "echo", "1",
    ])
    assert status == call_cli.EXIT_CONNECTION
    assert "(unknown CA)" in capsys.readouterr().err


def test_call_server_name(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(daemon_port, pki, "--server-name", "localhost", "echo", "1") == call_cli.EXIT_OK
    assert call(daemon_port, pki, "--server-name", "example.org", "echo", "1") == call_cli.EXIT_CONNECTION
    assert "(name mismatch)" in capsys.readouterr().err


def test_call_pki_layout(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([
        "call", "--server", f"localhost:{daemon_port}",
        "--pki", str(pki.directory), "--name", "bob", "whoami",
    ])
    assert status == call_cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["common_name"] == "bob"


def test_call_pki_needs_name(pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["call", "--server", "localhost:1", "--pki", str(pki.directory), "whoami"])
    assert status == call_cli.EXIT_USAGE
    assert "--pki needs --name NAME" in capsys.readouterr().err


def test_call_pki_unknown_client(pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([
        "call", "--server", "localhost:1", "--pki", str(pki.directory), "--name", "zoe", "whoami",
    ])
    assert status == call_cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert "has no complete client 'zoe'" in error
    assert "netrpc certs issue" in error


def test_call_file_overrides_pki(
    daemon_port: int, pki: PKI, other_pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --ca given by itself wins over the server CA of the --pki layout."""
    status = main([
        "call", "--server", f"localhost:{daemon_port}", "--pki", str(pki.directory),
        "--name", "alice", "--ca", str(other_pki.server_ca_cert), "echo", "1",
    ])
    assert status == call_cli.EXIT_CONNECTION
    assert "(unknown CA)" in capsys.readouterr().err


def test_call_environment(
    daemon_port: int, pki: PKI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NETRPC_SERVER", f"127.0.0.1:{daemon_port}")
    monkeypatch.setenv("NETRPC_CERT", str(pki.client_cert("alice")))
    monkeypatch.setenv("NETRPC_KEY", str(pki.client_key("alice")))
    monkeypatch.setenv("NETRPC_CA", str(pki.server_ca_cert))
    assert main(["call", "multiply", "6", "7"]) == call_cli.EXIT_OK
    assert capsys.readouterr().out == "42\n"


def test_call_environment_pki(
    daemon_port: int, pki: PKI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NETRPC_SERVER", f"localhost:{daemon_port}")
    monkeypatch.setenv("NETRPC_PKI", str(pki.directory))
    monkeypatch.setenv("NETRPC_NAME", "bob")
    assert main(["call", "whoami"]) == call_cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["common_name"] == "bob"

    # The command line wins over the environment, and fills in the rest.
    assert main(["call", "--name", "alice", "whoami"]) == call_cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["common_name"] == "alice"
    monkeypatch.setenv("NETRPC_CERT", str(pki.client_cert("bob")))
    monkeypatch.setenv("NETRPC_KEY", str(pki.client_key("bob")))
    assert main(["call", "--name", "alice", "whoami"]) == call_cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["common_name"] == "alice"
    monkeypatch.setenv("NETRPC_SERVER", f"localhost:{free_port()}")
    assert main(["call", "--server", f"localhost:{daemon_port}", "whoami"]) == call_cli.EXIT_OK


def test_call_no_server(pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", *files_of(pki), "echo", "1"]) == call_cli.EXIT_USAGE
    assert "no server given" in capsys.readouterr().err


@pytest.mark.parametrize("server", ["localhost", "localhost:http", "localhost:70000", ":8700"])
def test_call_invalid_server(server: str, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", "--server", server, *files_of(pki), "echo", "1"]) == call_cli.EXIT_USAGE
    assert f"server {server!r} is invalid" in capsys.readouterr().err


def test_call_failover(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    """When nothing listens at the first --server, the call goes to the next one."""
    status = main([
        "call", "--server", f"127.0.0.1:{free_port()}", "--server", f"127.0.0.1:{daemon_port}",
        *files_of(pki), "multiply", "6", "7",
    ])
    assert status == call_cli.EXIT_OK
    assert capsys.readouterr().out == "42\n"


def test_call_failover_environment(
    daemon_port: int, pki: PKI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NETRPC_SERVER", f"127.0.0.1:{free_port()}, 127.0.0.1:{daemon_port}")
    assert main(["call", *files_of(pki), "multiply", "6", "7"]) == call_cli.EXIT_OK
    assert capsys.readouterr().out == "42\n"


def test_call_all_servers_down(pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([
        "call", "--server", f"127.0.0.1:{free_port()}", "--server", f"127.0.0.1:{free_port()}",
        "--timeout", "5", *files_of(pki), "echo", "1",
    ])
    assert status == call_cli.EXIT_CONNECTION
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot connect to 127.0.0.1:" in captured.err
    assert len(captured.err.splitlines()) == 1


def _drop_after_request(connection: ServerConnection) -> None:
    connection.read_message()


@pytest.mark.parametrize(
    ("flags", "expected"), [([], call_cli.EXIT_CONNECTION), (["--idempotent"], call_cli.EXIT_OK)]
)
def test_call_idempotent_retry(
    flags: list[str], expected: int, daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    """A call lost after it was sent goes to the next server only with --idempotent."""
    with ScriptedServer(
        _drop_after_request, cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_cert
    ) as dropping:
        status = main([
            "call", "--server", f"127.0.0.1:{dropping.port}", "--server", f"127.0.0.1:{daemon_port}",
            *files_of(pki), *flags, "multiply", "6", "7",
        ])
        assert dropping.accepted == 1
    assert status == expected
    captured = capsys.readouterr()
    assert captured.out == ("42\n" if flags else "")
    assert ("the outcome is unknown" in captured.err) == (not flags)


def test_call_idempotent_notify(pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([
        "call", "--server", f"127.0.0.1:{free_port()}", *files_of(pki),
        "--idempotent", "--notify", "echo", "1",
    ])
    assert status == call_cli.EXIT_USAGE
    assert "--idempotent cannot be combined with --notify" in capsys.readouterr().err


def test_parse_server_ipv6() -> None:
    assert call_cli.parse_server("[::1]:8700") == ("::1", 8700)


def test_call_missing_certificate(pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nobody.crt"
    status = main([
        "call", "--server", "localhost:1", "--cert", str(missing),
        "--key", str(pki.client_key("alice")), "--ca", str(pki.server_ca_cert), "echo", "1",
    ])
    assert status == call_cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert repr(str(missing)) in error
    assert "missing" in error
    assert len(error.splitlines()) == 1


def test_call_notify(daemon_port: int, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(daemon_port, pki, "--notify", "echo", "1") == call_cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


BATCH = """\
# a comment, then a blank line

["multiply", 6, 7]
{"method": "echo", "params": {"value": "named"}}
{"method": "no.such.method"}
["system.listMethods"]
"""


def test_call_batch_file(
    daemon_port: int, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = tmp_path / "calls.txt"
    batch.write_text(BATCH)
    assert call(daemon_port, pki, "--batch", str(batch)) == call_cli.EXIT_RPC_ERROR
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[0] == {"result": 42}
    assert lines[1] == {"result": "named"}
    assert lines[2]["error"]["code"] == -32601
    assert "multiply" in lines[3]["result"]
    assert len(lines) == 4
    assert "line 5: 'no.such.method' failed" in captured.err


def test_call_batch_stdin(
    daemon_port: int, pki: PKI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('["echo", 1]\n["echo", 2]\n'))
    assert call(daemon_port, pki, "--batch", "-") == call_cli.EXIT_OK
    assert capsys.readouterr().out == '{"result": 1}\n{"result": 2}\n'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('["echo", 1]\n[1, 2]\n', "line 2 is invalid"),
        ('{"method": "echo", "params": 3}\n', "line 1 is invalid"),
        ('{"method": "echo", "id": 3}\n', "line 1 is invalid"),
        ("not json\n", "line 1 is not valid JSON"),
        ("# only a comment\n", "lists no calls"),
    ],
)
def test_call_batch_invalid(
    content: str, message: str, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = tmp_path / "calls.txt"
    batch.write_text(content)
    assert call(free_port(), pki, "--batch", str(batch)) == call_cli.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments", [["--notify", "--batch", "-"], ["--batch", "-", "echo"], ["--batch", "missing.txt"]]
)
def test_call_batch_usage(arguments: list[str], pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    assert call(free_port(), pki, *arguments) == call_cli.EXIT_USAGE
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.fixture(scope="module")
def encrypted_client(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A client certificate from the client CA with a passphrase-protected key."""
    directory = tmp_path_factory.mktemp("encrypted")
    cert, key = directory / "carol.crt", directory / "carol.key"
    pki.client_authority().issue("carol", usage=Usage.CLIENT).write(
        cert, key, passphrase=PASSPHRASE.encode()
    )
    return cert, key


def passphrase_file(directory: Path, text: str, mode: int = 0o600) -> Path:
    path = directory / "passphrase"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def call_encrypted(port: int, pki: PKI, client: tuple[Path, Path], *arguments: str) -> int:
    cert, key = client
    return main([
        "call", "--server", f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key),
        "--ca", str(pki.server_ca_cert), *arguments,
    ])


def test_call_passphrase_file(
    daemon_port: int,
    pki: PKI,
    encrypted_client: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = passphrase_file(tmp_path, PASSPHRASE)
    status = call_encrypted(daemon_port, pki, encrypted_client, "--passphrase-file", str(secret), "whoami")
    assert status == call_cli.EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["common_name"] == "carol"
    assert PASSPHRASE not in captured.out + captured.err


def test_call_passphrase_wrong(
    daemon_port: int,
    pki: PKI,
    encrypted_client: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = passphrase_file(tmp_path, "not the passphrase")
    status = call_encrypted(daemon_port, pki, encrypted_client, "--passphrase-file", str(secret), "whoami")
    assert status == call_cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert "wrong passphrase" in error
    assert "not the passphrase" not in error


def test_call_passphrase_file_too_open(
    pki: PKI, encrypted_client: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = passphrase_file(tmp_path, PASSPHRASE, mode=0o644)
    status = call_encrypted(free_port(), pki, encrypted_client, "--passphrase-file", str(secret), "whoami")
    assert status == call_cli.EXIT_USAGE
    assert "too open" in capsys.readouterr().err


def test_call_passphrase_missing(
    pki: PKI, encrypted_client: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a terminal, a passphrase file or the variable, the call fails at once."""
    assert call_encrypted(free_port(), pki, encrypted_client, "whoami") == call_cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert "no passphrase was given" in error
    assert "pass --passphrase-file FILE" in error


def test_call_passphrase_environment(
    daemon_port: int,
    pki: PKI,
    encrypted_client: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NETRPC_KEY_PASSPHRASE", PASSPHRASE)
    assert call_encrypted(daemon_port, pki, encrypted_client, "echo", "1") == call_cli.EXIT_OK
    assert capsys.readouterr().out == "1\n"


def test_call_protocol_error(pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    def garbage(connection: ServerConnection) -> None:
        connection.read_message()
        connection.send_raw(b"x:garbage,")
        connection.wait_for_close()

    with ScriptedServer(
        garbage, cert=pki.server_cert, key=pki.server_key, client_ca=pki.client_ca_cert
    ) as server:
        assert call(server.port, pki, "echo", "1") == call_cli.EXIT_PROTOCOL
    assert "invalid netstring" in capsys.readouterr().err


def test_call_help_lists_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["call", "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert "exit status:" in text
    for status in range(6):
        assert f"\n  {status}  " in text
    assert "NETRPC_SERVER" in text
    assert "--idempotent" in text
    assert "several servers:" in text


def run_console_script(*arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("NETRPC_")
    }
    return subprocess.run(
        [NETRPC, "call", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        stdin=subprocess.DEVNULL,
    )


def test_console_script_call(daemon_port: int, pki: PKI) -> None:
    result = run_console_script(
        "--server", f"localhost:{daemon_port}", "--pki", str(pki.directory), "--name", "alice",
        "multiply", "6", "7",
    )
    assert result.returncode == call_cli.EXIT_OK, result.stderr
    assert result.stdout == "42\n"


def test_console_script_rpc_error(daemon_port: int, pki: PKI) -> None:
    result = run_console_script(
        "--server", f"localhost:{daemon_port}", "--pki", str(pki.directory), "--name", "alice",
        "multiply", "six", "7",
    )
    assert result.returncode == call_cli.EXIT_RPC_ERROR
    assert result.stdout == ""
    assert "(code -32602)" in result.stderr
    assert "Traceback" not in result.stderr
