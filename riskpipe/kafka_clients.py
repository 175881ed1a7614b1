"""The one place kafka-python clients are built.

Every consumer, producer and admin client in riskpipe (the stage's source and sink,
topic creation, ``riskpipe ledger ingest``, the review console, the demo, checkpoint
publishing) comes from :func:`consumer`, :func:`producer` or :func:`admin` with one
:class:`KafkaSettings`, so a cluster that needs TLS or SASL is reached the same way by
all of them. The settings are the flat top-level keys of ``riskpipe.yaml``
(``bootstrap_servers``, ``security_protocol``, ``sasl_*``, ``ssl_*``); callers add
only what is specific to their role (group id, acks, timeouts).

A group member's session timeout and heartbeat interval left unset (None) are chosen
for the broker it reaches (:func:`group_timing`).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

import kafka
import kafka.admin
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from riskpipe.redaction import register_secret

log = logging.getLogger("riskpipe.kafka")

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic(name: str) -> str:
    """``name`` if Kafka takes it as a topic name (its legal characters, at most 249 of them,
    not ``.`` or ``..``), else ValueError: the broker would refuse it only at the first send
    or subscribe, long after start-up, and as an offline file name it would leave the sink
    directory."""
    if not _TOPIC.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{name[:300]!r} is not a Kafka topic name: letters, digits, '.', '_' and '-', at most 249, "
                         "not '.' or '..'")
    return name


TopicName = Annotated[str, AfterValidator(check_topic)]


class KafkaSettings(BaseModel):
    """Connection and security settings shared by every Kafka client."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    bootstrap_servers: str = Field("127.0.0.1:9092", min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_check_hostname: bool = True
    client_id: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_") and self.sasl_mechanism is None:
            raise ValueError(f"sasl_mechanism: required with security_protocol {self.security_protocol}")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
            self.sasl_plain_username and self.sasl_plain_password
        ):
            raise ValueError("sasl_plain_username/sasl_plain_password: required with sasl_mechanism "
                             f"{self.sasl_mechanism}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile/ssl_keyfile: give both (client certificate and its key) or neither")

        register_secret(self.sasl_plain_password)  # masked in every output from now on
        register_secret(self.ssl_password)
        return self

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments common to KafkaConsumer, KafkaProducer and KafkaAdminClient."""
        opts: dict[str, Any] = {"bootstrap_servers": self.servers(), "security_protocol": self.security_protocol}
        for k in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "ssl_cafile",
                  "ssl_certfile", "ssl_keyfile", "ssl_password", "client_id"):
            v = getattr(self, k)
            if v is not None:
                opts[k] = v
        if self.security_protocol in ("SSL", "SASL_SSL"):
            opts["ssl_check_hostname"] = self.ssl_check_hostname
        return opts

    def with_servers(self, bootstrap_servers: str | None) -> KafkaSettings:
        """The same security settings for other bootstrap servers (a ``--bootstrap-servers`` flag)."""
        return self if not bootstrap_servers else self.model_copy(update={"bootstrap_servers": bootstrap_servers})


def _merge(settings: KafkaSettings, options: dict[str, Any]) -> dict[str, Any]:
    clash = set(options) & set(KafkaSettings.model_fields) - {"client_id"}
    if clash:  # connection and security come from the settings only, never per call
        raise TypeError(f"pass {', '.join(sorted(clash))} through KafkaSettings, not per client")
    return {**settings.client_options(), **options}


# (session timeout, heartbeat interval) in ms of a group member whose config leaves them unset.
# Apache Kafka refuses session timeouts below its group.min.session.timeout.ms (6 s by
# default); these are kafka-python's own defaults.
KAFKA_GROUP_TIMING = (10_000, 3_000)
# Tansu, the embedded broker, holds every JoinGroup until half the group's session timeout
# has passed, re-checking once a second, and holds a follower's SyncGroup in the same 1 s
# steps until the leader's assignment is in: a 2 s session makes each of those one step, so a
# 2-member group forms in 1-3 s (5-13 s at 10 s / 3 s; bench/bench_workers.py). The session
# timeout is also how long a member may go without a heartbeat before Tansu evicts it.
EMBEDDED_GROUP_TIMING = (2_000, 500)
# how the embedded broker is recognised: Tansu's default cluster id, which
# riskpipe.stream.broker.EmbeddedBroker passes explicitly
EMBEDDED_CLUSTER_ID = "tansu_cluster"
_cluster_ids: dict[KafkaSettings, str] = {}


def cluster_id(settings: KafkaSettings, timeout_ms: int = 5_000) -> str | None:
    """The cluster id the brokers report (DescribeCluster), None when it cannot be had;
    remembered per settings once known."""
    if settings not in _cluster_ids:
        try:
            client = admin(settings, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
            try:
                _cluster_ids[settings] = client.describe_cluster()["cluster_id"]
            finally:
                client.close()
        except Exception as e:  # noqa: BLE001 - unreachable, or a broker without DescribeCluster
            log.debug("cluster id of %s unknown: %r", settings.bootstrap_servers, e)
            return None
    return _cluster_ids[settings]


def group_timing(settings: KafkaSettings, session_timeout_ms: int | None = None,
                 heartbeat_interval_ms: int | None = None) -> tuple[int, int]:
    """(session timeout, heartbeat interval) in ms: the given values; an unset one from
    :data:`EMBEDDED_GROUP_TIMING` on the embedded broker, :data:`KAFKA_GROUP_TIMING`
    elsewhere (also when the cluster id cannot be read), kept consistent with a given one
    (heartbeat at most a third of the session timeout)."""
    if session_timeout_ms is not None and heartbeat_interval_ms is not None:
        return session_timeout_ms, heartbeat_interval_ms
    embedded = cluster_id(settings) == EMBEDDED_CLUSTER_ID
    session, heartbeat = EMBEDDED_GROUP_TIMING if embedded else KAFKA_GROUP_TIMING
    if session_timeout_ms is not None:
        return session_timeout_ms, min(heartbeat, session_timeout_ms // 3)
    if heartbeat_interval_ms is not None:
        return max(session, 3 * heartbeat_interval_ms), heartbeat_interval_ms
    return session, heartbeat


def consumer(settings: KafkaSettings, *topics: str, **options: Any):
    """A ``kafka.KafkaConsumer`` (subscribed to ``topics`` if any). With a ``group_id``,
    a ``session_timeout_ms`` / ``heartbeat_interval_ms`` left out or None comes from
    :func:`group_timing`."""

    if options.get("group_id") is not None:
        session, heartbeat = options["session_timeout_ms"], options["heartbeat_interval_ms"] = group_timing(
            settings, options.get("session_timeout_ms"), options.get("heartbeat_interval_ms"))
        log.info("group %s: session timeout %d ms, heartbeat interval %d ms", options["group_id"], session, heartbeat)
    made = kafka.KafkaConsumer(*topics, **_merge(settings, options))
    if options.get("group_id") is not None:
        _rejoin_until_applied(made)
    return made


def _rejoin_until_applied(consumer) -> None:
    """Keep a group member rebalancing until the answer to its join has been applied.

    kafka-python 3's ``join_group_async`` loops ``while need_rejoin()`` and leaves its
    join attempt in flight when ``poll``'s timeout ends first. A rebalance the leader
    starts on a metadata change (partitions added, a topic made again) is flagged only by
    its assignment snapshot differing from the metadata, and the leader's own assignment
    makes the two equal again before SyncGroup is answered. A poll that times out in that
    window leaves ``need_rejoin()`` False: the answer is never applied, the revoked
    partitions are never assigned again, the heartbeat stays off, the broker drops the
    member and it never asks again; the stage reads nothing from then on. The Java
    client tests ``rejoinNeeded || joinFuture != null`` (``rejoinNeededOrPending``);
    kafka-python did too before its asyncio rewrite (dpkp/kafka-python#1695). This puts
    the pending half back: a join attempt whose answer has not been applied (its task is
    cleared only once applied, or on an error that retries) is a rejoin still needed.
    A client without that attribute is left as it is."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_join_task"):
        log.debug("kafka-python %s: no pending-join hook; its own rejoin check is used", kafka.__version__)
        return
    flagged = coordinator.need_rejoin
    coordinator.need_rejoin = lambda: flagged() or coordinator._join_task is not None


def coordinator_unknown(consumer) -> bool:
    """Does the group member know no coordinator now? kafka-python marks the coordinator
    dead on the first failed heartbeat or request once its broker is gone, while ``poll``
    raises nothing and returns no message, so this is how a member with nothing to read
    learns of a dead broker. A client without the attribute (another kafka-python) is
    taken as connected: the broker's errors still say otherwise once a message is due."""
    coordinator = getattr(consumer, "_coordinator", None)
    check = getattr(coordinator, "coordinator_unknown", None)
    return bool(check()) if callable(check) else False


def producer(settings: KafkaSettings, **options: Any):
    """A ``kafka.KafkaProducer``."""

    return kafka.KafkaProducer(**_merge(settings, options))


def admin(settings: KafkaSettings, **options: Any):
    """A ``kafka.admin.KafkaAdminClient``."""

    return kafka.admin.KafkaAdminClient(**_merge(settings, options))
