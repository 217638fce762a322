"""Tests for ``netrpc certs``: each subcommand, its errors and its help."""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from netrpc import certs_cli
from netrpc.certs import PKI, Usage, load_certificate
from netrpc.identity import format_serial

PASSPHRASE = "correct horse battery"
SERVER_OPTIONS = ["--server-name", "localhost", "--server-name", "127.0.0.1"]


@dataclass
class Result:
    status: int
    out: str
    err: str


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    """Run ``netrpc certs ARGS`` in process and check that it leaks no secret."""

    def run_certs(*arguments: str | Path) -> Result:
        status = certs_cli.main([str(argument) for argument in arguments])
        captured = capsys.readouterr()
        result = Result(status, captured.out, captured.err)
        for text in (result.out, result.err):
            assert "PRIVATE KEY" not in text
            assert PASSPHRASE not in text
            assert "Traceback" not in text
        return result

    yield run_certs


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    return path


@pytest.fixture
def dev_pki(tmp_path: Path, run) -> PKI:
    """A PKI made by ``init --no-passphrase`` with client alice."""
    assert run("init", tmp_path / "pki", *SERVER_OPTIONS, "--no-passphrase").status == 0
    assert run("issue", tmp_path / "pki", "alice").status == 0
    return PKI(tmp_path / "pki")


