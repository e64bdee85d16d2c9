"""Prometheus metrics read from the parts' ``stats()`` at scrape time (extra ``[metrics]``).

``pip install "tornado-longconn[metrics]"`` installs ``prometheus_client``.
:class:`LongConnCollector` is a ``prometheus_client`` collector: when Prometheus
scrapes, it calls every part's ``stats()`` (and the two latency histograms'
snapshots) and turns the snapshots into metric families. Nothing is added to a
per-message or per-member path: between scrapes the parts only keep the
integer counters they always keep. :class:`MetricsHandler` serves the text
exposition format::

    collector = LongConnCollector(hubs=[hub], waiters=[waiter], upload_stores=[store])
    app = tornado.web.Application([
        (r"/metrics", MetricsHandler, {"collector": collector}),
        ...
    ])

The families, their types and labels are listed in :data:`FAMILIES` and in
:doc:`/reference/metrics`. Names follow Prometheus' conventions (``longconn_``
prefix, base units in the name, ``_total`` on counters); label values are
bounded: a transport, a policy, a backend kind, a close code, a failure
reason. Topics are labels only when asked for, at most ``topic_labels`` of them
(the groups with the most members).

**Several processes.** A collector describes its own process. When the
application runs several processes behind one port (``fork_processes``, a
process manager), a scrape lands on any one of them, so each process also
writes its families to a snapshot file in a shared directory
(:meth:`LongConnCollector.share`, by default ``$PROMETHEUS_MULTIPROC_DIR``), and
:class:`MetricsHandler` serves the sum over every process's file, fresh for
itself and at most ``interval`` seconds old for the others. Counters and
histograms of a process that has exited are kept (totals never go backwards);
its gauges are dropped. In that mode the handler also serves
``prometheus_client``'s own ``MultiProcessCollector`` aggregate of the
application's own ``prometheus_client`` metrics, as its documentation asks.
See :doc:`/howto/observability`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import tornado.ioloop
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from ._subproto import ERROR_STATUS
from .backends.base import Backend
from .broadcast import BroadcastGroup, BroadcastHub
from .codes import CloseCode
from .connections import TRANSPORTS, connection_stats
from .heartbeat import HeartbeatCounters
from .histogram import HistogramStats
from .logfields import log_fields
from .longpoll import LongPollWaiter
from .presence import SETTING as PRESENCE_SETTING
from .presence import PresenceStore
from .presence_http import PollSessions
from .server import LongConnHTTPServer
from .stats import sum_stats
from .strict import protocol_error_stats
from .subscriptions import SubscriptionStats, subscription_stats
from .upload import UploadStore

__all__ = [
    "FAMILIES",
    "MULTIPROC_ENV",
    "LongConnCollector",
    "MetricsHandler",
    "read_shared_families",
]

log = logging.getLogger("tornado_longconn.metrics")

#: The environment variable ``prometheus_client`` reads for its multiprocess directory.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_FILE_RE: Final = re.compile(r"^longconn_(\d+)\.json$")

#: Every family the collector can export: name -> (type, label names, help).
#: Counters are listed without their ``_total`` suffix, as Prometheus' data model names them.
FAMILIES: Final[dict[str, tuple[str, tuple[str, ...], str]]] = {
    # connections (per application)
    "longconn_connections": ("gauge", ("transport",), "Connections open now, by transport."),
    "longconn_connections_opened": (
        "counter",
        ("transport",),
        "Connections opened, by transport.",
    ),
    # broadcast groups (all hubs)
    "longconn_groups": ("gauge", (), "Broadcast groups in this process."),
    "longconn_group_members": ("gauge", (), "Members of the broadcast groups."),
    "longconn_group_members_resuming": ("gauge", (), "Members still replaying history."),
    "longconn_group_joins": ("counter", (), "Joins to broadcast groups."),
    "longconn_messages_published": ("counter", (), "Messages published through groups."),
    "longconn_messages_received": (
        "counter",
        (),
        "Messages the backend delivered to this process's groups for fan-out.",
    ),
    "longconn_messages_delivered": (
        "counter",
        (),
        "Member deliveries accepted by a writer (written or queued).",
    ),
    "longconn_messages_dropped": (
        "counter",
        ("policy",),
        "Member deliveries discarded by an overflow policy.",
    ),
    "longconn_written_bytes": (
        "counter",
        (),
        "Frame bytes of the deliveries accepted by the members' writers (uncompressed).",
    ),
    "longconn_slow_consumers_closed": (
        "counter",
        (),
        "Members closed as slow consumers by the CLOSE overflow policy.",
    ),
    "longconn_members_closed": (
        "counter",
        (),
        "Members removed because their connection closed while delivering.",
    ),
    "longconn_resyncs": ("counter", (), "Members told to resync after a gap."),
    "longconn_member_buffer_max_bytes": (
        "gauge",
        (),
        "The largest member buffer right now, in bytes.",
    ),
    # heartbeats (per application)
    "longconn_heartbeat_connections": ("gauge", (), "Connections watched by heartbeats."),
    "longconn_heartbeat_pings": ("counter", (), "Heartbeats sent."),
    "longconn_heartbeat_dead_peers": (
        "counter",
        (),
        "Connections aborted because the peer was silent past the heartbeat timeout.",
    ),
    "longconn_heartbeat_rtt_seconds": ("histogram", (), "Heartbeat round-trip times."),
    "longconn_protocol_errors": (
        "counter",
        ("code",),
        "WebSocket connections failed for breaking RFC 6455, by close code.",
    ),
    # the subscriptions protocol (WebSocket and multi-topic HTTP handlers)
    "longconn_subscription_connections": (
        "gauge",
        (),
        "WebSocket connections speaking the subscriptions protocol now.",
    ),
    "longconn_subscriptions": ("gauge", (), "Topics held by those connections now."),
    "longconn_subscription_requests": (
        "counter",
        ("type",),
        "Subscriptions protocol requests that succeeded, by type "
        "(subscribe, unsubscribe, publish, call).",
    ),
    "longconn_subscription_errors": (
        "counter",
        ("code",),
        "Subscriptions protocol error replies, by error code.",
    ),
    "longconn_subscription_protocol_errors": (
        "counter",
        (),
        "Malformed subscriptions protocol frames.",
    ),
    "longconn_subscription_closes": (
        "counter",
        ("code",),
        "Connections closed by the subscriptions protocol, by close code.",
    ),
    "longconn_subscription_rate_limited": (
        "counter",
        ("limit",),
        "Subscriptions protocol frames refused by a rate limit, by limit "
        "(messages, bytes, publishes, user_publishes).",
    ),
    "longconn_subscription_connections_refused": (
        "counter",
        ("cap",),
        "Subscriptions protocol connections (WebSocket, SSE, long-poll) refused by a "
        "connection cap, by cap (ip, user).",
    ),
    # long-poll and SSE (all waiters)
    "longconn_longpoll_waiting": (
        "gauge",
        (),
        "Long-poll waits and SSE streams waiting for messages now.",
    ),
    "longconn_sse_streams": ("gauge", (), "SSE streams open now."),
    "longconn_longpoll_answered": ("counter", (), "Waits answered with messages."),
    "longconn_longpoll_timeouts": ("counter", (), "Waits answered empty at their timeout."),
    "longconn_longpoll_gaps": ("counter", (), "Waits answered with a gap (resync)."),
    "longconn_longpoll_rejected": ("counter", (), "Waits and streams refused at a limit."),
    "longconn_longpoll_cancelled": ("counter", (), "Waits cancelled because the client left."),
    # uploads (all stores)
    "longconn_uploads_active": ("gauge", (), "Uploads being received now."),
    "longconn_upload_received_bytes": ("counter", (), "Upload bytes durably stored."),
    "longconn_uploads_created": ("counter", (), "Uploads created."),
    "longconn_uploads_completed": ("counter", (), "Uploads completed."),
    "longconn_uploads_failed": (
        "counter",
        ("reason",),
        "Upload failures by reason (aborted, expired, checksum_mismatch, storage_error, "
        "lock_conflict, state_unavailable, quota).",
    ),
    # backends
    "longconn_backend_connected": (
        "gauge",
        ("backend",),
        "1 when the backend can deliver now (summed over processes: processes connected).",
    ),
    "longconn_backend_topics": ("gauge", ("backend",), "Topics with subscribers."),
    "longconn_backend_subscriptions": ("gauge", ("backend",), "Backend subscriptions."),
    "longconn_backend_published": (
        "counter",
        ("backend",),
        "Messages published to the backend (not counted by the in-memory backend).",
    ),
    "longconn_backend_received": (
        "counter",
        ("backend",),
        "Live messages received from the backend (not counted by the in-memory backend).",
    ),
    "longconn_backend_reconnects": (
        "counter",
        ("backend",),
        "Connections to the backend server made again.",
    ),
    "longconn_backend_gaps": (
        "counter",
        ("backend",),
        "Gaps signalled to subscribers (possible message loss; they resync).",
    ),
    "longconn_backend_subscriber_errors": (
        "counter",
        ("backend",),
        "Exceptions raised by subscriber callbacks.",
    ),
    "longconn_backend_publish_latency_seconds": (
        "histogram",
        ("backend",),
        "Time a backend publish took.",
    ),
    # the HTTP server's accept loop
    "longconn_accepted_connections": ("counter", (), "TCP connections accepted."),
    "longconn_accept_errors": (
        "counter",
        (),
        "accept() failures (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
    ),
    "longconn_accept_paused": ("gauge", (), "1 while accepting is paused for a backoff."),
    # presence (the store given as presence=, else the application's longconn_presence)
    "longconn_presence_members": (
        "gauge",
        (),
        "Presence memberships this process holds now (user registry connections included).",
    ),
    "longconn_presence_joins": ("counter", (), "Presence joins this process reported."),
    "longconn_presence_leaves": ("counter", (), "Presence leaves this process reported."),
    "longconn_presence_reaped": (
        "counter",
        (),
        "Members of dead processes this process removed (Redis).",
    ),
    "longconn_presence_reports_dropped": (
        "counter",
        (),
        "Presence reports dropped (not started, or too many waiting); rebuilt by a refresh.",
    ),
    # long-poll sessions and SSE streams as presence members and user connections
    "longconn_poll_sessions": ("gauge", (), "Long-poll sessions (clients with ?client=) now."),
    "longconn_user_disconnects": (
        "counter",
        (),
        "Long-poll sessions and SSE streams ended by disconnect_user.",
    ),
    "longconn_user_disconnected_refused": (
        "counter",
        (),
        "Polls and SSE streams refused because their client id was disconnected.",
    ),
    "longconn_user_events_dropped": (
        "counter",
        ("kind",),
        "Events for long-poll and SSE clients dropped past their buffer, by kind "
        "(presence, direct).",
    ),
    # opt-in, capped
    "longconn_topic_presence_members": (
        "gauge",
        ("topic",),
        "Presence members this process holds, per topic (opt-in, capped).",
    ),
    "longconn_topic_members": ("gauge", ("topic",), "Members of a group (opt-in, capped)."),
    "longconn_topic_published": (
        "counter",
        ("topic",),
        "Messages published to a group (opt-in, capped).",
    ),
}

#: Gauges whose value across processes is the largest, not the sum.
_MAX_GAUGES: Final = frozenset({"longconn_member_buffer_max_bytes"})

#: The close codes a strict WebSocket fails a connection with (always exported, 0 or more).
_PROTOCOL_CODES: Final = (1002, 1007, 1009)

#: The close codes the subscriptions protocol closes with (always exported, 0 or more).
_SUBSCRIPTION_CLOSE_CODES: Final = (
    int(CloseCode.POLICY_VIOLATION),
    int(CloseCode.UNAUTHORIZED),
    int(CloseCode.FORBIDDEN),
    int(CloseCode.RATE_LIMITED),
)

#: The rate limits of the subscriptions protocol (always exported, 0 or more).
_RATE_LIMITS: Final = ("bytes", "messages", "publishes", "user_publishes")
#: The connection caps (always exported, 0 or more).
_CAPS: Final = ("ip", "user")

_UPLOAD_FAILURES: Final = (
    ("aborted", "aborted"),
    ("expired", "expired"),
    ("checksum_mismatch", "checksum_mismatches"),
    ("storage_error", "storage_errors"),
    ("lock_conflict", "lock_conflicts"),
    ("state_unavailable", "state_errors"),
    ("quota", "quota_refusals"),
)


@dataclass(slots=True)
class _Family:
    """A family as plain data: what the collector yields, and what processes share."""

    name: str
    # counter / gauge: (label values, value); histogram: (label values, cumulative
    # [(le, count)...], sum)
    samples: list[Any] = field(default_factory=list)

    def add(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((tuple(labels), float(value)))

    def add_histogram(self, labels: Sequence[str], hist: HistogramStats) -> None:
        self.samples.append((tuple(labels), list(hist.cumulative()), float(hist.sum)))


def _metric(family: _Family) -> Metric:
    kind, labels, doc = FAMILIES[family.name]
    if kind == "histogram":
        hmetric = HistogramMetricFamily(family.name, doc, labels=labels)
        for values, buckets, total in family.samples:
            hmetric.add_metric(
                list(values), [(_le(bound), float(count)) for bound, count in buckets], total
            )
        return hmetric
    metric: CounterMetricFamily | GaugeMetricFamily
    if kind == "counter":
        metric = CounterMetricFamily(family.name, doc, labels=labels)
    else:
        metric = GaugeMetricFamily(family.name, doc, labels=labels)
    for values, value in family.samples:
        metric.add_metric(list(values), value)
    return metric


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class LongConnCollector(Collector):
    """A ``prometheus_client`` collector of the library's parts, read at scrape time.

    Keyword arguments (all optional; the families of the parts not given are
    not exported):

    * ``application`` -- the Tornado application whose per-application counters
      are read: connections per transport, heartbeats, protocol errors.
      :class:`MetricsHandler` fills it in with its own application when unset.
    * ``hubs`` -- :class:`~tornado_longconn.broadcast.BroadcastHub` objects,
      summed (``groups`` adds standalone groups); their backends are read too.
    * ``waiters`` -- :class:`~tornado_longconn.longpoll.LongPollWaiter` objects
      (long-poll and SSE), summed.
    * ``upload_stores`` -- :class:`~tornado_longconn.upload.UploadStore` objects, summed.
    * ``backends`` -- more backends (those of the hubs, groups and waiters are
      found by themselves; each is read once).
    * ``servers`` -- :class:`~tornado_longconn.server.LongConnHTTPServer` objects.
    * ``presence`` -- a presence store
      (:class:`~tornado_longconn.presence.PresenceStore`); None: the
      application's ``longconn_presence`` setting, if any.
    * ``topic_labels`` -- export per-topic families for at most this many
      groups (the ones with the most members); default 0: none, so label
      values stay bounded.

    Register it in a ``CollectorRegistry`` (``registry.register(collector)``)
    or hand it to :class:`MetricsHandler`. :meth:`collect` is called from the
    event loop's thread (the handler does), since it reads live objects.
    Raises ``ValueError`` for a negative ``topic_labels``.
    """

    def __init__(
        self,
        *,
        application: tornado.web.Application | None = None,
        hubs: Iterable[BroadcastHub] = (),
        groups: Iterable[BroadcastGroup] = (),
        waiters: Iterable[LongPollWaiter] = (),
        upload_stores: Iterable[UploadStore] = (),
        backends: Iterable[Backend] = (),
        servers: Iterable[LongConnHTTPServer] = (),
        topic_labels: int = 0,
        presence: PresenceStore | None = None,
    ) -> None:
        if topic_labels < 0:
            raise ValueError(f"topic_labels must be >= 0, got {topic_labels}")
        self.application = application
        self.hubs = list(hubs)
        self.groups = list(groups)
        self.waiters = list(waiters)
        self.upload_stores = list(upload_stores)
        self.backends = list(backends)
        self.servers = list(servers)
        self.topic_labels = topic_labels
        self.presence = presence
        self._share: _Share | None = None

    def describe(self) -> list[Metric]:
        """Nothing: registering the collector does not read the parts (they may not exist yet)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The families, built now from the parts' snapshots."""
        for family in self.families():
            yield _metric(family)

    # -- the families as data ---------------------------------------------------------

    def _all_backends(self) -> list[Backend]:
        seen: dict[int, Backend] = {}
        candidates: list[Any] = [
            *(hub.backend for hub in self.hubs),
            *(group.backend for group in self.groups),
            *(waiter.backend for waiter in self.waiters),
            *self.backends,
        ]
        for backend in candidates:
            seen.setdefault(id(backend), backend)
        return list(seen.values())

    def families(self) -> list[_Family]:
        """The families of this process as plain data (internal; used to share them)."""
        out: list[_Family] = []

        def fam(name: str) -> _Family:
            family = _Family(name)
            out.append(family)
            return family

        app = self.application
        if app is not None:
            conns = connection_stats(app)
            opened = fam("longconn_connections_opened")
            current = fam("longconn_connections")
            for transport in TRANSPORTS:
                current.add((transport,), conns.open(transport))
                opened.add((transport,), conns.opened(transport))
            counters = HeartbeatCounters.for_application(app)
            beat = counters.stats()
            fam("longconn_heartbeat_connections").add((), beat.connections)
            fam("longconn_heartbeat_pings").add((), beat.pings_sent)
            fam("longconn_heartbeat_dead_peers").add((), beat.timeouts)
            fam("longconn_heartbeat_rtt_seconds").add_histogram((), counters.latency_histogram())
            errors = fam("longconn_protocol_errors")
            by_code = dict.fromkeys(_PROTOCOL_CODES, 0)
            by_code.update(protocol_error_stats(app).by_code)
            for code, count in sorted(by_code.items()):
                errors.add((str(code),), count)
            self._subscriptions(fam, subscription_stats(app))
            sessions = PollSessions.for_application(app).stats()
            fam("longconn_poll_sessions").add((), sessions.sessions)
            fam("longconn_user_disconnects").add((), sessions.disconnected)
            fam("longconn_user_disconnected_refused").add((), sessions.refused)
            dropped = fam("longconn_user_events_dropped")
            dropped.add(("direct",), sessions.direct_dropped)
            dropped.add(("presence",), sessions.presence_dropped)
        store = self.presence
        if store is None and app is not None:
            store = app.settings.get(PRESENCE_SETTING)
        if store is not None:
            self._presence(fam, store)
        if self.hubs or self.groups:
            self._broadcast(fam)
        if self.waiters:
            polls = sum_stats(waiter.stats() for waiter in self.waiters)
            fam("longconn_longpoll_waiting").add((), polls.waiting)
            fam("longconn_sse_streams").add((), polls.streams)
            fam("longconn_longpoll_answered").add((), polls.answered)
            fam("longconn_longpoll_timeouts").add((), polls.timeouts)
            fam("longconn_longpoll_gaps").add((), polls.gaps)
            fam("longconn_longpoll_rejected").add((), polls.rejected)
            fam("longconn_longpoll_cancelled").add((), polls.cancelled)
        if self.upload_stores:
            ups = sum_stats(store.stats() for store in self.upload_stores)
            fam("longconn_uploads_active").add((), ups.active)
            fam("longconn_upload_received_bytes").add((), ups.bytes_stored)
            fam("longconn_uploads_created").add((), ups.created)
            fam("longconn_uploads_completed").add((), ups.completed)
            failed = fam("longconn_uploads_failed")
            for reason, name in _UPLOAD_FAILURES:
                failed.add((reason,), getattr(ups, name))
        backends = self._all_backends()
        if backends:
            self._backends(fam, backends)
        if self.servers:
            accept = sum_stats(server.stats() for server in self.servers)
            fam("longconn_accepted_connections").add((), accept.accepted)
            fam("longconn_accept_errors").add((), accept.errors)
            fam("longconn_accept_paused").add((), accept.paused)
        return out

    def _presence(self, fam: Any, store: PresenceStore) -> None:
        counts = store.stats()
        fam("longconn_presence_members").add((), counts.held)
        fam("longconn_presence_joins").add((), counts.joins)
        fam("longconn_presence_leaves").add((), counts.leaves)
        fam("longconn_presence_reaped").add((), counts.reaped)
        fam("longconn_presence_reports_dropped").add((), counts.dropped)
        if self.topic_labels:
            topics = fam("longconn_topic_presence_members")
            for topic, count in store.topic_members(self.topic_labels):
                topics.add((topic,), count)

    @staticmethod
    def _subscriptions(fam: Any, subs: SubscriptionStats) -> None:
        fam("longconn_subscription_connections").add((), subs.connections)
        fam("longconn_subscriptions").add((), subs.subscriptions)
        requests = fam("longconn_subscription_requests")
        for kind, count in (
            ("subscribe", subs.subscribed),
            ("unsubscribe", subs.unsubscribed),
            ("publish", subs.published),
            ("call", subs.calls),
        ):
            requests.add((kind,), count)
        errors = fam("longconn_subscription_errors")
        by_code = dict.fromkeys(ERROR_STATUS, 0)  # a closed set: bounded labels
        by_code.update(subs.errors)
        for code, count in sorted(by_code.items()):
            errors.add((code,), count)
        fam("longconn_subscription_protocol_errors").add((), subs.protocol_errors)
        closes = fam("longconn_subscription_closes")
        by_close = dict.fromkeys(_SUBSCRIPTION_CLOSE_CODES, 0)
        by_close.update(subs.closed)
        for close_code, count in sorted(by_close.items()):
            closes.add((str(close_code),), count)
        limited = fam("longconn_subscription_rate_limited")
        by_limit = dict.fromkeys(_RATE_LIMITS, 0)
        by_limit.update(subs.rate_limited)
        for limit, count in sorted(by_limit.items()):
            limited.add((limit,), count)
        refused = fam("longconn_subscription_connections_refused")
        by_cap = dict.fromkeys(_CAPS, 0)
        by_cap.update(subs.refused)
        for cap, count in sorted(by_cap.items()):
            refused.add((cap,), count)

    def _broadcast(self, fam: Any) -> None:
        snapshots = [hub.stats() for hub in self.hubs]
        snapshots += [group.stats() for group in self.groups]
        total = sum_stats(snapshots)
        fam("longconn_groups").add((), total.groups)
        fam("longconn_group_members").add((), total.members)
        fam("longconn_group_members_resuming").add((), total.resuming)
        fam("longconn_group_joins").add((), total.joined)
        fam("longconn_messages_published").add((), total.published)
        fam("longconn_messages_received").add((), total.received)
        fam("longconn_messages_delivered").add((), total.delivered)
        fam("longconn_written_bytes").add((), total.bytes)
        fam("longconn_slow_consumers_closed").add((), total.closed_slow)
        fam("longconn_members_closed").add((), total.closed)
        fam("longconn_resyncs").add((), total.resyncs)
        fam("longconn_member_buffer_max_bytes").add((), total.max_buffered)
        # Drops per policy: each live group under its own policy; what the hubs'
        # totals hold beyond their live groups (groups forgotten while idle) under
        # the hub's default policy.
        dropped: dict[str, int] = {}
        live: list[BroadcastGroup] = list(self.groups)
        for hub, snapshot in zip(self.hubs, snapshots, strict=False):
            rest = snapshot.dropped
            for group in hub:
                live.append(group)
                drops = group.stats().dropped if group.policy is not hub.policy else 0
                if drops:
                    rest -= drops
                    dropped[group.policy.value] = dropped.get(group.policy.value, 0) + drops
            dropped[hub.policy.value] = dropped.get(hub.policy.value, 0) + rest
        for group in self.groups:
            key = group.policy.value
            dropped[key] = dropped.get(key, 0) + group.stats().dropped
        family = fam("longconn_messages_dropped")
        for policy, count in sorted(dropped.items()):
            family.add((policy,), count)
        if self.topic_labels:
            top = sorted(live, key=lambda g: (-len(g), g.name))[: self.topic_labels]
            members = fam("longconn_topic_members")
            published = fam("longconn_topic_published")
            for group in top:
                stats = group.stats()
                members.add((group.name,), stats.members)
                published.add((group.name,), stats.published)

    def _backends(self, fam: Any, backends: list[Backend]) -> None:
        by_kind: dict[str, list[Any]] = {}
        latency: dict[str, list[HistogramStats]] = {}
        for backend in backends:
            stats = backend.stats()
            by_kind.setdefault(stats.kind, []).append(stats)
            reader = getattr(backend, "publish_latency", None)
            if reader is not None:
                latency.setdefault(stats.kind, []).append(reader())
        names = (
            ("longconn_backend_connected", "connected"),
            ("longconn_backend_topics", "topics"),
            ("longconn_backend_subscriptions", "subscribers"),
            ("longconn_backend_published", "published"),
            ("longconn_backend_received", "received"),
            ("longconn_backend_reconnects", "reconnects"),
            ("longconn_backend_gaps", "gaps"),
            ("longconn_backend_subscriber_errors", "subscriber_errors"),
        )
        totals = {kind: sum_stats(items) for kind, items in sorted(by_kind.items())}
        for name, attr in names:
            family = fam(name)
            for kind, total in totals.items():
                value = getattr(total, attr)
                if value is None:
                    if attr in ("published", "received"):
                        continue  # not counted by this backend: no sample, not a false 0
                    value = 0  # reconnects of a backend without a server: none
                family.add((kind,), value)
        family = fam("longconn_backend_publish_latency_seconds")
        for kind, hists in sorted(latency.items()):
            family.add_histogram((kind,), sum_stats(hists))

    # -- several processes ------------------------------------------------------------

    def share(self, directory: str | None = None, *, interval: float = 1.0) -> None:
        """Write this process's families to ``directory`` every ``interval`` seconds.

        ``directory`` defaults to ``$PROMETHEUS_MULTIPROC_DIR``; every process of
        the application must use the same one (and it should be emptied before
        the application starts, as ``prometheus_client`` asks). Call it in each
        process, on its event loop, after forking. :class:`MetricsHandler` then
        serves the sum of every process's file (:func:`read_shared_families`).
        The file is ``longconn_<pid>.json``, replaced atomically, written in an
        executor thread. Raises ``ValueError`` without a directory or for an
        ``interval`` that is not positive.
        """
        directory = directory or os.environ.get(MULTIPROC_ENV)
        if not directory:
            raise ValueError(f"share() needs a directory (or ${MULTIPROC_ENV})")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        if self._share is not None:
            self._share.stop()
        self._share = _Share(self, directory, interval)
        self._share.start()

    @property
    def shared_directory(self) -> str | None:
        """The directory :meth:`share` writes to, or ``None`` when not sharing."""
        return None if self._share is None else self._share.directory

    async def write_shared(self) -> None:
        """Write this process's file now (the handler does before it reads the others)."""
        if self._share is not None:
            await self._share.write()

    def unshare(self, *, remove: bool = True) -> None:
        """Stop writing; ``remove`` deletes this process's file (a clean shutdown).

        Removing the file forgets this process's counters too: keep it
        (``remove=False``) when other processes go on serving the totals.
        """
        share, self._share = self._share, None
        if share is not None:
            share.stop()
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(share.path)


