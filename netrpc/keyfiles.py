"""
Write and read the PEM files of a PKI so that a private key is never readable
by group or others, not even while it is being written, and so that a failed
command leaves no half-written file behind.

Every file is first written to a temporary name in its final directory,
created with ``O_CREAT | O_EXCL`` and mode 0600, flushed to disk, given its
final mode and only then renamed over the final name. A rename within one
directory is atomic, so a reader sees either the old file or the new one.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from netrpc.exceptions import ConfigurationError, PassphraseError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Final modes. Certificates and CRLs are public; keys are read-only for
# their owner so that an accidental overwrite fails too.
PRIVATE_KEY_MODE = 0o400
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIRECTORY_MODE = 0o700

# Mode of a temporary file while it is being written: the owner must be able
# to write it, nobody else may read it.
_STAGING_MODE = 0o600

# cryptography 50 rejects longer passphrases when it loads a key, so a key
# encrypted with one could never be used again.
MAX_PASSPHRASE_LENGTH = 1023

_ENCRYPTED_MARKERS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


class StagedFiles:
    """
    Files written under temporary names and renamed into place together.

    Use it through ``staged_files()``: the renames happen when the ``with``
    block ends without an error, and the temporary files are removed when it
    ends with one.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def add(self, path: Path, data: bytes, mode: int) -> None:
        """Write ``data`` to a temporary file next to ``path`` with final ``mode``."""
        temporary = _write_temporary(path, data, mode)
        self._staged.append((temporary, path))

    def commit(self) -> None:
        """Rename every staged file over its final name and sync the directories."""
        for temporary, path in self._staged:
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise _write_error(path, error) from error
        for directory in {path.parent for _, path in self._staged}:
            _fsync_directory(directory)
        self._staged.clear()

    def discard(self) -> None:
        """Remove the temporary files that were not renamed yet."""
        for temporary, _ in self._staged:
            temporary.unlink(missing_ok=True)
        self._staged.clear()


@contextmanager
def staged_files() -> Iterator[StagedFiles]:
    """Collect files to write and rename them into place only if nothing fails."""
    files = StagedFiles()
    try:
        yield files
        files.commit()
    finally:
        files.discard()


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically and give it ``mode``."""
    with staged_files() as files:
        files.add(path, data, mode)


def _write_temporary(path: Path, data: bytes, mode: int) -> Path:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(temporary, flags, _STAGING_MODE)
    except OSError as error:
        raise _write_error(path, error) from error

    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _write_error(path, error) from error
    return temporary


def _fsync_directory(directory: Path) -> None:
    # Syncing the directory makes the renames themselves survive a crash.
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_error(path: Path, error: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"cannot write {str(path)!r}: {error.strerror}; "
        "check that the directory exists and is writable"
    )


@contextmanager
def locked_directory(directory: Path) -> Iterator[None]:
    """
    Hold an exclusive advisory lock (flock) on ``directory`` for the block.

    Commands that read a file, change it and write it back, such as adding
    a serial to the CRL, take this lock so that two of them run one after
    the other instead of losing one change. Other programs are not stopped.
    """
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigurationError(
            f"cannot open directory {str(directory)!r}: {error.strerror}; check the path"
        ) from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def ensure_private_directory(directory: Path) -> bool:
    """
    Create ``directory`` with mode 0700, or set that mode if it exists.

    Return True if the directory was created. The parent must exist, so that
    a typo in the path does not silently create a tree elsewhere.
    """
    created = False
    if not directory.exists():
        if not directory.parent.is_dir():
            raise ConfigurationError(
                f"cannot create {str(directory)!r}: its parent directory "
                f"{str(directory.parent)!r} does not exist; create it first"
            )
        try:
            directory.mkdir(mode=PRIVATE_DIRECTORY_MODE)
        except OSError as error:
            raise _write_error(directory, error) from error
        created = True
    if not directory.is_dir():
        raise ConfigurationError(
            f"{str(directory)!r} is not a directory; give the path of a directory"
        )

    try:
        os.chmod(directory, PRIVATE_DIRECTORY_MODE)
    except OSError as error:
        raise _write_error(directory, error) from error
    return created


def check_passphrase(passphrase: bytes) -> None:
    """Raise ConfigurationError unless ``passphrase`` can encrypt a key."""
    if not passphrase:
        raise ConfigurationError("the passphrase is empty; give a non-empty passphrase")
    if len(passphrase) > MAX_PASSPHRASE_LENGTH:
        raise ConfigurationError(
            f"the passphrase is {len(passphrase)} bytes long; "
            f"give at most {MAX_PASSPHRASE_LENGTH} bytes"
        )


def encode_private_key(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """Return ``key`` as PKCS#8 PEM, encrypted with ``passphrase`` if one is given."""
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if passphrase is not None:
        check_passphrase(passphrase)
        encryption = serialization.BestAvailableEncryption(passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def is_encrypted_pem(data: bytes) -> bool:
    """Tell whether PEM ``data`` contains an encrypted private key (PKCS#8 or legacy)."""
    return any(marker in data for marker in _ENCRYPTED_MARKERS)


def read_file(path: Path, file_role: str) -> bytes:
    """Read ``path``; ``file_role`` (such as "certificate") names the file in errors."""
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        raise ConfigurationError(
            f"{file_role} {str(path)!r} is missing; check the path"
        ) from error
    except OSError as error:
        raise ConfigurationError(
            f"cannot read {file_role} {str(path)!r}: {error.strerror}; "
            "check the path and its permissions"
        ) from error


def is_key_file_encrypted(path: Path) -> bool:
    """Tell whether the private key file at ``path`` is encrypted."""
    return is_encrypted_pem(read_file(path, "private key"))


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    """
    Load the private key at ``path``.

    A passphrase given for an unencrypted key is ignored. Raise
    PassphraseError if the key is encrypted and the passphrase is missing
    or wrong, and ConfigurationError if the file is not a supported key.
    """
    data = read_file(path, "private key")
    encrypted = is_encrypted_pem(data)
    if encrypted and passphrase is None:
        raise PassphraseError(
            f"private key {str(path)!r} is encrypted and no passphrase was given; "
            "give its passphrase"
        )

    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except ValueError as error:
        if encrypted:
            raise PassphraseError(
                f"wrong passphrase for private key {str(path)!r}; "
                "give the passphrase it was encrypted with"
            ) from error
        raise ConfigurationError(
            f"{str(path)!r} is not a PEM private key; check the path"
        ) from error

    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ConfigurationError(
            f"private key {str(path)!r} is a {type(key).__name__}; "
            "use an EC, RSA or Ed25519 key"
        )
    return key