@pytest.fixture
def encrypted_pki(tmp_path: Path, run, passphrase_file: Path) -> PKI:
    """A PKI whose CA keys are encrypted with PASSPHRASE."""
    result = run("init", tmp_path / "enc", *SERVER_OPTIONS, "--passphrase-file", passphrase_file)
    assert result.status == 0, result.err
    return PKI(tmp_path / "enc")


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the terminal prompt; tests append the answers it returns in order."""
    replies: list[str] = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": replies.pop(0))
    return replies


def assert_one_line_error(result: Result, expected: str) -> None:
    assert result.status == 1
    assert result.out == ""
    assert result.err.count("\n") == 1
    assert result.err.startswith("netrpc: error: ")
    assert expected in result.err


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestInit:
    def test_creates_layout(self, dev_pki: PKI, run) -> None:
        for path in (*dev_pki.ca_files(), dev_pki.server_cert, dev_pki.server_key):
            assert path.exists(), path
        assert mode_of(dev_pki.directory) == 0o700
        assert mode_of(dev_pki.client_ca_key) == 0o400
        assert not dev_pki.is_ca_key_encrypted(Usage.CLIENT)

    def test_output(self, tmp_path: Path, run) -> None:
        result = run("init", tmp_path / "pki", *SERVER_OPTIONS, "--no-passphrase")
        assert result.status == 0
        assert "created server-ca.crt, server-ca.key" in result.out
        assert "keep both CA keys on this machine" in result.out

    def test_refuses_overwrite(self, dev_pki: PKI, run) -> None:
        before = dev_pki.client_ca_cert.read_bytes()
        result = run("init", dev_pki.directory, *SERVER_OPTIONS, "--no-passphrase")
        assert_one_line_error(result, "already contains CA files")
        assert dev_pki.client_ca_cert.read_bytes() == before

    def test_refuses_before_prompting(self, dev_pki: PKI, run, answers: list[str]) -> None:
        """An existing PKI is reported before any passphrase is asked for."""
        result = run("init", dev_pki.directory, *SERVER_OPTIONS)
        assert_one_line_error(result, "already contains CA files")

    def test_force(self, dev_pki: PKI, run) -> None:
        before = dev_pki.client_ca_cert.read_bytes()
        result = run("init", dev_pki.directory, *SERVER_OPTIONS, "--no-passphrase", "--force")
        assert result.status == 0
        assert dev_pki.client_ca_cert.read_bytes() != before

    def test_passphrase_file(self, encrypted_pki: PKI) -> None:
        assert encrypted_pki.is_ca_key_encrypted(Usage.CLIENT)
        assert encrypted_pki.is_ca_key_encrypted(Usage.SERVER)
        encrypted_pki.client_authority(PASSPHRASE.encode())
        assert b"ENCRYPTED" not in encrypted_pki.server_key.read_bytes()

    def test_prompts_twice(self, tmp_path: Path, run, answers: list[str]) -> None:
        answers += [PASSPHRASE, PASSPHRASE]
        assert run("init", tmp_path / "pki", *SERVER_OPTIONS).status == 0
        assert answers == []
        PKI(tmp_path / "pki").server_authority(PASSPHRASE.encode())

    def test_prompt_mismatch(self, tmp_path: Path, run, answers: list[str]) -> None:
        answers += [PASSPHRASE, "something else"]
        result = run("init", tmp_path / "pki", *SERVER_OPTIONS)
        assert_one_line_error(result, "the two passphrases differ")
        assert not (tmp_path / "pki").exists()

    def test_prompt_empty(self, tmp_path: Path, run, answers: list[str]) -> None:
        answers += ["", ""]
        assert_one_line_error(run("init", tmp_path / "pki", *SERVER_OPTIONS), "the passphrase is empty")

    def test_no_terminal(self, tmp_path: Path, run, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a terminal getpass would echo, so the command stops instead."""

        def getpass_without_terminal(prompt: str = "") -> str:
            warnings.warn("Can not control echo on the terminal.", getpass.GetPassWarning, stacklevel=2)
            return PASSPHRASE

        monkeypatch.setattr(getpass, "getpass", getpass_without_terminal)
        result = run("init", tmp_path / "pki", *SERVER_OPTIONS)
        assert_one_line_error(result, "cannot ask for a passphrase without a terminal")

    def test_empty_passphrase_file(self, tmp_path: Path, run) -> None:
        (tmp_path / "empty").write_text("\n")
        result = run("init", tmp_path / "pki", *SERVER_OPTIONS, "--passphrase-file", tmp_path / "empty")
        assert_one_line_error(result, "is empty")

    def test_missing_passphrase_file(self, tmp_path: Path, run) -> None:
        result = run("init", tmp_path / "pki", *SERVER_OPTIONS, "--passphrase-file", tmp_path / "nope")
        assert_one_line_error(result, "passphrase file")
        assert not (tmp_path / "pki").exists()

    def test_invalid_server_name(self, tmp_path: Path, run) -> None:
        result = run("init", tmp_path / "pki", "--server-name", "bad_name!", "--no-passphrase")
        assert_one_line_error(result, "invalid server name 'bad_name!'")
        assert not (tmp_path / "pki").exists()

    def test_missing_parent(self, tmp_path: Path, run) -> None:
        result = run("init", tmp_path / "a" / "pki", *SERVER_OPTIONS, "--no-passphrase")
        assert_one_line_error(result, "does not exist")

    def test_unwritable_directory(self, tmp_path: Path, run) -> None:
        """A DIR whose path runs through a regular file cannot be created."""
        (tmp_path / "file").write_text("x")
        result = run("init", tmp_path / "file" / "pki", *SERVER_OPTIONS, "--no-passphrase")
        assert_one_line_error(result, "does not exist")

    def test_encrypt_server_key(self, tmp_path: Path, run, passphrase_file: Path) -> None:
        result = run(
            "init", tmp_path / "pki", *SERVER_OPTIONS, "--no-passphrase",
            "--encrypt-key", "--key-passphrase-file", passphrase_file,
        )
        assert result.status == 0
        assert b"ENCRYPTED PRIVATE KEY" in PKI(tmp_path / "pki").server_key.read_bytes()

    def test_key_type(self, tmp_path: Path, run) -> None:
        assert run("init", tmp_path / "pki", *SERVER_OPTIONS, "--no-passphrase", "--key-type", "ed25519").status == 0
        assert "Ed25519" in run("show", tmp_path / "pki" / "server-ca.crt").out

    def test_days(self, tmp_path: Path, run) -> None:
        result = run("init", tmp_path / "pki", *SERVER_OPTIONS, "--no-passphrase", "--days", "10", "--ca-days", "20")
        assert result.status == 0
        pki = PKI(tmp_path / "pki")
        server = load_certificate(pki.server_cert)
        ca = load_certificate(pki.server_ca_cert)
        assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 10
        assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 20


