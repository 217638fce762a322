"""
The access policy: which client identities may call which methods, and how
many connections and calls in flight each identity may hold.

The daemon reads it from the ``[policy]`` table of its config file::

    [policy]
    public_methods = ["system.health"]

    [[policy.rule]]
    identities = ["alice", "*.compute.example"]
    methods = ["compute.*", "system.listMethods"]
    max_connections = 4
    max_in_flight = 32

Patterns are shell-style globs with the rules of ``fnmatch.fnmatchcase``:
case-sensitive, ``*`` matches any text including dots, ``?`` one
character, ``[seq]`` one character of a set. An identity pattern is matched
against the certificate's common name, its DNS subjectAltNames and its URI
subjectAltNames; one matching name is enough.

An identity may call the union of the methods of every rule that matches
it, plus ``public_methods``. When several matching rules set a cap, the
smallest applies. Everything else is denied. Without a policy (``None``
wherever a ``Policy`` is expected), every verified certificate may call
every method.

This module only decides; the daemon enforces, logs and counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase, translate
from typing import Any

from netrpc.exceptions import ConfigurationError
from netrpc.identity import PeerIdentity

__all__ = [
    "DEFAULT_PUBLIC_METHODS",
    "UNRESTRICTED",
    "Access",
    "Policy",
    "Rule",
    "access_for",
    "parse_policy",
]

# Monitoring and load balancers need a liveness check that works with any
# client certificate, so system.health stays callable unless the policy
# sets public_methods.
DEFAULT_PUBLIC_METHODS = ("system.health",)

_GLOB_CHARACTERS = re.compile(r"[*?\[]")
_POLICY_KEYS = ("public_methods", "rule")
_RULE_KEYS = ("identities", "methods", "max_connections", "max_in_flight")


@dataclass(frozen=True)
class Rule:
    """
    One ``[[policy.rule]]``: identities matching any of ``identities`` may
    call methods matching any of ``methods``. A cap of None means no cap
    beyond the daemon's global limits.
    """

    identities: tuple[str, ...]
    methods: tuple[str, ...]
    max_connections: int | None = None
    max_in_flight: int | None = None

    def matches(self, names: Iterable[str]) -> bool:
        """Return whether any of ``names`` matches any identity pattern."""
        return any(
            fnmatchcase(name, pattern) for name in names if name for pattern in self.identities
        )


@dataclass(frozen=True)
class Policy:
    """The parsed ``[policy]`` table: its rules and the methods open to every caller."""

    rules: tuple[Rule, ...] = ()
    public_methods: tuple[str, ...] = DEFAULT_PUBLIC_METHODS

    def matching_rules(self, identity: PeerIdentity | None) -> tuple[Rule, ...]:
        """Return the rules whose identity patterns match ``identity``."""
        names = identity.names() if identity is not None else ()
        return tuple(rule for rule in self.rules if rule.matches(names))


def _compile_globs(patterns: Sequence[str]) -> Callable[[str], bool]:
    """
    Build a test for "matches any of ``patterns``" with the rules of
    ``fnmatchcase``: names without glob characters go into a set, and the
    globs into one regular expression made by ``fnmatch.translate``.
    """
    exact = frozenset(pattern for pattern in patterns if not _GLOB_CHARACTERS.search(pattern))
    globs = [pattern for pattern in patterns if _GLOB_CHARACTERS.search(pattern)]
    if not globs:
        return exact.__contains__

    expression = re.compile("|".join(f"(?:{translate(pattern)})" for pattern in globs))

    def allows(name: str) -> bool:
        return name in exact or expression.match(name) is not None

    return allows


class Access:
    """
    The access of one identity: the method check compiled once, for every
    call on a connection.

    ``matched`` is true when a rule matched the identity, and always true
    without a policy. An identity that no rule matches may call only the
    public methods.
    """

    def __init__(
        self,
        method_patterns: Sequence[str],
        *,
        matched: bool,
        max_connections: int | None = None,
        max_in_flight: int | None = None,
        unrestricted: bool = False,
    ) -> None:
        self.method_patterns = tuple(method_patterns)
        self.matched = matched
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.unrestricted = unrestricted
        self._allows = _compile_globs(self.method_patterns)

    def allows(self, method: str) -> bool:
        """Return whether the identity may call ``method``."""
        return self.unrestricted or self._allows(method)


# The access of every caller when there is no policy.
UNRESTRICTED = Access(("*",), matched=True, unrestricted=True)


def access_for(policy: Policy | None, identity: PeerIdentity | None) -> Access:
    """Compile what ``identity`` may do under ``policy`` (everything when it is None)."""
    if policy is None:
        return UNRESTRICTED

    rules = policy.matching_rules(identity)
    patterns = list(policy.public_methods)
    for rule in rules:
        patterns.extend(rule.methods)
    return Access(
        _unique(patterns),
        matched=bool(rules),
        max_connections=_smallest(rule.max_connections for rule in rules),
        max_in_flight=_smallest(rule.max_in_flight for rule in rules),
    )


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _smallest(caps: Iterable[int | None]) -> int | None:
    values = [cap for cap in caps if cap is not None]
    return min(values) if values else None


# --- Parsing the [policy] table -------------------------------------------


def parse_policy(table: Mapping[str, Any], source: str = "the config file") -> Policy:
    """
    Check the raw ``[policy]`` table of a config file and build the ``Policy``.

    Raise ``ConfigurationError`` naming the key and the rule when a key is
    unknown or a value has the wrong type.
    """
    _reject_unknown(table, _POLICY_KEYS, f"[policy] in {source}")
    public = table.get("public_methods", list(DEFAULT_PUBLIC_METHODS))
    public_methods = _patterns(public, f"public_methods in [policy] of {source}", allow_empty=True)

    rules = table.get("rule", [])
    if not isinstance(rules, list) or not all(isinstance(rule, Mapping) for rule in rules):
        raise ConfigurationError(
            f"policy.rule in {source} must be an array of tables, written [[policy.rule]], "
            f"not {rules!r}"
        )
    parsed = tuple(
        _parse_rule(rule, f"[[policy.rule]] number {number} of {source}")
        for number, rule in enumerate(rules, start=1)
    )
    return Policy(parsed, public_methods)


def _parse_rule(rule: Mapping[str, Any], where: str) -> Rule:
    _reject_unknown(rule, _RULE_KEYS, where)
    for key in ("identities", "methods"):
        if key not in rule:
            raise ConfigurationError(f"{where} has no {key}; add {key} = [...] with glob patterns")
    return Rule(
        identities=_patterns(rule["identities"], f"identities in {where}"),
        methods=_patterns(rule["methods"], f"methods in {where}"),
        max_connections=_cap(rule.get("max_connections"), f"max_connections in {where}"),
        max_in_flight=_cap(rule.get("max_in_flight"), f"max_in_flight in {where}"),
    )


def _reject_unknown(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigurationError(
            f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(known)}"
        )


def _patterns(value: Any, what: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    valid = isinstance(value, list) and all(isinstance(item, str) and item for item in value)
    if not valid or (not value and not allow_empty):
        kind = "a list" if allow_empty else "a non-empty list"
        raise ConfigurationError(f"{what} must be {kind} of non-empty glob patterns, not {value!r}")
    return tuple(value)


def _cap(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ConfigurationError(f"{what} must be a whole number of at least 1, not {value!r}")
    return value
