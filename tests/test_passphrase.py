"""Tests for netrpc.passphrase: the sources of a key's passphrase and its one-time unlock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netrpc.certs import PKI
from netrpc.exceptions import ConfigurationError, PassphraseError
from netrpc.passphrase import PASSPHRASE_VARIABLE, forget_passphrases, unlock_key

PASSPHRASE = "correct horse"


@pytest.fixture(scope="module")
def encrypted_key(pki: PKI) -> Path:
    """The key of client dave, encrypted with PASSPHRASE."""
    _, key = pki.issue_client("dave", key_passphrase=PASSPHRASE.encode())
    return key


@pytest.fixture(autouse=True)
def fresh_process_memory() -> Iterator[None]:
    forget_passphrases()
    yield
    forget_passphrases()


class Prompt:
    """A stand-in for getpass that records how often it was asked."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.questions: list[str] = []

    def __call__(self, question: str) -> str:
        self.questions.append(question)
        return self.answer


def test_unlock_plain_key_needs_nothing(pki: PKI) -> None:
    prompt = Prompt(PASSPHRASE)

    assert unlock_key(pki.client_key("alice"), prompt=prompt, interactive=True) is None
    assert prompt.questions == []


def test_unlock_given_passphrase(encrypted_key: Path) -> None:
    assert unlock_key(encrypted_key, passphrase=PASSPHRASE) == PASSPHRASE.encode()


def test_unlock_from_file(encrypted_key: Path, tmp_path: Path) -> None:
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n")
    passphrase_file.chmod(0o600)

    assert unlock_key(encrypted_key, passphrase_file=passphrase_file) == PASSPHRASE.encode()


def test_unlock_rejects_open_file(encrypted_key: Path, tmp_path: Path) -> None:
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE)
    passphrase_file.chmod(0o644)

    with pytest.raises(ConfigurationError, match="too open"):
        unlock_key(encrypted_key, passphrase_file=passphrase_file)


def test_unlock_from_environment(encrypted_key: Path) -> None:
    environ = {PASSPHRASE_VARIABLE: PASSPHRASE}

    assert unlock_key(encrypted_key, environ=environ, interactive=False) == PASSPHRASE.encode()


def test_unlock_prompts_once(encrypted_key: Path) -> None:
    """A terminal prompt runs once; later unlocks of the same key reuse its answer."""
    prompt = Prompt(PASSPHRASE)

    for _ in range(5):
        unlocked = unlock_key(encrypted_key, environ={}, prompt=prompt, interactive=True)
        assert unlocked == PASSPHRASE.encode()

    assert len(prompt.questions) == 1
    assert str(encrypted_key.resolve()) in prompt.questions[0]


def test_unlock_wrong_passphrase_asks_once(encrypted_key: Path) -> None:
    """A wrong passphrase raises one error and is neither retried nor remembered."""
    prompt = Prompt("wrong")

    with pytest.raises(PassphraseError, match=r"wrong passphrase .* \(from the passphrase typed\)"):
        unlock_key(encrypted_key, environ={}, prompt=prompt, interactive=True)
    assert len(prompt.questions) == 1

    prompt.answer = PASSPHRASE
    assert unlock_key(encrypted_key, environ={}, prompt=prompt, interactive=True) is not None


def test_unlock_wrong_environment(encrypted_key: Path) -> None:
    environ = {PASSPHRASE_VARIABLE: "wrong"}

    with pytest.raises(PassphraseError, match=f"from environment variable {PASSPHRASE_VARIABLE}"):
        unlock_key(encrypted_key, environ=environ, interactive=False)


def test_unlock_without_source(encrypted_key: Path) -> None:
    with pytest.raises(PassphraseError, match="is encrypted and no passphrase was given"):
        unlock_key(encrypted_key, environ={}, interactive=False)


def test_unlock_first_source_only(encrypted_key: Path) -> None:
    """A wrong explicit passphrase is not rescued by a right environment variable."""
    environ = {PASSPHRASE_VARIABLE: PASSPHRASE}

    with pytest.raises(PassphraseError, match="from the passphrase given"):
        unlock_key(encrypted_key, passphrase="wrong", environ=environ, interactive=False)


def test_forget_passphrases(encrypted_key: Path) -> None:
    unlock_key(encrypted_key, passphrase=PASSPHRASE)
    forget_passphrases()

    with pytest.raises(PassphraseError, match="no passphrase was given"):
        unlock_key(encrypted_key, environ={}, interactive=False)


@pytest.mark.parametrize("source", ["passphrase", "passphrase_file"])
def test_unlock_explicit_checked_after_cache(encrypted_key: Path, tmp_path: Path, source: str) -> None:
    """After one unlock, a wrong explicit passphrase still fails instead of using the kept one."""
    unlock_key(encrypted_key, passphrase=PASSPHRASE)
    passphrase_file = tmp_path / "wrong"
    passphrase_file.write_text("wrong")
    passphrase_file.chmod(0o600)
    explicit: dict[str, Any] = {"passphrase": "wrong", "passphrase_file": passphrase_file}

    with pytest.raises(PassphraseError, match="wrong passphrase"):
        unlock_key(encrypted_key, **{source: explicit[source]})


def test_unlock_cache_replaces_environment(encrypted_key: Path) -> None:
    """The kept passphrase replaces an environment variable that is no longer set."""
    unlock_key(encrypted_key, passphrase=PASSPHRASE)

    assert unlock_key(encrypted_key, environ={}, interactive=False) == PASSPHRASE.encode()


def test_unlock_explicit_right_after_cache(encrypted_key: Path) -> None:
    unlock_key(encrypted_key, environ={PASSPHRASE_VARIABLE: PASSPHRASE}, interactive=False)

    assert unlock_key(encrypted_key, passphrase=PASSPHRASE) == PASSPHRASE.encode()
