"""Tests for netrpc.keyfiles: atomic writes, file modes and key loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from netrpc.exceptions import ConfigurationError, PassphraseError
from netrpc.keyfiles import (
    PRIVATE_KEY_MODE,
    PUBLIC_FILE_MODE,
    StagedFiles,
    encode_private_key,
    ensure_private_directory,
    is_key_file_encrypted,
    load_private_key,
    locked_directory,
    staged_files,
    write_file,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    """Set umask 0 so that only the code under test limits file modes."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_write_file_modes(tmp_path: Path, loose_umask: None) -> None:
    """Keys end at 0400 and public files at 0644 whatever the umask."""
    write_file(tmp_path / "a.key", b"secret", PRIVATE_KEY_MODE)
    write_file(tmp_path / "a.crt", b"public", PUBLIC_FILE_MODE)
    assert mode_of(tmp_path / "a.key") == 0o400
    assert mode_of(tmp_path / "a.crt") == 0o644
    assert (tmp_path / "a.key").read_bytes() == b"secret"


def test_write_file_replaces_read_only_file(tmp_path: Path) -> None:
    write_file(tmp_path / "a.key", b"old", PRIVATE_KEY_MODE)
    write_file(tmp_path / "a.key", b"new", PRIVATE_KEY_MODE)
    assert (tmp_path / "a.key").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["a.key"]


def test_staged_file_never_readable_by_others(tmp_path: Path, loose_umask: None) -> None:
    """A staged key has no group or other bits before it is renamed into place."""
    files = StagedFiles()
    files.add(tmp_path / "a.key", b"secret", PRIVATE_KEY_MODE)
    [temporary] = list(tmp_path.iterdir())
    assert temporary.name != "a.key"
    assert mode_of(temporary) & 0o077 == 0
    files.discard()
    assert list(tmp_path.iterdir()) == []


def test_staged_files_error_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with staged_files() as files:
            files.add(tmp_path / "a.crt", b"one", PUBLIC_FILE_MODE)
            files.add(tmp_path / "b.key", b"two", PRIVATE_KEY_MODE)
            raise RuntimeError("fails before the commit")
    assert list(tmp_path.iterdir()) == []


def test_write_file_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot write .*missing.*a.key"):
        write_file(tmp_path / "missing" / "a.key", b"x", PRIVATE_KEY_MODE)


def test_ensure_private_directory_sets_mode(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o755)
    assert ensure_private_directory(directory) is False
    assert mode_of(directory) == 0o700


def test_ensure_private_directory_creates(tmp_path: Path) -> None:
    assert ensure_private_directory(tmp_path / "pki") is True
    assert mode_of(tmp_path / "pki") == 0o700


def test_ensure_private_directory_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="parent directory .* does not exist"):
        ensure_private_directory(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


def test_ensure_private_directory_is_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is not a directory"):
        ensure_private_directory(tmp_path / "file")


def test_encrypted_key_round_trip(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(tmp_path / "a.key", encode_private_key(key, b"right"), PRIVATE_KEY_MODE)
    assert is_key_file_encrypted(tmp_path / "a.key")
    loaded = load_private_key(tmp_path / "a.key", b"right")
    assert loaded.public_key() == key.public_key()


def test_encrypted_key_wrong_passphrase(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(tmp_path / "a.key", encode_private_key(key, b"right"), PRIVATE_KEY_MODE)
    with pytest.raises(PassphraseError, match="wrong passphrase for private key"):
        load_private_key(tmp_path / "a.key", b"wrong")


def test_encrypted_key_without_passphrase(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(tmp_path / "a.key", encode_private_key(key, b"right"), PRIVATE_KEY_MODE)
    with pytest.raises(PassphraseError, match="is encrypted and no passphrase was given"):
        load_private_key(tmp_path / "a.key")


def test_unencrypted_key_ignores_passphrase(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(tmp_path / "a.key", encode_private_key(key), PRIVATE_KEY_MODE)
    assert not is_key_file_encrypted(tmp_path / "a.key")
    assert load_private_key(tmp_path / "a.key", b"unused").public_key() == key.public_key()


def test_load_private_key_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "a.key").write_text("hello")
    with pytest.raises(ConfigurationError, match="is not a PEM private key"):
        load_private_key(tmp_path / "a.key")


def test_load_private_key_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="private key .* is missing"):
        load_private_key(tmp_path / "a.key")


@pytest.mark.parametrize("passphrase", [b"", b"x" * 1024])
def test_encode_private_key_bad_passphrase(passphrase: bytes) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigurationError, match="passphrase"):
        encode_private_key(key, passphrase)


def test_locked_directory_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot open directory .*nowhere"):
        with locked_directory(tmp_path / "nowhere"):
            pass