class TestIssue:
    def test_issue(self, dev_pki: PKI, run) -> None:
        result = run("issue", dev_pki.directory, "bob")
        assert result.status == 0
        assert "issued client 'bob'" in result.out
        assert mode_of(dev_pki.client_key("bob")) == 0o400
        assert load_certificate(dev_pki.client_cert("bob")).subject.rfc4514_string() == "CN=bob"

    def test_duplicate(self, dev_pki: PKI, run) -> None:
        assert_one_line_error(run("issue", dev_pki.directory, "alice"), "already issued and not revoked")

    @pytest.mark.parametrize("name", ["../evil", "a b", ".hidden", "-x", "x" * 65])
    def test_invalid_name(self, dev_pki: PKI, run, name: str) -> None:
        result = run("issue", dev_pki.directory, "--", name)
        assert_one_line_error(result, "invalid client name")
        assert sorted(path.name for path in dev_pki.clients_directory.iterdir()) == ["alice.crt", "alice.key"]

    def test_missing_directory(self, tmp_path: Path, run) -> None:
        assert_one_line_error(run("issue", tmp_path / "nowhere", "bob"), "does not exist")

    def test_directory_without_ca(self, tmp_path: Path, run) -> None:
        assert_one_line_error(run("issue", tmp_path, "bob"), "client-ca.crt is missing")

    def test_encrypted_ca_right(self, encrypted_pki: PKI, run, passphrase_file: Path) -> None:
        result = run("issue", encrypted_pki.directory, "bob", "--passphrase-file", passphrase_file)
        assert result.status == 0
        assert encrypted_pki.client_cert("bob").exists()

    def test_encrypted_ca_wrong(self, encrypted_pki: PKI, run, tmp_path: Path) -> None:
        (tmp_path / "wrong").write_text("not it\n")
        result = run("issue", encrypted_pki.directory, "bob", "--passphrase-file", tmp_path / "wrong")
        assert_one_line_error(result, "wrong passphrase for private key")
        assert not encrypted_pki.client_cert("bob").exists()
        assert not encrypted_pki.clients_directory.exists()

    def test_encrypted_ca_prompt(self, encrypted_pki: PKI, run, answers: list[str]) -> None:
        answers.append(PASSPHRASE)
        assert run("issue", encrypted_pki.directory, "bob").status == 0
        assert answers == []

    def test_unencrypted_ca_no_prompt(self, dev_pki: PKI, run, answers: list[str]) -> None:
        """An unencrypted CA key is used without asking (the prompt would fail here)."""
        assert run("issue", dev_pki.directory, "bob").status == 0

    def test_encrypt_key(self, dev_pki: PKI, run, passphrase_file: Path) -> None:
        result = run("issue", dev_pki.directory, "bob", "--encrypt-key", "--key-passphrase-file", passphrase_file)
        assert result.status == 0
        key = serialization.load_pem_private_key(
            dev_pki.client_key("bob").read_bytes(), PASSPHRASE.encode()
        )
        assert key.public_key() == load_certificate(dev_pki.client_cert("bob")).public_key()

    def test_key_passphrase_without_encrypt(self, dev_pki: PKI, run, passphrase_file: Path) -> None:
        result = run("issue", dev_pki.directory, "bob", "--key-passphrase-file", passphrase_file)
        assert_one_line_error(result, "--key-passphrase-file was given without --encrypt-key")

    @pytest.mark.parametrize("key_type", ["ec-p256", "ed25519"])
    def test_key_type(self, dev_pki: PKI, run, key_type: str) -> None:
        assert run("issue", dev_pki.directory, "bob", "--key-type", key_type).status == 0
        expected = "EC secp256r1" if key_type == "ec-p256" else "Ed25519"
        assert expected in run("show", dev_pki.client_cert("bob")).out

    def test_unknown_key_type(self, dev_pki: PKI, run) -> None:
        with pytest.raises(SystemExit) as exit_info:
            run("issue", dev_pki.directory, "bob", "--key-type", "dsa")
        assert exit_info.value.code == 2

    @pytest.mark.parametrize("days", ["0", "-1"])
    def test_invalid_days(self, dev_pki: PKI, run, days: str) -> None:
        assert_one_line_error(run("issue", dev_pki.directory, "bob", "--days", days), "invalid validity")
        assert not dev_pki.client_cert("bob").exists()


