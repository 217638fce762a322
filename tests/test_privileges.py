"""Tests for netrpc.privileges: the user a daemon started as root switches to."""

from __future__ import annotations

import os
import pwd

import pytest

from netrpc.exceptions import ConfigurationError
from netrpc.privileges import TargetUser, check_start_privileges, resolve_target_user, switch_ids

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


class TestSwitchIds:
    def test_target_user(self, as_root: None) -> None:
        target = resolve_target_user("nobody", None)
        assert switch_ids(target, None) == (NOBODY.pw_uid, NOBODY.pw_gid)

    def test_twistd_uid_wins(self, as_root: None) -> None:
        target = TargetUser("other", 4000, 4000)
        assert switch_ids(target, NOBODY.pw_uid, 123) == (NOBODY.pw_uid, 123)

    def test_twistd_uid_primary_group(self, as_root: None) -> None:
        """Without --gid, twistd takes the primary group of the --uid user."""
        assert switch_ids(None, NOBODY.pw_uid) == (NOBODY.pw_uid, NOBODY.pw_gid)

    def test_twistd_uid_unknown(self, as_root: None) -> None:
        unused = max(entry.pw_uid for entry in pwd.getpwall()) + 1
        with pytest.raises(ConfigurationError, match=f"--uid {unused} names no user"):
            switch_ids(None, unused)

    def test_no_switch(self, as_root: None) -> None:
        assert switch_ids(None, None) is None

    def test_not_root(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        assert switch_ids(TargetUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid), None) is None


class TestStartPrivileges:
    def test_root_names_user_first(self, as_root: None) -> None:
        with pytest.raises(ConfigurationError) as caught:
            check_start_privileges(None, None)
        message = str(caught.value)
        assert "with --user or 'user' in the config file" in message
        assert message.index("--user") < message.index("--uid")

    def test_workers_leave_out_twistd_uid(self, as_root: None) -> None:
        """--workers rejects twistd's --uid, so its refusal does not suggest it."""
        with pytest.raises(ConfigurationError) as caught:
            check_start_privileges(None, None, workers=True)
        assert "--user" in str(caught.value)
        assert "--uid" not in str(caught.value)

    def test_user_given(self, as_root: None) -> None:
        check_start_privileges(resolve_target_user("nobody", None), None, workers=True)
