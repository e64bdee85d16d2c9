"""A JSON inspection endpoint: groups, the largest writer buffers, heartbeats, backends.

:class:`InspectionHandler` answers ``GET`` with one JSON document describing
this process right now, built from the parts' ``stats()`` and public
accessors. It is off unless you mount it, and it answers 403 unless the
``authorize`` callable you give it says yes (without one it refuses every
request)::

    def only_admins(request: tornado.httputil.HTTPServerRequest) -> bool:
        return request.headers.get("Authorization") == "Bearer " + ADMIN_TOKEN

    app = tornado.web.Application([
        (r"/_longconn", InspectionHandler, {"authorize": only_admins, "hubs": [hub]}),
    ])

``authorize`` takes the request and returns a bool or an awaitable of one
(an ``async def`` works). It runs before anything is read.

The document (all keys always present; a part not given is ``null`` or empty):

* ``pid`` -- the process id (the document describes one process).
* ``groups`` -- up to ``max_groups`` groups with the most members:
  ``name``, ``members``, ``resuming``, ``published``, ``dropped``, ``policy``;
  ``groups_total`` counts them all.
* ``presence`` -- ``{"scope": "process", "members": {topic: count}, "cluster": null}``:
  member counts per group *of this process* (the same groups as above).
  :class:`InspectionHandler` fills ``cluster`` when it has a presence store
  (its ``presence`` kwarg, else the application's ``longconn_presence``
  setting): ``{"process": id, "held": n, "topics": {topic: {"connections": n,
  "users": n}}}``, the counts over every process of the same topics and of the
  topics with the most members held by this process (:func:`presence_cluster`);
  else it stays ``null`` (not a guess).
* ``writers`` -- the ``top_writers`` group members with the most bytes
  buffered: ``conn`` (:func:`~tornado_longconn.connections.connection_id`),
  ``remote``, ``user`` (when known), ``topic``, ``buffered``,
  ``peak_buffered``, ``queued``, ``dropped``. Walking the members is
  O(members): this is an operator's tool, not something to poll every second.
* ``heartbeat`` -- ``connections``, ``pings_sent``, ``timeouts``, ``count``,
  ``p50``, ``p99`` (seconds; ``null`` before the first answer).
* ``connections`` -- open and opened per transport
  (:class:`~tornado_longconn.connections.ConnectionStats`).
* ``backends`` -- per backend: ``repr``, its
  :class:`~tornado_longconn.backends.BackendStats` fields, and
  ``publish_latency`` (``count``, ``sum``) when the backend keeps it.
* ``longpoll`` and ``uploads`` -- the summed snapshots of the waiters and
  upload stores given.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Iterable
from typing import Any, Protocol

import tornado.httputil
import tornado.web

from .backends.base import Backend
from .broadcast import BroadcastGroup, BroadcastHub
from .connections import connection_stats
from .logfields import log_fields
from .longpoll import LongPollWaiter
from .presence import SETTING as PRESENCE_SETTING
from .presence import PresenceStore
from .stats import stats_dict, sum_stats
from .upload import UploadStore

__all__ = ["Authorize", "InspectionHandler", "inspect_process", "presence_cluster"]

log = logging.getLogger("tornado_longconn.inspection")


class Authorize(Protocol):
    """The auth hook: given the request, ``True`` to answer (or an awaitable of it).

    A plain function, a lambda or an ``async def`` taking the request fits.
    Anything but ``True`` (after awaiting) refuses with 403.
    """

    def __call__(self, request: tornado.httputil.HTTPServerRequest, /) -> bool | Awaitable[bool]:
        """Decide whether ``request`` may read the inspection document."""


def _backends(
    hubs: list[BroadcastHub], waiters: list[LongPollWaiter], extra: list[Backend]
) -> list[Backend]:
    seen: dict[int, Backend] = {}
    for backend in [*(h.backend for h in hubs), *(w.backend for w in waiters), *extra]:
        seen.setdefault(id(backend), backend)
    return list(seen.values())


def inspect_process(
    application: tornado.web.Application | None = None,
    *,
    hubs: Iterable[BroadcastHub] = (),
    waiters: Iterable[LongPollWaiter] = (),
    upload_stores: Iterable[UploadStore] = (),
    backends: Iterable[Backend] = (),
    top_writers: int = 10,
    max_groups: int = 100,
) -> dict[str, Any]:
    """The inspection document (see the module docs) of this process, built now.

    ``application`` gives the heartbeat and connection counters (``None``:
    those keys are ``null``). JSON-ready: plain dicts, lists, numbers,
    strings. Raises ``ValueError`` for a negative ``top_writers`` or ``max_groups``.
    """
    if top_writers < 0 or max_groups < 0:
        raise ValueError("top_writers and max_groups must be >= 0")
    hub_list, waiter_list = list(hubs), list(waiters)
    store_list = list(upload_stores)
    groups: list[BroadcastGroup] = [group for hub in hub_list for group in hub]
    biggest = sorted(groups, key=lambda g: (-len(g), g.name))[:max_groups]
    group_docs = []
    for group in biggest:
        stats = group.stats()
        group_docs.append(
            {
                "name": group.name,
                "members": stats.members,
                "resuming": stats.resuming,
                "published": stats.published,
                "dropped": stats.dropped,
                "policy": group.policy.value,
            }
        )
    writers: list[dict[str, Any]] = []
    for group in groups:
        for handler in group:
            membership = group.membership(handler)
            writer = None if membership is None else membership.writer
            if writer is None:
                continue
            ws = writer.stats()
            fields = log_fields(handler, topic=group.name)
            writers.append(
                {
                    "conn": fields["longconn_conn"],
                    "remote": fields["longconn_remote"],
                    "user": fields["longconn_user"],
                    "topic": group.name,
                    "buffered": ws.buffered,
                    "peak_buffered": ws.peak_buffered,
                    "queued": ws.queued,
                    "dropped": ws.dropped,
                }
            )
    writers.sort(key=lambda w: (-w["buffered"], -w["peak_buffered"], w["conn"]))
    backend_docs = []
    for backend in _backends(hub_list, waiter_list, list(backends)):
        doc: dict[str, Any] = {"repr": repr(backend), **stats_dict(backend.stats())}
        reader = getattr(backend, "publish_latency", None)
        if reader is not None:
            hist = reader()
            doc["publish_latency"] = {"count": hist.count, "sum": hist.sum}
        backend_docs.append(doc)
    heartbeat = None
    connections = None
    if application is not None:
        from .heartbeat import heartbeat_stats

        heartbeat = stats_dict(heartbeat_stats(application))
        connections = stats_dict(connection_stats(application))
    return {
        "pid": os.getpid(),
        "groups": group_docs,
        "groups_total": len(groups),
        "presence": {
            "scope": "process",
            "members": {doc["name"]: doc["members"] for doc in group_docs},
            "cluster": None,
        },
        "writers": writers[:top_writers],
        "heartbeat": heartbeat,
        "connections": connections,
        "backends": backend_docs,
        "longpoll": stats_dict(sum_stats(w.stats() for w in waiter_list)) if waiter_list else None,
        "uploads": stats_dict(sum_stats(s.stats() for s in store_list)) if store_list else None,
    }


async def presence_cluster(
    store: PresenceStore, topics: Iterable[str] = (), *, max_topics: int = 100
) -> dict[str, Any]:
    """The ``presence.cluster`` part of the inspection document, read from ``store``.

    The counts over every process (one O(1) read per topic) of ``topics`` and
    of the topics with the most members held by this process, at most
    ``max_topics`` in all. Raises what the store raises (Redis unavailable).
    """
    chosen = dict.fromkeys(list(topics)[:max_topics])
    for topic, _ in store.topic_members(max_topics):
        if len(chosen) >= max_topics:
            break
        chosen.setdefault(topic)
    counts = {}
    for topic in chosen:
        stats = await store.presence_stats(topic)
        counts[topic] = {"connections": stats.connections, "users": stats.users}
    return {"process": store.process, "held": store.stats().held, "topics": counts}


class InspectionHandler(tornado.web.RequestHandler):
    """``GET`` answers the inspection document (:func:`inspect_process`) as JSON; 403 when refused.

    ``initialize`` kwargs: ``authorize`` (required to answer at all: without
    it, or when it returns false, the answer is 403 ``{"error": "forbidden"}``),
    then ``hubs``, ``waiters``, ``upload_stores``, ``backends``,
    ``top_writers`` (default 10) and ``max_groups`` (default 100) as for
    :func:`inspect_process`, and ``presence`` (a presence store; None: the
    application's ``longconn_presence`` setting) for ``presence.cluster``. An
    exception in ``authorize`` is a 500, never an answer; a presence store that
    cannot answer leaves ``cluster`` ``null`` (logged).
    """

    def initialize(
        self,
        authorize: Authorize | None = None,
        hubs: Iterable[BroadcastHub] = (),
        waiters: Iterable[LongPollWaiter] = (),
        upload_stores: Iterable[UploadStore] = (),
        backends: Iterable[Backend] = (),
        top_writers: int = 10,
        max_groups: int = 100,
        presence: PresenceStore | None = None,
    ) -> None:
        """Keep the hook and the parts to describe."""
        self.presence = presence
        self.authorize = authorize
        self.hubs = list(hubs)
        self.waiters = list(waiters)
        self.upload_stores = list(upload_stores)
        self.backends = list(backends)
        self.top_writers = top_writers
        self.max_groups = max_groups

    async def get(self) -> None:
        """Ask ``authorize``; answer the document, or 403."""
        self.set_header("Cache-Control", "no-store")
        allowed: Any = False
        if self.authorize is not None:
            allowed = self.authorize(self.request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
        if allowed is not True:
            self.set_status(403)
            self.finish({"error": "forbidden"})
            return
        doc = inspect_process(
            self.application,
            hubs=self.hubs,
            waiters=self.waiters,
            upload_stores=self.upload_stores,
            backends=self.backends,
            top_writers=self.top_writers,
            max_groups=self.max_groups,
        )
        store = self.presence
        if store is None:
            store = self.application.settings.get(PRESENCE_SETTING)
        if store is not None:
            try:
                doc["presence"]["cluster"] = await presence_cluster(
                    store, doc["presence"]["members"], max_topics=self.max_groups
                )
            except Exception:
                log.warning("inspection: presence unavailable", exc_info=True)
        self.finish(doc)