class TestRevoke:
    def test_revoke(self, dev_pki: PKI, run) -> None:
        serial = load_certificate(dev_pki.client_cert("alice")).serial_number
        result = run("revoke", dev_pki.directory, "alice")
        assert result.status == 0
        assert f"revoked client 'alice', serial {format_serial(serial)}" in result.out
        assert serial in dev_pki.revoked_serials()

    def test_revoke_twice(self, dev_pki: PKI, run) -> None:
        run("revoke", dev_pki.directory, "alice")
        before = dev_pki.crl.read_bytes()
        result = run("revoke", dev_pki.directory, "alice")
        assert result.status == 0
        assert "already revoked" in result.out
        assert dev_pki.crl.read_bytes() == before

    def test_unknown_name(self, dev_pki: PKI, run) -> None:
        assert_one_line_error(run("revoke", dev_pki.directory, "nobody"), "no client named 'nobody'")

    def test_openssl_rejects_after_revoke(self, dev_pki: PKI, run) -> None:
        command = [
            "/usr/bin/openssl", "verify", "-crl_check", "-CRLfile", str(dev_pki.crl),
            "-CAfile", str(dev_pki.client_ca_cert), str(dev_pki.client_cert("alice")),
        ]
        assert subprocess.run(command, capture_output=True, timeout=30).returncode == 0
        run("revoke", dev_pki.directory, "alice")
        assert subprocess.run(command, capture_output=True, timeout=30).returncode != 0

    def test_encrypted_wrong_passphrase(self, encrypted_pki: PKI, run, passphrase_file: Path, tmp_path: Path) -> None:
        run("issue", encrypted_pki.directory, "bob", "--passphrase-file", passphrase_file)
        (tmp_path / "wrong").write_text("not it\n")
        before = encrypted_pki.crl.read_bytes()
        result = run("revoke", encrypted_pki.directory, "bob", "--passphrase-file", tmp_path / "wrong")
        assert_one_line_error(result, "wrong passphrase")
        assert encrypted_pki.crl.read_bytes() == before

    def test_reissue(self, dev_pki: PKI, run) -> None:
        run("revoke", dev_pki.directory, "alice")
        assert run("issue", dev_pki.directory, "alice").status == 0
        assert not dev_pki.is_revoked("alice")


class TestServer:
    def test_renew(self, dev_pki: PKI, run) -> None:
        cas_before = [path.read_bytes() for path in dev_pki.ca_files()]
        result = run("server", dev_pki.directory, "--server-name", "rpc.example.com", "--days", "30")
        assert result.status == 0
        assert "renewed the server certificate for rpc.example.com" in result.out
        assert [path.read_bytes() for path in dev_pki.ca_files()] == cas_before
        assert "DNS:rpc.example.com" in run("show", dev_pki.server_cert).out

    def test_invalid_name(self, dev_pki: PKI, run) -> None:
        before = dev_pki.server_cert.read_bytes()
        result = run("server", dev_pki.directory, "--server-name", "exa mple.com")
        assert_one_line_error(result, "invalid server name 'exa mple.com'")
        assert dev_pki.server_cert.read_bytes() == before

    def test_invalid_name_before_prompt(self, encrypted_pki: PKI, run, answers: list[str]) -> None:
        """An invalid server name is reported before the CA passphrase is asked for."""
        result = run("server", encrypted_pki.directory, "--server-name", "a..b")
        assert_one_line_error(result, "invalid server name 'a..b'")

    def test_server_name_required(self, dev_pki: PKI, run) -> None:
        with pytest.raises(SystemExit) as exit_info:
            run("server", dev_pki.directory)
        assert exit_info.value.code == 2

    def test_encrypted_ca(self, encrypted_pki: PKI, run, passphrase_file: Path) -> None:
        result = run("server", encrypted_pki.directory, "--server-name", "localhost", "--passphrase-file", passphrase_file)
        assert result.status == 0


class TestCrl:
    def test_renew(self, dev_pki: PKI, run) -> None:
        run("revoke", dev_pki.directory, "alice", "--crl-days", "2")
        result = run("crl", dev_pki.directory, "--crl-days", "90")
        assert result.status == 0
        assert "with 1 revoked serial, next update" in result.out
        assert "in 89 days" in run("list", dev_pki.directory).out

    def test_missing_directory(self, tmp_path: Path, run) -> None:
        assert_one_line_error(run("crl", tmp_path / "nowhere"), "does not exist")