class _Share:
    """The periodic writer behind :meth:`LongConnCollector.share`."""

    def __init__(self, collector: LongConnCollector, directory: str, interval: float) -> None:
        self.collector = collector
        self.directory = directory
        self.path = os.path.join(directory, f"longconn_{os.getpid()}.json")
        self._timer = tornado.ioloop.PeriodicCallback(self._tick, interval * 1000)
        self._writing: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._timer.start()
        self._tick()

    def stop(self) -> None:
        self._timer.stop()

    def _tick(self) -> None:
        if self._writing is None or self._writing.done():
            self._writing = asyncio.ensure_future(self.write())
            self._writing.add_done_callback(self._written)

    def _written(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The next tick tries again; the other processes' files are still served.
            log.warning("writing %s failed: %r", self.path, exc, extra=log_fields(topic=None))

    async def write(self) -> None:
        families = self.collector.families()  # on the loop: it reads live objects
        data = json.dumps([[f.name, f.samples] for f in families], allow_nan=True)
        await asyncio.get_running_loop().run_in_executor(None, _write_atomic, self.path, data)


def _write_atomic(path: str, data: str) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".longconn_", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_shared_families(directory: str) -> list[Metric]:
    """The families of every process's file in ``directory``, added up (blocking file reads).

    Counters and histograms are summed over all files; gauges over the files
    of processes still running (a process that exited leaves its totals, not
    its levels); ``longconn_member_buffer_max_bytes`` takes the largest. A file
    that cannot be read or parsed (being replaced, truncated) is skipped.
    """
    merged: dict[str, dict[tuple[str, ...], Any]] = {}
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        names = []
    for filename in names:
        match = _FILE_RE.match(filename)
        if match is None:
            continue
        try:
            with open(os.path.join(directory, filename)) as f:
                families = json.load(f)
        except (OSError, ValueError):
            continue
        alive = _alive(int(match.group(1)))
        for name, samples in families:
            spec = FAMILIES.get(name)
            if spec is None:
                continue
            kind = spec[0]
            if kind == "gauge" and not alive:
                continue
            into = merged.setdefault(name, {})
            for sample in samples:
                key = tuple(sample[0])
                if kind == "histogram":
                    buckets = {float(le): count for le, count in sample[1]}
                    old = into.get(key)
                    if old is not None:
                        for le, count in old[0].items():
                            buckets[le] = buckets.get(le, 0) + count
                        into[key] = (buckets, old[1] + sample[2])
                    else:
                        into[key] = (buckets, sample[2])
                elif name in _MAX_GAUGES:
                    into[key] = max(into.get(key, sample[1]), sample[1])
                else:
                    into[key] = into.get(key, 0.0) + sample[1]
    out: list[Metric] = []
    for name in FAMILIES:
        if name not in merged:
            continue
        family = _Family(name)
        for key, value in merged[name].items():
            if FAMILIES[name][0] == "histogram":
                buckets, total = value
                family.samples.append((key, sorted(buckets.items()), total))
            else:
                family.samples.append((key, value))
        out.append(_metric(family))
    return out


class _Families(Collector):
    """A collector of families already built."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


class MetricsHandler(tornado.web.RequestHandler):
    """Serves the Prometheus text format: the library's families and your own metrics.

    ``initialize`` kwargs:

    * ``collector`` -- a :class:`LongConnCollector` (its ``application`` is set
      to this handler's when unset).
    * ``registry`` -- a ``prometheus_client`` ``CollectorRegistry`` whose
      metrics are served too (default: ``prometheus_client.REGISTRY``, which
      holds your own metrics and the process metrics); ``None`` serves only the
      library's.

    With ``$PROMETHEUS_MULTIPROC_DIR`` set (``prometheus_client``'s multiprocess
    mode) the default ``registry`` is replaced by a ``MultiProcessCollector`` of
    that directory, as ``prometheus_client`` asks. When ``collector.share()`` is
    on, the handler writes its own process's file,
    then serves the sum over every process's file (:func:`read_shared_families`)
    and, instead of ``registry``, ``prometheus_client``'s
    ``MultiProcessCollector`` of the same directory (your own metrics of every
    process; the process metrics of one process would mislead). File reads run
    in an executor.

    Mount it only where Prometheus may read it (metrics say how busy the
    service is): another port, or a network policy, or a subclass with a
    ``prepare`` that checks the request.
    """

    collector: LongConnCollector | None
    registry: CollectorRegistry | None

    def initialize(
        self,
        collector: LongConnCollector | None = None,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        """Keep the ``collector`` and the ``registry`` to serve."""
        self.collector = collector
        self.registry = registry

    async def get(self) -> None:
        """Answer the scrape."""
        collector = self.collector
        body = b""
        shared = collector.shared_directory if collector is not None else None
        if collector is not None and collector.application is None:
            collector.application = self.application
        loop = asyncio.get_running_loop()
        if collector is not None and shared is not None:
            await collector.write_shared()
            families = await loop.run_in_executor(None, read_shared_families, shared)
            summed = CollectorRegistry(auto_describe=False)
            summed.register(_Families(families))
            if os.environ.get(MULTIPROC_ENV) == shared:
                from prometheus_client.multiprocess import MultiProcessCollector

                MultiProcessCollector(summed, path=shared)  # type: ignore[no-untyped-call]
            body = await loop.run_in_executor(None, generate_latest, summed)
        else:
            directory = os.environ.get(MULTIPROC_ENV)
            if self.registry is REGISTRY and directory:
                # prometheus_client's multiprocess mode: the default registry would show
                # one process; its MultiProcessCollector shows them all (reads files:
                # off the loop).
                from prometheus_client.multiprocess import MultiProcessCollector

                processes = CollectorRegistry(auto_describe=False)
                MultiProcessCollector(processes, path=directory)  # type: ignore[no-untyped-call]
                body += await loop.run_in_executor(None, generate_latest, processes)
            elif self.registry is not None:  # may hold collectors of live objects: on the loop
                body += generate_latest(self.registry)
            if collector is not None:
                own = CollectorRegistry(auto_describe=False)
                own.register(collector)
                body += generate_latest(own)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)
