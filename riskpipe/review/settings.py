"""Console settings and reviewer credentials.

There is no default credential: the console refuses to start unless a password or
per-reviewer users are configured, from (first found wins for the shared password)
``--password-file``, the environment variable ``RISKPIPE_REVIEW_PASSWORD`` or the
``review.password`` / ``review.password_file`` keys of the config file. Per-reviewer
users come from ``review.users`` (name -> password, or a werkzeug password hash such as
``scrypt:...`` made with ``werkzeug.security.generate_password_hash``).

Config file (the stage's ``riskpipe.yaml``, read and ``${VAR}``-expanded by the stage's own
loader, so one file validated one way serves both; the console uses these keys)::

    bootstrap_servers: 127.0.0.1:9092      # shared with the stage, as are the TLS/SASL keys
    ledger: riskpipe-ledger.sqlite3         # shared with the stage
    topics: {review: review}                # shared with the stage
    review:
      users: {alice: "scrypt:32768:8:1$...", bob: "a long passphrase"}
      password_file: /run/secrets/review    # or password: ...
      secret_key_file: /run/secrets/review-session-key
      outcomes_topic: review-outcomes
      host: 127.0.0.1
      port: 8470
      trusted_proxies: [10.0.0.0/8]         # reverse proxies whose X-Forwarded-For is believed

Reviewer names are compared NFKC-normalised and case-folded and must match
``REVIEWER_NAME_RE`` in full (``Alice`` and ``alice`` are one reviewer; ``"alice\n"`` is
no name). Failed logins lock out the client address and the reviewer name (5 in 5
minutes each); guesses at the shared password also count against the credential
itself, from any name and address (``SHARED_MAX_FAILURES`` in riskpipe/review/access.py).
The client address is the TCP peer, unless the peer is one of ``trusted_proxies``
(addresses or networks): then it is the right-most ``X-Forwarded-For`` hop that is
not a trusted proxy. Without ``trusted_proxies`` the header is ignored, so behind a
proxy every client shares the proxy's address (and its lockout) until you list it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from werkzeug.security import check_password_hash, generate_password_hash

from riskpipe import secret_file
from riskpipe.app.config import ConfigError, StageConfig, config_relative, load_config, read_config_file
from riskpipe.kafka_clients import KafkaSettings, TopicName, check_topic
from riskpipe.policy import PolicyError
from riskpipe.redaction import register_secret
from riskpipe.review.scope import StageScope

PASSWORD_ENV = "RISKPIPE_REVIEW_PASSWORD"
SECRET_KEY_ENV = "RISKPIPE_REVIEW_SECRET_KEY"
MIN_PASSWORD_LENGTH = 8
# a reviewer name after normalize_reviewer (NFKC, case-folded), matched in full
REVIEWER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")


def normalize_reviewer(name: object) -> str | None:
    """The canonical form of a reviewer name (NFKC-normalised, case-folded), or None
    unless that form matches ``REVIEWER_NAME_RE`` in full. ``"Alice"`` and ``"ａｌｉｃｅ"``
    are ``"alice"``; ``"alice\n"`` is no name at all (a ``$`` anchor would have let it in)."""
    if not isinstance(name, str) or len(name) > 256:
        return None
    canonical = unicodedata.normalize("NFKC", name).casefold()
    return canonical if REVIEWER_NAME_RE.fullmatch(canonical) else None
_HASH_PREFIXES = ("scrypt:", "pbkdf2:")


class SettingsError(ValueError):
    """A configuration problem; the message names the source, field and reason."""


class ReviewSection(BaseModel):
    """The ``review:`` section of the config file."""

    model_config = ConfigDict(extra="forbid")
    password: str | None = None
    password_file: str | None = None
    users: dict[str, str] = Field(default_factory=dict)
    secret_key: str | None = None
    secret_key_file: str | None = None
    outcomes_topic: TopicName = "review-outcomes"
    host: str | None = None
    port: int | None = Field(None, ge=0, le=65535)
    session_hours: float = Field(8.0, gt=0, le=24 * 7)
    # addresses or networks of reverse proxies whose X-Forwarded-For the console believes
    # (for the per-address login lockout); empty: the TCP peer is the client
    trusted_proxies: list[str] = Field(default_factory=list)
    # four eyes: a verdict that overrides one of these decisions (block then confirmed_clean,
    # allow then confirmed_manipulated) takes effect only when a second reviewer confirms it
    require_second_reviewer_for: list[Literal["allow", "block"]] = Field(default_factory=list)
    # fraction of routed items (drawn by event id) that two reviewers judge independently:
    # the report's agreement between reviewers
    double_review_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/8)") from None
        return v


@dataclass(frozen=True)
class Credentials:
    """Who may log in. ``users`` maps a reviewer name to a password or password hash;
    ``shared`` is one password for everyone, who then log in under their own name."""

    users: dict[str, str] = field(default_factory=dict)
    shared: str | None = None
    # a hash of a random password in the users' hash method: what an unknown name is checked against
    _dummy_hash: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.users and not self.shared:
            raise SettingsError(
                "no reviewer credential configured: set RISKPIPE_REVIEW_PASSWORD, pass --password-file, "
                "or configure review.users / review.password in the config file (there is no default)"
            )
        if self.shared is not None:
            _check_password("shared password", self.shared)
        users: dict[str, str] = {}
        for name, secret in self.users.items():
            canonical = normalize_reviewer(name)
            if canonical is None:
                raise SettingsError(f"review.users: {name!r} is not a valid reviewer name (letters, digits, . _ @ -)")
            if canonical in users:
                raise SettingsError(f"review.users: {name!r} is the same reviewer as another entry "
                                    f"(names are compared NFKC-normalised and case-folded: {canonical!r})")
            if not secret.startswith(_HASH_PREFIXES):
                _check_password(f"review.users.{name}", secret)
                register_secret(secret)
            users[canonical] = secret
        object.__setattr__(self, "users", users)
        register_secret(self.shared)
        methods = [s.split("$", 1)[0] for s in self.users.values() if s.startswith(_HASH_PREFIXES)]
        if methods:
            object.__setattr__(self, "_dummy_hash",
                               generate_password_hash(secrets.token_urlsafe(16), method=methods[0]))

    def authenticate(self, name: str, password: str) -> str | None:
        """The reviewer's name when ``password`` is right for ``name``, else None.

        A configured user can log in only with their own password, never with the
        shared one, so the shared password cannot be used to act as a named reviewer.

        Every attempt costs the same, whether ``name`` exists or not: exactly one
        password-hash verification (the user's own hash, or a dummy hash made with the
        configured users' hash method), the shared password's check and constant-time
        compares, so the response
        time does not tell an attacker which reviewer names exist.
        """
        name = normalize_reviewer(name) or ""
        if not isinstance(password, str):
            password = ""
        secret = self.users.get(name)
        hashed = secret if secret is not None and secret.startswith(_HASH_PREFIXES) else self._dummy_hash
        hash_ok = check_password_hash(hashed, password) if hashed else False
        plain_ok = hmac.compare_digest((secret or "").encode("utf-8"), password.encode("utf-8"))
        shared_ok = self.shared is not None and _matches(self.shared, password)  # checked on every path
        if not name:
            return None
        if secret is not None:
            own_ok = hash_ok if hashed is secret else plain_ok
            return name if own_ok else None
        return name if shared_ok else None


def _check_password(what: str, secret: str) -> None:
    if len(secret.strip()) < MIN_PASSWORD_LENGTH:
        raise SettingsError(f"{what}: must be at least {MIN_PASSWORD_LENGTH} characters")


def _matches(secret: str, given: str) -> bool:
    if secret.startswith(_HASH_PREFIXES):
        return check_password_hash(secret, given)  # constant-time compare inside
    return hmac.compare_digest(secret.encode("utf-8"), given.encode("utf-8"))


def read_secret_file(path: str, what: str) -> str:
    """First line of a secret file, stripped (riskpipe.secret_file); SettingsError otherwise."""
    return secret_file.read_secret_file(path, what, SettingsError)


@dataclass(frozen=True)
class ReviewSettings:
    """Everything the console needs, resolved from CLI options, environment and config."""

    ledger: str
    credentials: Credentials
    kafka: KafkaSettings | None = None  # None: no broker (the ledger's queue only)
    review_topic: str = "review"
    outcomes_topic: str = "review-outcomes"
    host: str = "127.0.0.1"
    port: int = 0
    secret_key: bytes | None = None  # None: random per process (sessions end on restart)
    session_hours: float = 8.0
    # the stage config's ``models:`` entries (spec string or mapping with labels, feature_names,
    # range): how the console names classes and features and scales pictures, per model name
    models: dict[str, Any] = field(default_factory=dict)
    # the stage the console serves (riskpipe.review.scope): records of other stages' models or
    # policies are neither ingested nor shown; None (no --config) serves every record
    scope: Any = None
    trusted_proxies: tuple[str, ...] = ()  # review.trusted_proxies (see client_address)
    require_second_reviewer_for: tuple[str, ...] = ()  # review.require_second_reviewer_for (four eyes)
    double_review_fraction: float = 0.0  # review.double_review_fraction (agreement sample)

    def __post_init__(self) -> None:
        """Two reviews need two people: with a shared password anyone logs in under any name
        not in ``users``, so one person could give both (alice, then alice2) and a four-eyes
        override or an agreement figure would rest on one judgement."""
        two = [k for k, on in (("review.require_second_reviewer_for", bool(self.require_second_reviewer_for)),
                               ("review.double_review_fraction", self.double_review_fraction > 0)) if on]
        if two and self.credentials.shared:
            raise SettingsError(f"{' and '.join(two)} need per-reviewer credentials (review.users), but a shared "
                                "password is set, under which one person can log in as two reviewers; drop the "
                                "shared password (RISKPIPE_REVIEW_PASSWORD, --password-file, review.password)")

    @property
    def bootstrap_servers(self) -> str | None:
        return self.kafka.bootstrap_servers if self.kafka is not None else None


def load_config_file(path: str) -> dict[str, Any]:
    try:
        return read_config_file(path)
    except ConfigError as e:
        raise SettingsError(str(e)) from None


def _review_section(data: dict, where: str, base: Path | None = None) -> ReviewSection:
    """The config file's ``review:`` section, validated (the first problem, with its key); its
    relative file paths read against ``base``, the config file's directory, as every path of
    the config is (they were read against the working directory)."""
    try:
        section = ReviewSection(**(data.get("review") or {}))
    except ValidationError as e:
        err = e.errors()[0]
        raise SettingsError(f"{where}: review.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    except TypeError:
        raise SettingsError(f"{where}: review: must be a mapping") from None
    if base is None:
        return section
    return section.model_copy(update={k: config_relative(getattr(section, k), base)
                                      for k in ("password_file", "secret_key_file")})


def _shared_password(password_file: str | None, env: Mapping[str, str], section: ReviewSection) -> str | None:
    """The shared password: --password-file, then the environment, then the config file."""
    if password_file:
        return read_secret_file(password_file, "--password-file")
    if env.get(PASSWORD_ENV):
        return env[PASSWORD_ENV]
    if section.password_file:
        return read_secret_file(section.password_file, "review.password_file")
    return section.password


def _secret_key(env: Mapping[str, str], section: ReviewSection, where: str) -> bytes | None:
    """The session signing key: the environment, then the config file; at least 32 characters."""
    if SECRET_KEY_ENV in env:  # set but empty is refused below (too short), not taken for unset
        register_secret(env[SECRET_KEY_ENV].strip())
        secret_key: bytes | None = env[SECRET_KEY_ENV].strip().encode("utf-8")
    elif section.secret_key_file:
        secret_key = read_secret_file(section.secret_key_file, "review.secret_key_file").encode("utf-8")
    elif section.secret_key:
        secret_key = section.secret_key.encode("utf-8")
    else:
        secret_key = None
    if secret_key is not None and (why := secret_file.weak_secret(secret_key.decode("utf-8"), 32)) is not None:
        raise SettingsError(f"{where}: review.secret_key: {why}")
    return secret_key


def _stage_config(config_path: str | None, ledger: str | None,
                  bootstrap_servers: str | None) -> tuple[StageConfig, StageScope | None]:
    """The shared keys (ledger, topics, Kafka connection and security) validated as the
    stage does, and the stage's scope (models and policies) when a config file is given."""
    try:
        config = load_config(config_path, ledger=ledger, bootstrap_servers=bootstrap_servers)
    except ConfigError as e:
        raise SettingsError(str(e)) from None
    if not config.ledger:
        raise SettingsError("ledger: no ledger given (use --ledger PATH or `ledger:` in the config file)")
    if not config_path:
        return config, None
    try:
        return config, StageScope.from_config(config)
    except PolicyError as e:
        raise SettingsError(str(e)) from None


def _topic(option: str, name: str | None) -> str | None:
    try:
        return None if name is None else check_topic(name)
    except ValueError as e:
        raise SettingsError(f"{option}: {e}") from None


def resolve_settings(
    *,
    ledger: str | None = None,
    config_path: str | None = None,
    password_file: str | None = None,
    bootstrap_servers: str | None = None,
    review_topic: str | None = None,
    outcomes_topic: str | None = None,
    host: str | None = None,
    port: int | None = None,
    environ: dict[str, str] | None = None,
) -> ReviewSettings:
    """Command-line values win over the environment, which wins over the config file."""
    env = os.environ if environ is None else environ
    where = config_path or "config"
    section = _review_section(load_config_file(config_path) if config_path else {}, where,
                              Path(config_path).resolve().parent if config_path else None)
    credentials = Credentials(users=dict(section.users), shared=_shared_password(password_file, env, section))
    secret_key = _secret_key(env, section, where)
    config, scope = _stage_config(config_path, ledger, bootstrap_servers)
    return ReviewSettings(
        ledger=str(config.ledger),
        credentials=credentials,
        kafka=config.kafka() if "bootstrap_servers" in config.model_fields_set else None,
        review_topic=_topic("--review-topic", review_topic) or config.topics.review,
        outcomes_topic=_topic("--outcomes-topic", outcomes_topic) or section.outcomes_topic,
        host=host or section.host or "127.0.0.1",
        port=port if port is not None else (section.port if section.port is not None else 0),
        secret_key=secret_key,
        session_hours=section.session_hours,
        models=dict(config.models) if config_path else {},
        scope=scope,
        trusted_proxies=tuple(section.trusted_proxies),
        require_second_reviewer_for=tuple(section.require_second_reviewer_for),
        double_review_fraction=section.double_review_fraction,
    )


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies) -> str:
    """The client's address for the login lockout. ``X-Forwarded-For`` is believed only
    when the TCP peer is a trusted proxy, and then only back to the first hop that is
    not one (read right to left: the entries left of it are the client's own claims,
    which anyone can forge). Without trusted proxies it is ignored: the peer is the client."""
    nets = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]

    def trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in nets)

    addr = peer or "unknown"
    if not nets or not forwarded_for or not trusted(addr):
        return addr
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return addr  # a malformed hop: stop at the last address a trusted proxy vouched for
        addr = hop
        if not trusted(hop):
            return hop
    return addr