class TestList:
    def test_list(self, dev_pki: PKI, run) -> None:
        run("issue", dev_pki.directory, "bob", "--days", "5")
        run("issue", dev_pki.directory, "carol")
        run("revoke", dev_pki.directory, "carol")
        lines = run("list", dev_pki.directory).out.splitlines()
        rows = {line.split()[0]: line for line in lines[1:] if line and not line.startswith("client-ca.crl")}
        assert lines[0].split() == ["NAME", "ROLE", "SERIAL", "EXPIRES", "STATUS"]
        assert set(rows) == {"server-ca", "client-ca", "server", "alice", "bob", "carol"}
        assert rows["alice"].endswith("valid")
        assert rows["bob"].endswith("expires in 4 days")
        assert rows["carol"].endswith("revoked")
        serial = load_certificate(dev_pki.client_cert("alice")).serial_number
        assert format_serial(serial) in rows["alice"].split()

    def test_crl_next_update(self, dev_pki: PKI, run) -> None:
        assert "client-ca.crl: next update" in run("list", dev_pki.directory).out

    def test_missing_directory(self, tmp_path: Path, run) -> None:
        assert_one_line_error(run("list", tmp_path / "nowhere"), "does not exist")

    def test_stray_file(self, dev_pki: PKI, run) -> None:
        """A file in clients/ that is no certificate gets its own row instead of failing the list."""
        (dev_pki.directory / "clients" / "notes.crt").write_text("not a certificate\n")

        result = run("list", dev_pki.directory)
        rows = list_rows(result.out)

        assert result.status == 0
        assert rows["alice"].endswith("valid")
        assert rows["notes"].split()[1:] == ["client", "-", "-", "unreadable:", "not", "a", "PEM", "certificate"]

    def test_link_and_directory_skipped(self, dev_pki: PKI, run) -> None:
        clients = dev_pki.directory / "clients"
        (clients / "stray").write_text("not a certificate\n")
        (clients / "link.crt").symlink_to(clients / "stray")
        (clients / "folder.crt").mkdir()

        result = run("list", dev_pki.directory)
        rows = list_rows(result.out)

        assert result.status == 0
        assert rows["alice"].endswith("valid")
        assert rows["link"].endswith("skipped: symbolic link")
        assert rows["folder"].endswith("skipped: directory")

    def test_fifo_not_opened(self, dev_pki: PKI) -> None:
        """A FIFO named like a certificate in clients/ does not block the list."""
        os.mkfifo(dev_pki.directory / "clients" / "pipe.crt")
        command = [sys.executable, "-m", "netrpc.cli", "certs", "list", str(dev_pki.directory)]

        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("netrpc certs list blocked on a FIFO in clients/")
        rows = list_rows(finished.stdout)

        assert finished.returncode == 0
        assert rows["alice"].endswith("valid")
        assert rows["pipe"].endswith("skipped: FIFO")


def list_rows(output: str) -> dict[str, str]:
    """Return the certificate rows of ``netrpc certs list`` by name."""
    lines = output.splitlines()
    return {line.split()[0]: line for line in lines[1:] if line and not line.startswith("client-ca.crl")}


