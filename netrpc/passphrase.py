"""
Find the passphrase of an encrypted client key, once per process.

The sources, in order: a passphrase given by the caller, a passphrase file,
an environment variable, and last a prompt without echo when standard input
is a terminal. Only the first source present is tried. A wrong passphrase
raises one ``PassphraseError`` and no prompt is repeated, so a script never
hangs in a retry loop.

A passphrase that unlocked a key is kept in memory for the life of the
process, keyed by the key file's real path, so that reconnects and further
clients of the same process do not ask again. The kept passphrase replaces
only the environment variable and the prompt. A passphrase or passphrase
file given by the caller is always checked against the key, so a wrong one
fails even after an earlier unlock succeeded.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from threading import Lock

from netrpc.exceptions import PassphraseError
from netrpc.keyfiles import load_private_key
from netrpc.tlsfiles import key_needs_passphrase, read_passphrase_file

__all__ = ["DEFAULT_HINT", "PASSPHRASE_VARIABLE", "forget_passphrases", "unlock_key"]

# The environment variable read for a client key's passphrase.
PASSPHRASE_VARIABLE = "NETRPC_KEY_PASSPHRASE"
# The advice for a Python caller in the error raised when no passphrase is found.
DEFAULT_HINT = "pass passphrase= or passphrase_file="

_unlocked: dict[Path, bytes] = {}
# A prompt must not run twice in parallel for the same key when clients in
# several threads start at once.
_lock = Lock()


def unlock_key(
    key: str | os.PathLike[str],
    *,
    passphrase: bytes | str | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    variable: str = PASSPHRASE_VARIABLE,
    prompt: Callable[[str], str] | None = None,
    interactive: bool | None = None,
    hint: str = DEFAULT_HINT,
) -> bytes | None:
    """
    Return the passphrase that decrypts the private key at ``key``.

    Return None when the key is not encrypted. ``environ`` defaults to
    ``os.environ``; ``prompt`` defaults to ``getpass.getpass`` and is used
    only when ``interactive`` is true, which by default means standard input
    is a terminal. ``hint`` is the advice in the error raised when no source
    gives a passphrase: the way this caller accepts one, such as
    ``"pass --passphrase-file FILE"``.

    Raises ``PassphraseError`` when the passphrase is wrong or no source
    provides one, and ``ConfigurationError`` when a file cannot be read.
    """
    path = Path(key).resolve()
    if not key_needs_passphrase(path):
        return None

    explicit = passphrase is not None or passphrase_file is not None
    with _lock:
        known = _unlocked.get(path)
        if known is not None and not explicit:
            return known

        found, source = _find(
            path, passphrase, passphrase_file, environ, variable, prompt, interactive, hint
        )
        # The kept passphrase has unlocked this key before, so an equal one
        # needs no second decryption.
        if found != known:
            _check(path, found, source)
            _unlocked[path] = found
        return found


def forget_passphrases() -> None:
    """Drop every passphrase kept in memory, so that the next unlock reads its source again."""
    with _lock:
        _unlocked.clear()


def _find(
    path: Path,
    passphrase: bytes | str | None,
    passphrase_file: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None,
    variable: str,
    prompt: Callable[[str], str] | None,
    interactive: bool | None,
    hint: str,
) -> tuple[bytes, str]:
    # Return the passphrase of the first source present, and that source's name.
    if passphrase is not None:
        return _as_bytes(passphrase), "the passphrase given"
    if passphrase_file is not None:
        return read_passphrase_file(Path(passphrase_file)), f"passphrase file {str(passphrase_file)!r}"

    value = (os.environ if environ is None else environ).get(variable)
    if value:
        return _as_bytes(value), f"environment variable {variable}"

    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        ask = prompt or getpass.getpass
        return _as_bytes(ask(f"Passphrase for {path}: ")), "the passphrase typed"

    raise PassphraseError(
        f"private key {str(path)!r} is encrypted and no passphrase was given; "
        f"{hint}, set the environment variable {variable}, "
        "or run on a terminal to be asked for it"
    )


def _check(path: Path, passphrase: bytes, source: str) -> None:
    try:
        load_private_key(path, passphrase)
    except PassphraseError:
        raise PassphraseError(
            f"wrong passphrase for private key {str(path)!r} (from {source}); "
            "give the passphrase the key was encrypted with"
        ) from None


def _as_bytes(passphrase: bytes | str) -> bytes:
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else passphrase
