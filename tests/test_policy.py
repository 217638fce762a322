"""Tests for parsing the [policy] table and matching identities and methods."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatchcase

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netrpc.exceptions import ConfigurationError
from netrpc.identity import PeerIdentity
from netrpc.policy import (
    DEFAULT_PUBLIC_METHODS,
    UNRESTRICTED,
    Access,
    Policy,
    Rule,
    access_for,
    parse_policy,
)

EXAMPLE = """
[policy]

[[policy.rule]]
identities = ["alice", "*.compute.example"]
methods = ["compute.*", "system.listMethods"]
max_connections = 4
max_in_flight = 32

[[policy.rule]]
identities = ["bob"]
methods = ["system.health"]
"""

ALICE = PeerIdentity("alice", serial=1)
BOB = PeerIdentity("bob", serial=2)
NODE = PeerIdentity("worker", dns_names=("n1.compute.example",), serial=3)
SPIFFE = PeerIdentity("svc", uris=("spiffe://example.org/billing",), serial=4)
STRANGER = PeerIdentity("mallory", serial=5)


def parse(text: str) -> Policy:
    return parse_policy(tomllib.loads(text)["policy"], "test.toml")


@pytest.fixture
def policy() -> Policy:
    return parse(EXAMPLE)


class TestParse:
    def test_example(self, policy: Policy) -> None:
        assert policy.rules == (
            Rule(("alice", "*.compute.example"), ("compute.*", "system.listMethods"), 4, 32),
            Rule(("bob",), ("system.health",)),
        )
        assert policy.public_methods == DEFAULT_PUBLIC_METHODS

    def test_empty_table(self) -> None:
        """An empty [policy] is a policy that allows only the public methods."""
        assert parse_policy({}) == Policy((), DEFAULT_PUBLIC_METHODS)

    def test_public_methods_off(self) -> None:
        assert parse_policy({"public_methods": []}).public_methods == ()

    def test_single_string(self) -> None:
        policy = parse_policy({"rule": [{"identities": "alice", "methods": "echo"}]})
        assert policy.rules[0] == Rule(("alice",), ("echo",))

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            ({"rules": []}, r"unknown key 'rules' in \[policy\] in test.toml"),
            ({"rule": {"identities": ["a"]}}, r"policy.rule in test.toml must be an array of tables"),
            ({"rule": [{"methods": ["x"]}]}, r"number 1 of test.toml has no identities"),
            ({"rule": [{"identities": ["a"]}]}, r"number 1 of test.toml has no methods"),
            (
                {"rule": [{"identities": ["a"], "methods": ["x"]}, {"identities": [], "methods": ["x"]}]},
                r"identities in \[\[policy.rule\]\] number 2 of test.toml must be a non-empty list",
            ),
            ({"rule": [{"identities": ["a"], "methods": [""]}]}, r"methods in .* not \[''\]"),
            ({"rule": [{"identities": ["a"], "methods": [1]}]}, r"methods in .* not \[1\]"),
            (
                {"rule": [{"identities": ["a"], "methods": ["x"], "max_in_flight": 0}]},
                r"max_in_flight in .* at least 1, not 0",
            ),
            (
                {"rule": [{"identities": ["a"], "methods": ["x"], "max_connections": True}]},
                r"max_connections in .* not True",
            ),
            (
                {"rule": [{"identities": ["a"], "methods": ["x"], "method": ["y"]}]},
                r"unknown key 'method' in \[\[policy.rule\]\] number 1",
            ),
            ({"public_methods": 3}, r"public_methods .* must be a list"),
        ],
    )
    def test_invalid(self, table: dict[str, object], message: str) -> None:
        with pytest.raises(ConfigurationError, match=message):
            parse_policy(table, "test.toml")


class TestAccess:
    @pytest.mark.parametrize(
        ("identity", "method", "allowed"),
        [
            (ALICE, "compute.add", True),
            (ALICE, "compute.matrix.multiply", True),
            (ALICE, "system.listMethods", True),
            (ALICE, "system.health", True),
            (ALICE, "system.stats", False),
            (ALICE, "computer.add", False),
            (ALICE, "compute", False),
            (BOB, "system.health", True),
            (BOB, "compute.add", False),
            (BOB, "system.listMethods", False),
            (NODE, "compute.add", True),
            (STRANGER, "system.health", True),
            (STRANGER, "compute.add", False),
            (None, "compute.add", False),
        ],
    )
    def test_allows(self, policy: Policy, identity: PeerIdentity | None, method: str, allowed: bool) -> None:
        assert access_for(policy, identity).allows(method) is allowed

    def test_no_policy(self) -> None:
        access = access_for(None, STRANGER)
        assert access is UNRESTRICTED
        assert access.allows("anything.at.all")
        assert access.matched

    def test_matched(self, policy: Policy) -> None:
        assert access_for(policy, ALICE).matched
        assert not access_for(policy, STRANGER).matched

    def test_caps(self, policy: Policy) -> None:
        access = access_for(policy, ALICE)
        assert access.max_connections == 4
        assert access.max_in_flight == 32
        assert access_for(policy, BOB).max_in_flight is None

    def test_smallest_cap(self) -> None:
        """When several rules match, their methods add up and the smallest cap wins."""
        policy = Policy(
            (
                Rule(("alice",), ("a.*",), max_connections=8),
                Rule(("al*",), ("b",), max_connections=2, max_in_flight=5),
            )
        )
        access = access_for(policy, ALICE)
        assert access.allows("a.x")
        assert access.allows("b")
        assert access.max_connections == 2
        assert access.max_in_flight == 5

    def test_uri_san(self) -> None:
        policy = Policy((Rule(("spiffe://example.org/*",), ("bill",)),))
        assert access_for(policy, SPIFFE).allows("bill")

    def test_case_sensitive(self) -> None:
        policy = Policy((Rule(("Alice",), ("Echo",)),))
        assert not access_for(policy, ALICE).allows("Echo")
        assert not access_for(policy, PeerIdentity("Alice")).allows("echo")

    def test_empty_name_not_matched(self) -> None:
        """A certificate without a common name is not matched by '*' through its empty CN."""
        policy = Policy((Rule(("*",), ("echo",)),))
        assert not access_for(policy, PeerIdentity("")).allows("echo")

    def test_public_methods_empty(self) -> None:
        policy = Policy((), public_methods=())
        assert not access_for(policy, ALICE).allows("system.health")


_NAME_CHARACTERS = st.sampled_from("ab.*?[]!-_")


@given(
    patterns=st.lists(st.text(_NAME_CHARACTERS, min_size=1, max_size=6), min_size=1, max_size=4),
    name=st.text(st.sampled_from("ab.-_[]"), max_size=8),
)
def test_compiled_matches_fnmatchcase(patterns: list[str], name: str) -> None:
    """The compiled check gives the same result as fnmatchcase over every pattern."""
    access = Access(patterns, matched=True)
    assert access.allows(name) == any(fnmatchcase(name, pattern) for pattern in patterns)