class TestShow:
    def test_certificate(self, dev_pki: PKI, run) -> None:
        out = run("show", dev_pki.server_cert).out
        assert "subject:             CN=localhost" in out
        assert "issuer:              CN=netrpc server CA " in out
        assert "subjectAltName:      DNS:localhost, IP:127.0.0.1" in out
        assert "valid from:" in out
        assert "valid until:" in out
        assert "key:                 EC secp256r1, 256 bits" in out
        assert "extendedKeyUsage:    serverAuth" in out
        assert "CA:                  no" in out

    def test_fingerprint_matches_openssl(self, dev_pki: PKI, run) -> None:
        out = run("show", dev_pki.client_cert("alice")).out
        openssl = subprocess.run(
            ["/usr/bin/openssl", "x509", "-in", str(dev_pki.client_cert("alice")), "-noout", "-fingerprint", "-sha256"],
            capture_output=True, text=True, timeout=30,
        )
        fingerprint = openssl.stdout.strip().split("=", 1)[1]
        assert f"SHA-256 fingerprint: {fingerprint}" in out

    def test_ca_certificate(self, dev_pki: PKI, run) -> None:
        assert "CA:                  yes, pathlen 0" in run("show", dev_pki.client_ca_cert).out

    def test_der_certificate(self, dev_pki: PKI, run, tmp_path: Path) -> None:
        der = load_certificate(dev_pki.server_cert).public_bytes(serialization.Encoding.DER)
        (tmp_path / "server.der").write_bytes(der)
        assert "subject:             CN=localhost" in run("show", tmp_path / "server.der").out

    def test_unencrypted_key(self, dev_pki: PKI, run) -> None:
        out = run("show", dev_pki.client_ca_key).out
        assert "private key: UNENCRYPTED" in out
        assert "key:         EC secp256r1, 256 bits" in out
        assert "file mode:   0400" in out

    def test_encrypted_key(self, encrypted_pki: PKI, run) -> None:
        out = run("show", encrypted_pki.client_ca_key).out
        assert "private key: encrypted with a passphrase" in out

    def test_key_mode_warning(self, dev_pki: PKI, run, tmp_path: Path) -> None:
        copy = tmp_path / "loose.key"
        copy.write_bytes(dev_pki.client_key("alice").read_bytes())
        copy.chmod(0o644)
        assert "readable by group or others" in run("show", copy).out

    def test_key_matches_certificate(self, dev_pki: PKI, run) -> None:
        """The public key fingerprint of a key equals that of its certificate's key."""
        certificate = load_certificate(dev_pki.client_cert("alice"))
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = hashes.Hash(hashes.SHA256())
        digest.update(spki)
        expected = ":".join(f"{byte:02X}" for byte in digest.finalize())
        assert f"public key SHA-256: {expected}" in run("show", dev_pki.client_key("alice")).out

    def test_crl(self, dev_pki: PKI, run) -> None:
        assert "revoked:      0 certificates" in run("show", dev_pki.crl).out
        run("revoke", dev_pki.directory, "alice")
        serial = load_certificate(dev_pki.client_cert("alice")).serial_number
        out = run("show", dev_pki.crl).out
        assert "revoked:      1 certificate\n" in out
        assert f"serial {format_serial(serial)} revoked " in out
        assert "next update:" in out

    def test_missing_file(self, tmp_path: Path, run) -> None:
        assert_one_line_error(run("show", tmp_path / "nope.crt"), "is missing")

    def test_unreadable_file(self, tmp_path: Path, run) -> None:
        """A directory is the unreadable file here, because tests may run as root."""
        assert_one_line_error(run("show", tmp_path), "cannot read file")

    def test_not_a_certificate(self, tmp_path: Path, run) -> None:
        (tmp_path / "junk").write_bytes(b"hello")
        assert_one_line_error(run("show", tmp_path / "junk"), "is not a certificate, CRL or private key")

    def test_broken_pem(self, tmp_path: Path, run) -> None:
        (tmp_path / "broken.crt").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        assert_one_line_error(run("show", tmp_path / "broken.crt"), "cannot parse")


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Return the parser of each ``netrpc certs`` subcommand by name."""
    subparsers = argparse.ArgumentParser(prog="netrpc").add_subparsers()
    certs_cli.register(subparsers)
    # argparse has no public way to list a parser's actions.
    commands = next(
        action
        for action in subparsers.choices["certs"]._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return dict(commands.choices)


class TestHelp:
    def test_certs_help(self, run, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            certs_cli.main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for command in ("init", "issue", "revoke", "server", "crl", "list", "show"):
            assert command in out
        assert "--no-passphrase" in out

    @pytest.mark.parametrize("command", ["init", "issue", "revoke", "server", "crl", "list", "show"])
    def test_every_option_explained(self, command: str) -> None:
        parser = subcommand_parsers()[command]
        assert parser.description
        for action in parser._actions:
            assert action.help, f"{command} {action.option_strings or action.dest} has no help"

    @pytest.mark.parametrize("command", ["init", "issue", "server"])
    def test_days_unit_and_default(self, command: str, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            certs_cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--days N validity of the" in out
        assert "in days, starting now (default: 365)" in out
