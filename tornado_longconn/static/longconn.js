/*!
 * longconn.js: the browser client of tornado-longconn (Apache-2.0).
 *
 * Dependency-free, no build step: load it with <script src="/longconn/longconn.js">
 * and use the global `LongConn`, or require() it from a bundler.
 *
 *   const conn = LongConn.connect({
 *     url: "/ws/chat",            // WebSocket endpoint
 *     sseUrl: "/sse/chat",        // Server-Sent Events fallback
 *     pollUrl: "/poll/chat",      // long-poll fallback
 *     sendUrl: "/send/chat",      // POST endpoint used by send() when not on WebSocket
 *     onMessage(data, cursor) {},
 *     onResync(info) {},          // history was lost: reload your state
 *     onStatus(status) {},        // connecting / open / waiting / closed
 *   });
 *   conn.send({text: "hi"});
 *
 * Many topics on one connection (the subscriptions protocol v1, SubscriptionMixin and
 * the multi-topic SSE / long-poll handlers on the server), each resumed from its own
 * cursor:
 *
 *   const session = LongConn.session({url: "/ws", sseUrl: "/sse", pollUrl: "/poll",
 *                                     publishUrl: "/publish"});
 *   const room = session.subscribe("room:1", {onMessage(data, cursor, meta) {},
 *                                             onResync(info) {}});
 *   await session.publish("room:1", {text: "hi"});     // {topic, cursor}
 *   const answer = await session.call("rooms.list", {}); // rejects with LongConnError
 *   await room.unsubscribe();
 *
 * - Transports: WebSocket -> SSE -> long-poll, chosen automatically (a transport
 *   that fails `fallbackAfter` times without ever opening is skipped), or forced
 *   with `transport: "sse"` etc.
 * - Reconnect with full-jitter exponential backoff: wait random(0, min(max, base * 2^n)).
 * - Resume: every message carries a cursor ("<epoch>-<offset>"); reconnects ask for
 *   what came after the last one. A gap (history no longer reaches back, or the
 *   server lost its history) is reported through onResync, never skipped silently.
 * - Application-level heartbeats are answered automatically.
 * - LongConn.upload(file, options): tus 1.0 or the WebSocket chunk protocol,
 *   with progress and resume.
 */
(function (root, factory) {
  "use strict";
  if (typeof module === "object" && module.exports) {
    module.exports = factory();
  } else {
    root.LongConn = factory();
  }
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  var VERSION = "0.1.0";

  /** Close codes sent by tornado-longconn (tornado_longconn.codes.CloseCode). */
  var CloseCode = Object.freeze({
    NORMAL: 1000,
    GOING_AWAY: 1001,
    POLICY_VIOLATION: 1008,
    MESSAGE_TOO_BIG: 1009,
    INTERNAL_ERROR: 1011,
    SLOW_CONSUMER: 4000,
    RESYNC_REQUIRED: 4001,
    HEARTBEAT_TIMEOUT: 4002,
    UPLOAD_BAD_REQUEST: 4400,
    UPLOAD_NOT_FOUND: 4404,
    UPLOAD_CONFLICT: 4409,
    UPLOAD_TOO_LARGE: 4413,
    UPLOAD_CHECKSUM_MISMATCH: 4460,
    UPLOAD_STORAGE_FULL: 4507,
  });

  // Close codes after which reconnecting cannot help (the server refused us).
  var FATAL_CLOSE_CODES = [CloseCode.POLICY_VIOLATION, 4401, 4403, 4429];

  var TRANSPORTS = ["websocket", "sse", "longpoll"];

  // ------------------------------------------------------------------ helpers

  /**
   * Full-jitter backoff: a random delay in [0, min(max, base * 2^attempt)) milliseconds.
   * `random` defaults to Math.random (tests pass their own).
   */
  function backoffDelay(attempt, base, max, random) {
    var ceiling = Math.min(max, base * Math.pow(2, Math.min(attempt, 30)));
    return Math.floor((random || Math.random)() * ceiling);
  }

  /** Split a "<epoch>-<offset>" cursor; null when it is not in that form. */
  function parseCursor(cursor) {
    if (typeof cursor !== "string") return null;
    var m = /^([0-9A-Za-z]{1,32})-(0|[1-9][0-9]{0,18})$/.exec(cursor);
    return m ? { epoch: m[1], offset: Number(m[2]) } : null;
  }

  /** True unless `cursor` is at or before `last` in the same epoch (a duplicate). */
  function isAfter(cursor, last) {
    var a = parseCursor(cursor);
    var b = parseCursor(last);
    if (!a || !b || a.epoch !== b.epoch) return true;
    return a.offset > b.offset;
  }

  function baseHref() {
    return typeof location !== "undefined" ? location.href : "http://localhost/";
  }

  /** Resolve `path` against the page and add query parameters; `ws` turns http(s) into ws(s). */
  function buildUrl(path, params, ws) {
    var u = new URL(path, baseHref());
    if (ws) {
      if (u.protocol === "http:") u.protocol = "ws:";
      else if (u.protocol === "https:") u.protocol = "wss:";
    }
    Object.keys(params || {}).forEach(function (k) {
      var v = params[k];
      if (v !== null && v !== undefined && v !== "") u.searchParams.set(k, String(v));
    });
    return u.toString();
  }

  function hasTransport(name) {
    if (name === "websocket") return typeof WebSocket === "function";
    if (name === "sse") return typeof EventSource === "function";
    if (name === "longpoll") return typeof fetch === "function";
    return false;
  }

  function tryJson(text) {
    if (typeof text !== "string") return text;
    try {
      return JSON.parse(text);
    } catch (e) {
      return text;
    }
  }

  /** 16 random hex digits: a session's presence client id over SSE and long-poll. */
  function randomClientId() {
    var out = "";
    var bytes = null;
    if (typeof crypto !== "undefined" && crypto && typeof crypto.getRandomValues === "function") {
      bytes = crypto.getRandomValues(new Uint8Array(8));
    }
    for (var i = 0; i < 8; i++) {
      var b = bytes ? bytes[i] : Math.floor(Math.random() * 256);
      out += (b < 16 ? "0" : "") + b.toString(16);
    }
    return out;
  }

  function assign(target) {
    for (var i = 1; i < arguments.length; i++) {
      var src = arguments[i] || {};
      Object.keys(src).forEach(function (k) {
        if (src[k] !== undefined) target[k] = src[k];
      });
    }
    return target;
  }

  // -------------------------------------------------------------- connection

  var DEFAULTS = {
    url: null, // WebSocket endpoint
    sseUrl: null, // SSE endpoint
    pollUrl: null, // long-poll endpoint
    sendUrl: null, // POST endpoint for send() on SSE / long-poll
    transport: "auto", // "auto" | "websocket" | "sse" | "longpoll"
    transports: TRANSPORTS, // order tried by "auto"
    fallbackAfter: 2, // failures without ever opening before "auto" tries the next
    cursor: null, // resume after this cursor
    cursorParam: "cursor", // query parameter carrying the cursor
    params: null, // extra query parameters, e.g. {room: "lobby"}
    backoff: { base: 500, max: 10000 }, // milliseconds
    stableAfter: 3000, // ms open before the backoff resets
    openTimeout: 10000, // ms a transport may take to open
    pollTimeout: 25, // seconds the server may hold a long-poll
    idleTimeout: null, // WebSocket: ms without any inbound frame before reconnecting (null: off)
    withCredentials: false, // cookies on cross-origin SSE / long-poll / send
    heartbeat: null, // see DEFAULT_HEARTBEAT
    decode: null, // function(raw, transport) -> {data, cursor} | {control: ...}
    onMessage: null, // function(data, cursor, meta)
    onResync: null, // function({cursor, reason, transport})
    onStatus: null, // function({state, transport, attempt, delay, code, reason})
    onError: null, // function(error)
    random: null, // function() -> [0, 1): for tests
  };

  /**
   * Application-level heartbeat (HeartbeatMixin with mode "application"): the server
   * sends a ping message, the client answers it. `match(data)` returns the reply to
   * send (string) or null when `data` is not a ping.
   */
  var DEFAULT_HEARTBEAT = {
    // HeartbeatMixin's defaults: heartbeat_message '{"type":"ping"}', heartbeat_reply
    // '{"type":"pong"}' (compared as exact text).
    match: function (data) {
      if (data && typeof data === "object" && data.type === "ping") {
        return '{"type":"pong"}';
      }
      return null;
    },
  };

  /**
   * How a transport's raw payload becomes a message. The default understands the
   * library's WebSocket envelope (broadcast.cursor_envelope: {"cursor": ..., "data": ...}),
   * its resync notice (broadcast.resync_notice: {"type": "resync", "cursor": ..., "reason":
   * ...}), plain JSON and plain text. SSE and long-poll carry cursors outside the payload.
   */
  function defaultDecode(raw, transport) {
    var value = tryJson(raw);
    if (value && typeof value === "object" && !Array.isArray(value)) {
      var keys = Object.keys(value);
      if (transport === "websocket" && keys.length === 2 && "cursor" in value && "data" in value) {
        // cursor_envelope(): {"cursor": "<epoch>-<offset>" | null, "data": <message>}
        return { data: value.data, cursor: value.cursor, enveloped: true };
      }
      if (value.type === "resync" && "cursor" in value && "reason" in value) {
        // resync_notice() (GapPolicy.NOTICE): reload state, continue after `cursor`.
        return { control: "resync", cursor: value.cursor || null, reason: value.reason || null };
      }
    }
    return { data: value, cursor: null };
  }

  function Connection(options) {
    this.options = assign({}, DEFAULTS, options);
    this.options.backoff = assign({}, DEFAULTS.backoff, options && options.backoff);
    if (this.options.heartbeat === null || this.options.heartbeat === undefined) {
      this.options.heartbeat = DEFAULT_HEARTBEAT;
    }
    this.cursor = this.options.cursor || null;
    this.transport = null; // name of the transport in use
    this.state = "idle"; // idle | connecting | open | waiting | closed
    this.attempt = 0; // consecutive failures (backoff exponent)
    this.stats = { opened: 0, messages: 0, duplicates: 0, resyncs: 0, fallbacks: 0 };
    this._candidates = this._pickCandidates();
    this._index = 0;
    this._failures = 0; // failures of the current candidate without opening
    this._pinned = false; // a transport opened once: keep using it
    this._impl = null;
    this._timer = null;
    this._idleTimer = null;
    this._openedAt = 0;
    this._immediate = false; // the next reconnect skips the backoff (reconnect())
    this._gen = 0;
    this._listeners = {};
    if (this._candidates.length === 0) {
      throw new Error("LongConn: no usable transport (check url / sseUrl / pollUrl)");
    }
  }

  Connection.prototype._pickCandidates = function () {
    var o = this.options;
    var urls = { websocket: o.url, sse: o.sseUrl, longpoll: o.pollUrl };
    var wanted = o.transport && o.transport !== "auto" ? [o.transport] : o.transports;
    return wanted.filter(function (name) {
      return TRANSPORTS.indexOf(name) >= 0 && urls[name] && hasTransport(name);
    });
  };

  /** Listen to "message", "resync", "status" or "error" (in addition to the on* options). */
  Connection.prototype.on = function (event, fn) {
    (this._listeners[event] = this._listeners[event] || []).push(fn);
    return this;
  };

  Connection.prototype._emit = function (event, args) {
    var cb = this.options["on" + event.charAt(0).toUpperCase() + event.slice(1)];
    var fns = (this._listeners[event] || []).slice();
    if (typeof cb === "function") fns.unshift(cb);
    for (var i = 0; i < fns.length; i++) {
      try {
        fns[i].apply(this, args);
      } catch (e) {
        if (typeof console !== "undefined") console.error("LongConn: listener failed", e);
      }
    }
  };

  Connection.prototype._status = function (state, extra) {
    this.state = state;
    this._emit("status", [
      assign({ state: state, transport: this.transport, attempt: this.attempt }, extra),
    ]);
  };

  /** Start connecting (connect() calls it for you). */
  Connection.prototype.start = function () {
    if (this.state === "closed") throw new Error("LongConn: connection was closed");
    if (this.state === "idle") this._open();
    return this;
  };

  Connection.prototype._open = function () {
    var self = this;
    clearTimeout(this._timer);
    this._timer = null;
    var gen = ++this._gen;
    var name = this._candidates[this._index];
    this.transport = name;
    this._status("connecting");
    var opened = false;
    var idleOnly = false; // opened without carrying anything yet: not proven to work
    var openTimer = setTimeout(function () {
      if (gen === self._gen && !opened) {
        self._closeImpl();
        hooks.closed({ code: null, reason: "open timeout" });
      }
    }, this.options.openTimeout);
    this._openTimer = openTimer;
    var hooks = {
      // idle: open with nothing to carry yet (a Session without topics on SSE or
      // long-poll); the transport is pinned once pin() shows it really works.
      opened: function (idle) {
        if (gen !== self._gen || opened) return;
        opened = true;
        idleOnly = idle === true;
        clearTimeout(openTimer);
        self._onOpen(idleOnly);
      },
      pin: function () {
        if (gen !== self._gen) return;
        idleOnly = false;
        self._failures = 0;
        self._pinned = true;
      },
      message: function (raw, cursor) {
        if (gen === self._gen) self._onRaw(raw, cursor);
      },
      resync: function (cursor, reason) {
        if (gen === self._gen) self._resync(cursor, reason);
      },
      live: function () {
        return gen === self._gen;
      },
      closed: function (info) {
        if (gen !== self._gen) return;
        clearTimeout(openTimer);
        self._gen++;
        self._impl = null;
        // A transport that only opened idle and then failed counts as never opened.
        self._onClosed(opened && !idleOnly, info || {});
      },
    };
    try {
      this._impl = this._openers[name](this, hooks);
    } catch (e) {
      this._emit("error", [e]);
      hooks.closed({ code: null, reason: String(e && e.message) });
    }
  };

  Connection.prototype._onOpen = function (idle) {
    this._openedAt = Date.now();
    if (!idle) {
      this._failures = 0;
      this._pinned = true;
    }
    this.stats.opened++;
    this._touch();
    this._status("open");
  };

  Connection.prototype._onClosed = function (opened, info) {
    clearTimeout(this._idleTimer);
    if (this.state === "closed") return;
    var code = info.code;
    if (FATAL_CLOSE_CODES.indexOf(code) >= 0 && !this._retryableClose(info)) {
      this._status("closed", { code: code, reason: info.reason, fatal: true });
      return;
    }
    var immediate = this._immediate;
    this._immediate = false;
    if (code === CloseCode.RESYNC_REQUIRED) {
      // The server could not resume from our cursor: start fresh, tell the app.
      this._resync(null, info.reason || "resync required");
      immediate = true;
    }
    if (opened && Date.now() - this._openedAt >= this.options.stableAfter) {
      this.attempt = 0;
    } else if (!immediate) {
      this.attempt++;
    }
    if (!opened && !this._pinned) {
      this._failures++;
      if (this._failures >= this.options.fallbackAfter && this._candidates.length > 1) {
        this._failures = 0;
        this._index = (this._index + 1) % this._candidates.length;
        this.stats.fallbacks++;
        immediate = true;
      }
    }
    var delay = immediate
      ? 0
      : backoffDelay(this.attempt, this.options.backoff.base, this.options.backoff.max, this.options.random);
    var self = this;
    this._status("waiting", {
      delay: delay,
      code: code,
      reason: info.reason,
      next: this._candidates[this._index],
    });
    this._timer = setTimeout(function () {
      self._timer = null;
      if (self.state !== "closed") self._open();
    }, delay);
  };

  /** A close with a fatal code that is still worth a reconnect (Session: an expired identity). */
  Connection.prototype._retryableClose = function () {
    return false;
  };

  // Any inbound data proves the server is alive; a silent server is dropped after idleTimeout.
  Connection.prototype._touch = function () {
    var self = this;
    var idle = this.options.idleTimeout;
    // Only WebSocket shows every inbound frame (heartbeats included) to the page; SSE
    // keep-alive comments and a waiting long-poll are invisible, so they are not judged.
    if (!idle || this.transport !== "websocket") return;
    clearTimeout(this._idleTimer);
    var gen = this._gen;
    this._idleTimer = setTimeout(function () {
      if (gen !== self._gen || !self._impl) return;
      var impl = self._impl;
      impl.abort("idle timeout");
    }, idle);
  };

  Connection.prototype._onRaw = function (raw, cursor) {
    this._touch();
    var decode = this.options.decode || defaultDecode;
    var msg = decode(raw, this.transport);
    if (!msg) return;
    if (msg.control === "resync") {
      this._resync(msg.cursor, msg.reason);
      return;
    }
    if (msg.control === "ignore") return;
    var hb = this.options.heartbeat;
    if (hb && typeof hb.match === "function" && this.transport === "websocket" && !msg.enveloped) {
      var reply = hb.match(msg.data);
      if (reply !== null && reply !== undefined) {
        if (this._impl && this._impl.send) this._impl.send(reply);
        return;
      }
    }
    var c = msg.cursor || cursor || null;
    if (c && this.cursor && !isAfter(c, this.cursor)) {
      this.stats.duplicates++;
      return; // already delivered (seen before a reconnect)
    }
    if (c) this.cursor = c;
    this.stats.messages++;
    this._emit("message", [msg.data, c, { transport: this.transport }]);
  };

  Connection.prototype._resync = function (cursor, reason) {
    this.cursor = cursor || null;
    this.stats.resyncs++;
    this._emit("resync", [{ cursor: this.cursor, reason: reason || null, transport: this.transport }]);
  };

  Connection.prototype._closeImpl = function () {
    var impl = this._impl;
    this._impl = null;
    if (impl) {
      try {
        impl.close();
      } catch (e) {
        /* already closed */
      }
    }
  };

  /**
   * Send `data` (a string, or anything JSON-serialisable). On WebSocket it is a
   * WebSocket message; otherwise it is POSTed as JSON to `sendUrl`. Returns a Promise.
   */
  Connection.prototype.send = function (data) {
    var text = typeof data === "string" ? data : JSON.stringify(data);
    if (this.transport === "websocket" && this.state === "open" && this._impl) {
      try {
        this._impl.send(text);
        return Promise.resolve();
      } catch (e) {
        return Promise.reject(e);
      }
    }
    if (!this.options.sendUrl) {
      return Promise.reject(new Error("LongConn: not connected and no sendUrl configured"));
    }
    return fetch(buildUrl(this.options.sendUrl, this.options.params), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: text,
      credentials: this.options.withCredentials ? "include" : "same-origin",
    }).then(function (res) {
      if (!res.ok) throw new Error("LongConn: send failed with HTTP " + res.status);
      return res;
    });
  };

  /** Close for good (no reconnect). */
  Connection.prototype.close = function () {
    clearTimeout(this._timer);
    clearTimeout(this._idleTimer);
    clearTimeout(this._openTimer);
    this._gen++;
    this._closeImpl();
    if (this.state !== "closed") this._status("closed", { code: CloseCode.NORMAL });
  };

  /** Drop the current transport and reconnect now, resuming from the cursor. */
  Connection.prototype.reconnect = function () {
    if (this.state === "closed") return;
    if (this._impl) {
      this._immediate = true;
      this._impl.abort("reconnect");
    } else {
      this._open();
    }
  };

  /** Switch to another transport ("auto", "websocket", "sse", "longpoll") and reconnect. */
  Connection.prototype.setTransport = function (name) {
    this.options.transport = name;
    this._candidates = this._pickCandidates();
    if (this._candidates.length === 0) throw new Error("LongConn: transport " + name + " unavailable");
    this._index = 0;
    this._failures = 0;
    this._pinned = false;
    this.attempt = 0;
    clearTimeout(this._timer);
    this._gen++;
    this._closeImpl();
    if (this.state !== "closed") this._open();
  };

  Connection.prototype._query = function (extra) {
    var q = assign({}, this.options.params, extra);
    q[this.options.cursorParam] = this.cursor;
    return q;
  };

  /** The WebSocket URL of the next attempt (with the cursor). */
  Connection.prototype._wsUrl = function () {
    return buildUrl(this.options.url, this._query(), true);
  };

  // -------------------------------------------------------------- transports

  var OPENERS = {
    websocket: function (conn, hooks) {
      var ws = new WebSocket(conn._wsUrl());
      ws.binaryType = "arraybuffer";
      var done = false;
      function finish(info) {
        if (done) return;
        done = true;
        hooks.closed(info);
      }
      ws.onopen = hooks.opened;
      ws.onmessage = function (ev) {
        hooks.message(ev.data, null);
      };
      ws.onclose = function (ev) {
        finish({ code: ev.code, reason: ev.reason, wasClean: ev.wasClean });
      };
      ws.onerror = function () {
        /* onclose follows with the code */
      };
      return {
        ws: ws,
        send: function (text) {
          ws.send(text);
        },
        close: function () {
          done = true;
          ws.close(CloseCode.NORMAL);
        },
        abort: function (reason) {
          ws.close(CloseCode.NORMAL, String(reason).slice(0, 100));
          finish({ code: null, reason: reason });
        },
      };
    },

    sse: function (conn, hooks) {
      var es = new EventSource(buildUrl(conn.options.sseUrl, conn._query()), {
        withCredentials: !!conn.options.withCredentials,
      });
      var done = false;
      function finish(info) {
        if (done) return;
        done = true;
        es.close();
        hooks.closed(info);
      }
      es.onopen = hooks.opened;
      es.onmessage = function (ev) {
        hooks.message(ev.data, ev.lastEventId || null);
      };
      es.addEventListener("resync", function (ev) {
        var body = tryJson(ev.data);
        var cursor = (body && body.cursor) || ev.lastEventId || null;
        hooks.resync(cursor, (body && body.reason) || "resync");
      });
      // EventSource reconnects by itself; we close it and reconnect with our own
      // backoff and cursor so every transport behaves the same.
      es.onerror = function () {
        finish({ code: null, reason: "event stream error" });
      };
      return {
        close: function () {
          done = true;
          es.close();
        },
        abort: function (reason) {
          finish({ code: null, reason: reason });
        },
      };
    },

    longpoll: function (conn, hooks) {
      var controller = typeof AbortController === "function" ? new AbortController() : null;
      var stopped = false;
      var opened = false;
      var timer = null;
      function finish(info) {
        if (stopped) return;
        stopped = true;
        clearTimeout(timer);
        if (controller) controller.abort();
        hooks.closed(info);
      }
      function poll() {
        if (stopped) return;
        // The first request answers at once (timeout=0): it proves the endpoint works
        // (the transport is "open") and delivers what the cursor missed.
        var timeout = opened ? conn.options.pollTimeout : 0;
        var url = buildUrl(conn.options.pollUrl, conn._query({ timeout: timeout }));
        // A response lost on the way must not hang us: give up a bit after the server would.
        clearTimeout(timer);
        timer = setTimeout(function () {
          finish({ code: null, reason: "poll timeout" });
        }, timeout * 1000 + 10000);
        fetch(url, {
          headers: { Accept: "application/json" },
          credentials: conn.options.withCredentials ? "include" : "same-origin",
          cache: "no-store",
          signal: controller ? controller.signal : undefined,
        })
          .then(function (res) {
            if (res.status === 400 && conn.cursor) {
              // A cursor the server cannot read (e.g. from another deployment).
              hooks.resync(null, "cursor rejected");
              return null;
            }
            if (!res.ok) throw new Error("HTTP " + res.status);
            return res.json();
          })
          .then(function (body) {
            if (stopped) return;
            if (!opened) {
              opened = true;
              hooks.opened();
            }
            if (body) {
              if (body.gap) {
                hooks.resync(body.cursor || null, body.reason || "gap");
              } else {
                var msgs = body.messages || [];
                for (var i = 0; i < msgs.length && !stopped; i++) {
                  var m = msgs[i];
                  if (m && typeof m === "object" && "cursor" in m && "data" in m) {
                    hooks.message(m.data, m.cursor);
                  } else {
                    hooks.message(m, null);
                  }
                }
                if (body.cursor && !stopped) conn.cursor = body.cursor;
              }
            }
            poll();
          })
          .catch(function (err) {
            finish({ code: null, reason: String((err && err.message) || err) });
          });
      }
      poll();
      return {
        close: function () {
          stopped = true;
          clearTimeout(timer);
          if (controller) controller.abort();
        },
        abort: function (reason) {
          finish({ code: null, reason: reason });
        },
      };
    },
  };

  Connection.prototype._openers = OPENERS;

  /** Create a Connection and start it. See DEFAULTS for the options. */
  function connect(options) {
    return new Connection(options).start();
  }

  // ------------------------------------------------------- subscriptions (v1)
  //
  // The subscriptions protocol v1 (docs/reference/subscriptions-protocol.md): many
  // topics on one connection, each resumed from its own cursor. A Session is a
  // Connection (same transports, fallback, backoff and status events) that speaks it.

  /** The version of the subscriptions protocol a Session speaks. */
  var PROTOCOL_VERSION = 1;

  var TOPIC_RE = /^[A-Za-z0-9_\-.:@/+]{1,128}$/;

  /** The protocol's error codes and their statuses (the server's `error` frames). */
  var ErrorCode = Object.freeze({
    bad_request: 400,
    unauthorized: 401,
    forbidden: 403,
    not_found: 404,
    conflict: 409,
    too_large: 413,
    limit: 429,
    internal: 500,
    unavailable: 503,
    timeout: 504,
  });

  // Close codes that end a Session for good, and the error code they are reported as.
  var FATAL_CLOSE_ERRORS = {
    1008: "bad_request",
    4401: "unauthorized",
    4403: "forbidden",
    4429: "limit",
  };

  /** True when `topic` is a valid topic name (1-128 of A-Z a-z 0-9 _ - . : @ / +). */
  function validTopic(topic) {
    return typeof topic === "string" && TOPIC_RE.test(topic);
  }

  /**
   * The error of a request or subscription: `code` is one of the protocol's error codes
   * (ErrorCode: "forbidden", "timeout", ...) or a client code ("disconnected": the
   * connection was lost before the answer came; "closed": the session was closed;
   * "unsupported": the transport in use cannot do it), `status` the protocol's status
   * (null for client codes), `topic` and `id` when known.
   */
  function LongConnError(message, code, status, extra) {
    var e = new Error(message);
    if (Object.setPrototypeOf) Object.setPrototypeOf(e, LongConnError.prototype);
    e.code = code || "internal";
    e.status = status === undefined ? null : status;
    e.topic = (extra && extra.topic) || null;
    e.id = extra && extra.id !== undefined ? extra.id : null;
    e.reason = (extra && extra.reason) || message;
    return e;
  }
  LongConnError.prototype = Object.create(Error.prototype, {
    constructor: { value: LongConnError, writable: true, configurable: true },
    name: { value: "LongConnError", writable: true, configurable: true },
  });

  /** The LongConnError of a server `error` frame or HTTP error body. */
  function errorFromFrame(frame, fallbackStatus) {
    var code = typeof frame.code === "string" ? frame.code : "internal";
    var status = typeof frame.status === "number" ? frame.status : ErrorCode[code] || fallbackStatus || null;
    var reason = typeof frame.reason === "string" && frame.reason ? frame.reason : code;
    return new LongConnError(reason, code, status, { topic: frame.topic, id: frame.id, reason: reason });
  }

  /**
   * A cursor map for SSE and long-poll: `[[topic, cursor or null], ...]` (or an object)
   * becomes "topic=cursor,topic2=" (an empty cursor means "from now").
   */
  function encodeCursorMap(entries) {
    if (!Array.isArray(entries)) {
      entries = Object.keys(entries).map(function (t) {
        return [t, entries[t]];
      });
    }
    return entries
      .map(function (e) {
        return e[0] + "=" + (e[1] || "");
      })
      .join(",");
  }

  /**
   * Parse a cursor map ("room:1=a1b2-17,dm:ann=") into {topic: cursor or null}; null
   * when it is malformed (a bad topic or cursor, a missing "=", a topic twice).
   */
  function parseCursorMap(text) {
    if (typeof text !== "string") return null;
    var out = Object.create(null);
    if (text === "") return out;
    var parts = text.split(",");
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (eq < 0) return null;
      var topic = parts[i].slice(0, eq);
      var cursor = parts[i].slice(eq + 1);
      if (!validTopic(topic) || topic in out) return null;
      if (cursor !== "" && !parseCursor(cursor)) return null;
      out[topic] = cursor || null;
    }
    return out;
  }

  /**
   * The cursor to keep after the server reported `candidate` as a topic's position:
   * `current` when it is set and `candidate` is not later in the same epoch (a cursor
   * never moves back, and another epoch comes with a resync notice), else `candidate`.
   */
  function advanceCursor(current, candidate) {
    if (!candidate || !parseCursor(candidate)) return current || null;
    if (!current) return candidate;
    var a = parseCursor(candidate);
    var b = parseCursor(current);
    return b && a.epoch === b.epoch && a.offset > b.offset ? candidate : current;
  }

  /**
   * Classify a server text frame: {kind, frame} where kind is "message" (no `type`),
   * "welcome", "subscribed", "resync", "unsubscribed", "published", "result", "error",
   * "ping", "presence", "join", "leave", "presence_gap", "direct", "authenticated" or "unknown" (a type
   * from a newer server); null for anything that is not a
   * JSON object.
   */
  function parseFrame(raw) {
    var value = raw;
    if (typeof raw === "string") {
      try {
        value = JSON.parse(raw);
      } catch (e) {
        return null;
      }
    }
    if (!value || typeof value !== "object" || Array.isArray(value)) return null;
    if (value.type === undefined) {
      return typeof value.topic === "string" ? { kind: "message", frame: value } : null;
    }
    var known = [
      "welcome", "subscribed", "resync", "unsubscribed", "published", "result", "error", "ping",
      "presence", "join", "leave", "presence_gap", "direct", "authenticated",
    ];
    return { kind: known.indexOf(value.type) >= 0 ? value.type : "unknown", frame: value };
  }

  function toBytes(data) {
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    return null;
  }

  function isBinary(data) {
    return (
      (typeof ArrayBuffer !== "undefined" && data instanceof ArrayBuffer) ||
      (typeof ArrayBuffer !== "undefined" && ArrayBuffer.isView(data))
    );
  }

  /**
   * A binary frame: a 2-byte big-endian header length n, n bytes of UTF-8 JSON header,
   * then `payload` (ArrayBuffer or a typed array) unchanged. Returns a Uint8Array.
   */
  function encodeBinaryFrame(header, payload) {
    var head = new TextEncoder().encode(JSON.stringify(header));
    if (head.length > 65535) throw new LongConnError("binary frame header over 65535 bytes", "too_large", 413);
    var body = toBytes(payload);
    if (!body) throw new TypeError("payload must be an ArrayBuffer or a typed array");
    var out = new Uint8Array(2 + head.length + body.length);
    out[0] = head.length >> 8;
    out[1] = head.length & 255;
    out.set(head, 2);
    out.set(body, 2 + head.length);
    return out;
  }

  /**
   * Parse a binary frame (ArrayBuffer or typed array): {header, payload} with the
   * payload as a Uint8Array of its own; null when the frame is malformed.
   */
  function decodeBinaryFrame(data) {
    var bytes = toBytes(data);
    if (!bytes || bytes.length < 2) return null;
    var n = (bytes[0] << 8) | bytes[1];
    if (bytes.length < 2 + n) return null;
    var header;
    try {
      header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(2, 2 + n)));
    } catch (e) {
      return null;
    }
    if (!header || typeof header !== "object" || Array.isArray(header)) return null;
    return { header: header, payload: bytes.slice(2 + n) };
  }

  /** Base64 text to a Uint8Array (SSE and long-poll carry binary payloads as base64). */
  function fromBase64(text) {
    var bin = atob(text);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  /**
   * A message object of SSE or long-poll ({topic, cursor, data, binary?}) as
   * [topic, cursor, data, binary]: a binary payload (base64) becomes a Uint8Array,
   * as on WebSocket. Null when it is not a message object.
   */
  function messageFromObject(m) {
    if (!m || typeof m !== "object" || typeof m.topic !== "string") return null;
    var data = m.data;
    var binary = m.binary === true && typeof data === "string";
    if (binary) {
      try {
        data = fromBase64(data);
      } catch (e) {
        return null;
      }
    }
    return [m.topic, m.cursor || null, data, binary];
  }

  /**
   * Requests waiting for their answer, by id: each gets a Promise, settled by the
   * answer, by its timeout (code "timeout") or by rejectAll() (connection lost).
   * `timers` ({setTimeout, clearTimeout}) defaults to the global ones.
   */
  function Pending(timers) {
    this._next = 1;
    this._map = Object.create(null);
    this._timers = timers || {
      setTimeout: function (fn, ms) {
        return setTimeout(fn, ms);
      },
      clearTimeout: function (t) {
        clearTimeout(t);
      },
    };
  }

  /** A fresh request id (an integer below 2^53, never reused by this map). */
  Pending.prototype.newId = function () {
    return this._next++;
  };

  /**
   * Register a request: returns {id, promise}. After `timeout` ms (none when 0 or
   * null) the promise rejects with a LongConnError of code "timeout".
   */
  Pending.prototype.add = function (kind, timeout, info) {
    var self = this;
    var id = this.newId();
    var entry = { id: id, kind: kind, info: info || null, timer: null };
    entry.promise = new Promise(function (resolve, reject) {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    if (timeout) {
      entry.timer = this._timers.setTimeout(function () {
        self.reject(
          id,
          new LongConnError("LongConn: " + kind + " timed out after " + timeout + " ms", "timeout", null, { id: id })
        );
      }, timeout);
    }
    this._map[id] = entry;
    return entry;
  };

  /** Remove and return the request `id` (its timer stopped), or null. */
  Pending.prototype.take = function (id) {
    if (id === null || id === undefined || !(id in this._map)) return null;
    var entry = this._map[id];
    delete this._map[id];
    if (entry.timer !== null) this._timers.clearTimeout(entry.timer);
    return entry;
  };

  /** Settle request `id` with `value`; false when it is not pending. */
  Pending.prototype.resolve = function (id, value) {
    var entry = this.take(id);
    if (entry) entry.resolve(value);
    return !!entry;
  };

  /** Reject request `id` with `error`; false when it is not pending. */
  Pending.prototype.reject = function (id, error) {
    var entry = this.take(id);
    if (entry) entry.reject(error);
    return !!entry;
  };

  /** Reject every pending request with `error` (a fresh copy per request). */
  Pending.prototype.rejectAll = function (error) {
    var ids = Object.keys(this._map);
    for (var i = 0; i < ids.length; i++) {
      var entry = this.take(ids[i]);
      if (entry) {
        entry.reject(new LongConnError(error.message, error.code, error.status, { id: entry.id }));
      }
    }
  };

  /** How many requests wait for an answer. */
  Pending.prototype.size = function () {
    return Object.keys(this._map).length;
  };

  function callListeners(target, options, listeners, event, args) {
    var cb = options["on" + event.charAt(0).toUpperCase() + event.slice(1)];
    var fns = (listeners[event] || []).slice();
    if (typeof cb === "function") fns.unshift(cb);
    for (var i = 0; i < fns.length; i++) {
      try {
        fns[i].apply(target, args);
      } catch (e) {
        if (typeof console !== "undefined") console.error("LongConn: listener failed", e);
      }
    }
    return fns.length;
  }

  /**
   * One topic of a Session (made by session.subscribe()). `topic`; `cursor` the cursor
   * of the last message delivered (or the start position the server gave); `state`
   * "pending" (waiting for the server), "active" or "closed"; `ready` a Promise of the
   * subscription once the server accepted it (rejected with a LongConnError when it
   * refused it).
   */
  function Subscription(session, topic, options) {
    var self = this;
    this.topic = topic;
    this.cursor = options.cursor || null;
    this.params = options.params || null;
    this.state = "pending";
    this._session = session;
    this._options = options;
    this._listeners = {};
    this._settled = false;
    this.ready = new Promise(function (resolve, reject) {
      self._resolveReady = resolve;
      self._rejectReady = reject;
    });
    // A refusal is also reported through onError: an unawaited `ready` is not an error.
    this.ready.catch(function () {});
  }

  /** Listen to "message", "resync", "error" or "unsubscribed" (as the on* options). */
  Subscription.prototype.on = function (event, fn) {
    (this._listeners[event] = this._listeners[event] || []).push(fn);
    return this;
  };

  /** Stop receiving this topic. Resolves once the server confirmed (or at once when offline). */
  Subscription.prototype.unsubscribe = function () {
    return this._session.unsubscribe(this);
  };

  Subscription.prototype._emit = function (event, args) {
    return callListeners(this, this._options, this._listeners, event, args);
  };

  Subscription.prototype._confirm = function (cursor) {
    if (this.state === "closed") return;
    if (!this.cursor && cursor && parseCursor(cursor)) this.cursor = cursor;
    this.state = "active";
    if (!this._settled) {
      this._settled = true;
      this._resolveReady(this);
    }
  };

  Subscription.prototype._end = function (error) {
    this.state = "closed";
    if (!this._settled) {
      this._settled = true;
      this._rejectReady(error);
    }
  };

  /**
   * A connection speaking the subscriptions protocol: subscribe() to many topics,
   * publish(), call(). Options are Connection's (url, sseUrl, pollUrl, transport,
   * backoff, params, onStatus, ...; cursor/cursorParam/decode/sendUrl do not apply)
   * and:
   *   publishUrl      POST endpoint used by publish() when not on WebSocket
   *   requestTimeout  ms a publish() or call() may wait for its answer (10000)
   *   onResync        function(info): any subscription's resync ({topic, cursor, reason})
   *   onWelcome       function({v, client}): the server's welcome frame
   *   onDirect        function(data): a message the server sent to this session's user
   *   getToken        function(reason) -> token or Promise of one (reason: "open" or
   *                   "refresh"): on every WebSocket open the session first sends
   *                   {"type":"auth","token"} and subscribes once it is answered
   *                   "authenticated"; `refreshMargin` ms before the identity expires
   *                   it sends {"type":"refresh","token"} with a fresh token; a close
   *                   4401 "expired" (a refresh missed) then reconnects instead of ending
   *   refreshMargin   ms before expiry to refresh (30000; at most half the lifetime)
   *   onAuthenticated function({user, expiresIn}): an auth or refresh was accepted
   *   presenceClient  the `client` sent with SSE and long-poll requests (its presence
   *                   member id on the server; default: 16 random hex digits)
   * Use LongConn.session(options) to create and start one.
   */
  function Session(options) {
    Connection.call(this, assign({ requestTimeout: 10000, publishUrl: null }, options));
    this.clientId = null; // the server's connection id (welcome frame)
    this.protocolVersion = null;
    // The `client` of SSE and long-poll requests: this session's presence member id.
    this.presenceClient = typeof options.presenceClient === "string" ? options.presenceClient : randomClientId();
    this._ownClient = typeof options.presenceClient !== "string"; // ours: renewed after a disconnect
    this._subs = new Map(); // topic -> Subscription
    this._subReqs = Object.create(null); // request id -> Subscription awaiting "subscribed"
    this._pending = new Pending();
    this._wsReady = false; // a WebSocket is open: frames can be sent
    this._refreshTimer = null; // the refresh of the token before it expires
    this._authGen = 0; // bumped per transport: a late token answer is for an old one
  }
  Session.prototype = Object.create(Connection.prototype);
  Session.prototype.constructor = Session;

  /**
   * Subscribe to `topic`. `options` is a message handler, or: cursor (resume after it; default: from now), params
   * (sent with the WebSocket subscribe frame), onMessage(data, cursor, meta),
   * onResync({topic, cursor, reason, transport}), onError(error), onUnsubscribed(info),
   * onJoin(member, info) and onLeave(member, info) (the topic's presence events:
   * either one sends params.presence = true over WebSocket, presence=1 over SSE and
   * long-poll; info is {topic, reason}),
   * onPresenceGap({topic, reason}) (events may have been missed: call presence() again).
   * Returns a Subscription at once; throws a LongConnError for a bad topic or cursor
   * ("bad_request"), a topic already subscribed ("conflict") or a closed session.
   */
  Session.prototype.subscribe = function (topic, options) {
    if (typeof options === "function") options = { onMessage: options };
    options = options || {};
    if (this.state === "closed") throw new LongConnError("LongConn: the session is closed", "closed", null);
    if (!validTopic(topic)) {
      throw new LongConnError("LongConn: bad topic " + JSON.stringify(topic), "bad_request", 400, { topic: topic });
    }
    if (this._subs.has(topic)) {
      throw new LongConnError("LongConn: already subscribed to " + topic, "conflict", 409, { topic: topic });
    }
    if (options.cursor && !parseCursor(options.cursor)) {
      throw new LongConnError("LongConn: bad cursor " + JSON.stringify(options.cursor), "bad_request", 400, {
        topic: topic,
      });
    }
    if (typeof options.onJoin === "function" || typeof options.onLeave === "function") {
      options = assign({}, options, { params: assign({}, options.params || {}, { presence: true }) });
    }
    var sub = new Subscription(this, topic, options);
    this._subs.set(topic, sub);
    if (this._wsReady) this._sendSubscribe(sub);
    else this._topicsChanged();
    return sub;
  };

  /**
   * Stop receiving `topic` (a name or a Subscription). Never rejects: a subscription
   * whose connection is gone is gone too.
   */
  Session.prototype.unsubscribe = function (topic) {
    var sub = typeof topic === "string" ? this._subs.get(topic) : topic;
    if (!sub || this._subs.get(sub.topic) !== sub) return Promise.resolve();
    this._subs.delete(sub.topic);
    sub._end(new LongConnError("LongConn: unsubscribed from " + sub.topic, "closed", null, { topic: sub.topic }));
    for (var id in this._subReqs) {
      // Its answer still comes (before "unsubscribed"): recognised, then dropped.
      if (this._subReqs[id] === sub) this._subReqs[id] = null;
    }
    if (this._wsReady) {
      var req = this._pending.add("unsubscribe", this.options.requestTimeout);
      this._impl.send(JSON.stringify({ type: "unsubscribe", id: req.id, topic: sub.topic }));
      return req.promise.then(
        function () {},
        function () {}
      );
    }
    this._topicsChanged();
    return Promise.resolve();
  };

  /** The subscriptions held now. */
  Session.prototype.subscriptions = function () {
    return Array.from(this._subs.values());
  };

  /**
   * Publish `data` (JSON, or an ArrayBuffer / typed array for a binary frame) to
   * `topic`. Over an open WebSocket it is a publish frame; otherwise it is POSTed to
   * `publishUrl` (JSON only). Resolves with {topic, cursor}; rejects with a
   * LongConnError (the server's code, "timeout", "disconnected": the connection was
   * lost before the answer, so the message may or may not have been published).
   */
  Session.prototype.publish = function (topic, data) {
    if (this.state === "closed") return Promise.reject(new LongConnError("LongConn: the session is closed", "closed", null));
    if (!validTopic(topic)) {
      return Promise.reject(new LongConnError("LongConn: bad topic " + JSON.stringify(topic), "bad_request", 400, { topic: topic }));
    }
    var binary = isBinary(data);
    if (this._wsReady) {
      var req = this._pending.add("publish", this.options.requestTimeout, { topic: topic });
      try {
        if (binary) this._impl.send(encodeBinaryFrame({ type: "publish", id: req.id, topic: topic }, data));
        else this._impl.send(JSON.stringify({ type: "publish", id: req.id, topic: topic, data: data === undefined ? null : data }));
      } catch (e) {
        this._pending.reject(req.id, e instanceof LongConnError ? e : new LongConnError(String(e && e.message), "disconnected", null));
      }
      return req.promise;
    }
    if (!this.options.publishUrl) {
      return Promise.reject(
        new LongConnError("LongConn: no open WebSocket and no publishUrl configured", "disconnected", null, { topic: topic })
      );
    }
    if (binary) {
      return Promise.reject(
        new LongConnError("LongConn: binary payloads need the WebSocket transport", "unsupported", null, { topic: topic })
      );
    }
    return this._httpPublish(topic, data === undefined ? null : data);
  };

  Session.prototype._httpPublish = function (topic, data) {
    var timeout = this.options.requestTimeout;
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timedOut = false;
    var timer = setTimeout(function () {
      timedOut = true;
      if (controller) controller.abort();
    }, timeout);
    return fetch(buildUrl(this.options.publishUrl, this.options.params), {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ topic: topic, data: data }),
      credentials: this.options.withCredentials ? "include" : "same-origin",
      signal: controller ? controller.signal : undefined,
    })
      .then(
        function (res) {
          return res.text().then(function (text) {
            var body = tryJson(text);
            if (!body || typeof body !== "object") body = {};
            if (res.ok) return { topic: body.topic || topic, cursor: body.cursor || null };
            var err = errorFromFrame(body, res.status);
            err.status = res.status;
            err.topic = topic;
            throw err;
          });
        },
        function (err) {
          if (timedOut) {
            throw new LongConnError("LongConn: publish timed out after " + timeout + " ms", "timeout", null, { topic: topic });
          }
          throw new LongConnError("LongConn: publish failed: " + String((err && err.message) || err), "disconnected", null, {
            topic: topic,
          });
        }
      )
      .then(
        function (value) {
          clearTimeout(timer);
          return value;
        },
        function (err) {
          clearTimeout(timer);
          throw err;
        }
      );
  };

  /**
   * Call `method` on the server with `params` (JSON): resolves with the result.
   * Needs an open WebSocket ("disconnected" otherwise, "unsupported" on SSE or
   * long-poll). Rejects with the server's error (code, status), with "timeout" after
   * `options.timeout` ms (default requestTimeout), or "disconnected" when the
   * connection is lost first.
   */
  Session.prototype.call = function (method, params, options) {
    if (this.state === "closed") return Promise.reject(new LongConnError("LongConn: the session is closed", "closed", null));
    if (typeof method !== "string" || !method) {
      return Promise.reject(new LongConnError("LongConn: call needs a method name", "bad_request", 400));
    }
    if (!this._wsReady) {
      var onOther = this.state === "open" && this.transport !== "websocket";
      return Promise.reject(
        new LongConnError(
          onOther ? "LongConn: call() needs the WebSocket transport (now " + this.transport + ")" : "LongConn: not connected",
          onOther ? "unsupported" : "disconnected",
          null
        )
      );
    }
    var timeout = options && options.timeout !== undefined ? options.timeout : this.options.requestTimeout;
    var req = this._pending.add("call", timeout, { method: method });
    var frame = { type: "call", id: req.id, method: method };
    if (params !== undefined) frame.params = params;
    this._impl.send(JSON.stringify(frame));
    return req.promise;
  };

  /**
   * The members of `topic` on every server process: resolves with {topic, members,
   * cursor, connections, users} (members: [{client, user, info, since, transport}]).
   * `options`: cursor (from a previous answer: the next page), limit (1-1000),
   * timeout (ms). Needs an open WebSocket, like call(); rejects with the server's
   * error ("forbidden" for a topic this session does not hold, "not_found" when the
   * server keeps no presence).
   */
  Session.prototype.presence = function (topic, options) {
    options = options || {};
    if (this.state === "closed") return Promise.reject(new LongConnError("LongConn: the session is closed", "closed", null));
    if (!validTopic(topic)) {
      return Promise.reject(new LongConnError("LongConn: bad topic " + JSON.stringify(topic), "bad_request", 400, { topic: topic }));
    }
    if (!this._wsReady) {
      var onOther = this.state === "open" && this.transport !== "websocket";
      return Promise.reject(
        new LongConnError(
          onOther ? "LongConn: presence() needs the WebSocket transport (now " + this.transport + ")" : "LongConn: not connected",
          onOther ? "unsupported" : "disconnected",
          null
        )
      );
    }
    var timeout = options.timeout !== undefined ? options.timeout : this.options.requestTimeout;
    var req = this._pending.add("presence", timeout, { topic: topic });
    var frame = { type: "presence", id: req.id, topic: topic };
    if (options.cursor) frame.cursor = options.cursor;
    if (options.limit !== undefined) frame.limit = options.limit;
    this._impl.send(JSON.stringify(frame));
    return req.promise;
  };

  /** Sessions do not send raw messages: use publish() or call(). */
  Session.prototype.send = function () {
    return Promise.reject(new LongConnError("LongConn: a Session sends with publish() or call()", "unsupported", null));
  };

  Session.prototype._wsUrl = function () {
    return buildUrl(this.options.url, this.options.params, true);
  };

  Session.prototype._sendSubscribe = function (sub) {
    var id = this._pending.newId();
    this._subReqs[id] = sub;
    sub.state = "pending";
    var frame = { type: "subscribe", id: id, topic: sub.topic };
    if (sub.cursor) frame.cursor = sub.cursor;
    if (sub.params) frame.params = sub.params;
    this._impl.send(JSON.stringify(frame));
  };

  /** SSE / long-poll: the topic set changed; their transport restarts its request. */
  Session.prototype._topicsChanged = function () {
    if (this._impl && typeof this._impl.topicsChanged === "function") this._impl.topicsChanged();
  };

  /**
   * The query of an SSE or long-poll request: {list, topics, cursors, presence}, or
   * null without topics (presence: some subscription asked for presence events).
   */
  Session.prototype._topicQuery = function () {
    var list = [];
    var entries = [];
    var presence = false;
    this._subs.forEach(function (sub, topic) {
      list.push(topic);
      entries.push([topic, sub.cursor]);
      if (sub.params && sub.params.presence === true) presence = true;
    });
    if (!list.length) return null;
    return { list: list, topics: list.join(","), cursors: encodeCursorMap(entries), presence: presence };
  };

  /** The HTTP query of an SSE or long-poll request for `q` (the presence client id too). */
  Session.prototype._httpParams = function (q, extra) {
    var params = assign({}, this.options.params, { topics: q.topics, cursors: q.cursors, client: this.presenceClient }, extra);
    return params;
  };

  /** A join, leave or presence_gap of a topic (WebSocket frame or SSE event). */
  Session.prototype._presenceEvent = function (kind, f) {
    var sub = f && this._subs.get(f.topic);
    if (!sub) return;
    var info = { topic: f.topic, reason: f.reason === undefined ? null : f.reason };
    if (kind === "presence_gap") sub._emit("presenceGap", [info]);
    else if (sub.state === "active") sub._emit(kind, [f.member, info]);
  };

  Session.prototype._onOpen = function (idle) {
    var self = this;
    if (this.transport === "websocket" && this._impl) {
      if (typeof this.options.getToken === "function") {
        Connection.prototype._onOpen.call(this, idle);
        this._authenticate("open");
        return;
      }
      this._wsReady = true;
      this._subs.forEach(function (sub) {
        self._sendSubscribe(sub); // each from its own cursor
      });
    }
    Connection.prototype._onOpen.call(this, idle);
  };

  /**
   * Send {"type": kind, "token"} with a token from options.getToken: "auth" on open
   * (then subscribe), "refresh" before the identity expires. A token the server
   * refuses closes the connection (4401 / 4403: the session ends).
   */
  Session.prototype._authenticate = function (reason) {
    var self = this;
    var impl = this._impl;
    var gen = this._authGen;
    var kind = reason === "open" ? "auth" : "refresh";
    Promise.resolve()
      .then(function () {
        return self.options.getToken.call(self, reason);
      })
      .then(function (token) {
        if (self._impl !== impl || self._authGen !== gen || self.state === "closed") return null;
        if (typeof token !== "string" || !token) throw new Error("getToken gave no token");
        var req = self._pending.add(kind, self.options.requestTimeout);
        impl.send(JSON.stringify({ type: kind, id: req.id, token: token }));
        return req.promise;
      })
      .then(
        function (info) {
          if (!info || self._impl !== impl || self._authGen !== gen) return;
          self._emit("authenticated", [info]);
          self._scheduleRefresh(info.expiresIn);
          if (kind === "auth") {
            self._wsReady = true;
            self._subs.forEach(function (sub) {
              self._sendSubscribe(sub);
            });
          }
        },
        function (err) {
          if (self._impl !== impl || self._authGen !== gen || self.state === "closed") return;
          var e = err instanceof LongConnError ? err : new LongConnError("LongConn: " + kind + " failed: " + String((err && err.message) || err), "unauthorized", 401);
          self._emit("error", [e]);
          // A token the server refused: it closes the connection itself (4401 / 4403).
          // No token, or no answer, on open: drop the connection and reconnect later.
          var refused = err instanceof LongConnError && (err.code === "unauthorized" || err.code === "forbidden");
          if (kind === "auth" && !refused) impl.abort("no token");
        }
      );
  };

  // 4401 "expired" (the refresh did not come in time, e.g. the device slept): with
  // getToken a new connection gets a fresh token, so reconnect (with backoff).
  Session.prototype._retryableClose = function (info) {
    return typeof this.options.getToken === "function" && info.code === 4401 && info.reason === "expired";
  };

  /** Refresh `refreshMargin` ms before `expiresIn` seconds pass (at most half-way). */
  Session.prototype._scheduleRefresh = function (expiresIn) {
    var self = this;
    if (this._refreshTimer !== null) clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof expiresIn !== "number" || !isFinite(expiresIn)) return;
    var lifetime = expiresIn * 1000;
    var margin = this.options.refreshMargin === undefined ? 30000 : this.options.refreshMargin;
    var delay = Math.max(lifetime - margin, lifetime / 2, 0);
    this._refreshTimer = setTimeout(function () {
      self._refreshTimer = null;
      if (self._impl && self.transport === "websocket" && self.state !== "closed") self._authenticate("refresh");
    }, delay);
  };

  // The transport is gone: requests cannot be answered any more, subscriptions wait
  // for the next transport (they are sent again with their cursors).
  Session.prototype._lost = function (code, message) {
    this._wsReady = false;
    this._authGen++;
    if (this._refreshTimer !== null) clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._subReqs = Object.create(null);
    this._subs.forEach(function (sub) {
      if (sub.state === "active") sub.state = "pending";
    });
    this._pending.rejectAll(new LongConnError(message, code, null));
  };

  Session.prototype._onClosed = function (opened, info) {
    if (this.state === "closed") return;
    var why = info.reason || (info.code ? "close code " + info.code : "connection lost");
    this._lost("disconnected", "LongConn: connection lost before the answer (" + why + ")");
    Connection.prototype._onClosed.call(this, opened, info);
    if (this.state === "closed") {
      // A fatal close code: the server refused the connection as a whole.
      var code = FATAL_CLOSE_ERRORS[info.code] || "closed";
      this._endAll(new LongConnError("LongConn: connection refused (" + why + ")", code, ErrorCode[code] || null));
    }
  };

  Session.prototype._endAll = function (error) {
    var subs = Array.from(this._subs.values());
    this._subs.clear();
    subs.forEach(function (sub) {
      sub._end(new LongConnError(error.message, error.code, error.status, { topic: sub.topic }));
    });
  };

  /** Close for good: pending requests reject with "closed", subscriptions end. */
  Session.prototype.close = function () {
    if (this.state !== "closed") this._lost("closed", "LongConn: the session was closed");
    Connection.prototype.close.call(this);
    this._endAll(new LongConnError("LongConn: the session was closed", "closed", null));
  };

  Session.prototype.setTransport = function (name) {
    this._lost("disconnected", "LongConn: transport switched before the answer");
    Connection.prototype.setTransport.call(this, name);
  };

  // Close code 4001 on a Session: every topic starts over.
  Session.prototype._resync = function (cursor, reason) {
    var self = this;
    this._subs.forEach(function (sub) {
      self._topicResync(sub, null, reason);
    });
  };

  Session.prototype._onRaw = function (raw) {
    this._touch();
    if (typeof raw !== "string") {
      var bin = decodeBinaryFrame(raw);
      if (!bin || typeof bin.header.topic !== "string") {
        this._emit("error", [new LongConnError("LongConn: malformed binary frame", "bad_request", null)]);
        return;
      }
      this._deliver(bin.header.topic, bin.header.cursor || null, bin.payload, true);
      return;
    }
    var parsed = parseFrame(raw);
    if (!parsed) {
      this._emit("error", [new LongConnError("LongConn: unreadable frame", "bad_request", null)]);
      return;
    }
    var f = parsed.frame;
    var sub;
    switch (parsed.kind) {
      case "message":
        this._deliver(f.topic, f.cursor || null, f.data, false);
        return;
      case "ping":
        if (this._impl) this._impl.send('{"type":"pong"}');
        return;
      case "welcome":
        this.clientId = f.client === undefined ? null : f.client;
        this.protocolVersion = f.v === undefined ? null : f.v;
        this._emit("welcome", [{ v: this.protocolVersion, client: this.clientId }]);
        return;
      case "subscribed":
        sub = this._subReqs[f.id];
        delete this._subReqs[f.id];
        if (sub && this._subs.get(sub.topic) === sub) sub._confirm(f.cursor || null);
        return;
      case "resync":
        sub = this._subs.get(f.topic);
        if (sub) this._topicResync(sub, f.cursor || null, f.reason || null);
        return;
      case "unsubscribed":
        if (f.id !== null && f.id !== undefined) {
          this._pending.resolve(f.id, undefined);
          return;
        }
        sub = this._subs.get(f.topic);
        if (sub) this._ended(sub, f.reason || null);
        return;
      case "published":
        this._pending.resolve(f.id, { topic: f.topic, cursor: f.cursor || null });
        return;
      case "result":
        this._pending.resolve(f.id, f.result);
        return;
      case "authenticated":
        this._pending.resolve(f.id, {
          user: f.user === undefined ? null : f.user,
          expiresIn: typeof f.expires_in === "number" ? f.expires_in : null,
        });
        return;
      case "presence":
        this._pending.resolve(f.id, {
          topic: f.topic,
          members: f.members || [],
          cursor: f.cursor === undefined ? null : f.cursor,
          connections: f.connections,
          users: f.users,
        });
        return;
      case "join":
      case "leave":
      case "presence_gap":
        this._presenceEvent(parsed.kind, f);
        return;
      case "direct":
        this._emit("direct", [f.data]);
        return;
      case "error":
        this._onErrorFrame(f);
        return;
      default:
        return; // a frame type of a newer server: ignored
    }
  };

  Session.prototype._onErrorFrame = function (f) {
    var err = errorFromFrame(f);
    if (f.id !== null && f.id !== undefined) {
      var sub = this._subReqs[f.id];
      if (sub === null) {
        delete this._subReqs[f.id]; // a subscription given up before its answer
        return;
      }
      if (sub) {
        delete this._subReqs[f.id];
        err.topic = sub.topic;
        if (this._subs.get(sub.topic) === sub) this._refused(sub, err);
        return;
      }
      var entry = this._pending.take(f.id);
      if (entry) {
        if (entry.kind === "unsubscribe") entry.resolve(undefined); // (not_found: gone already)
        else entry.reject(err);
        return;
      }
    }
    this._emit("error", [err]);
  };

  Session.prototype._deliver = function (topic, cursor, data, binary) {
    var sub = this._subs.get(topic);
    if (!sub) return; // not (or no longer) subscribed
    // On WebSocket a topic's messages follow its "subscribed" answer.
    if (this.transport === "websocket" && sub.state !== "active") return;
    if (cursor && sub.cursor && !isAfter(cursor, sub.cursor)) {
      this.stats.duplicates++;
      return; // delivered before a reconnect
    }
    if (cursor) sub.cursor = cursor;
    this.stats.messages++;
    sub._emit("message", [data, cursor, { topic: topic, transport: this.transport, binary: !!binary }]);
  };

  Session.prototype._topicResync = function (sub, cursor, reason) {
    sub.cursor = cursor;
    this.stats.resyncs++;
    var info = { topic: sub.topic, cursor: cursor, reason: reason, transport: this.transport };
    sub._emit("resync", [info]);
    this._emit("resync", [info]);
  };

  Session.prototype._refused = function (sub, err) {
    this._subs.delete(sub.topic);
    sub._end(err);
    if (!sub._emit("error", [err])) this._emit("error", [err]);
  };

  Session.prototype._ended = function (sub, reason) {
    this._subs.delete(sub.topic);
    sub._end(new LongConnError("LongConn: the server ended " + sub.topic + " (" + reason + ")", "closed", null, { topic: sub.topic }));
    sub._emit("unsubscribed", [{ topic: sub.topic, reason: reason }]);
  };

  // SSE / long-poll: the request for `list` was answered; its pending topics are active.
  Session.prototype._confirmTopics = function (list) {
    var self = this;
    list.forEach(function (topic) {
      var sub = self._subs.get(topic);
      if (sub && sub.state === "pending") sub._confirm(null);
    });
  };

  // SSE: the cursor map of an event; a topic without a cursor yet starts from it.
  Session.prototype._fillCursors = function (map) {
    if (!map) return;
    var self = this;
    Object.keys(map).forEach(function (topic) {
      var sub = self._subs.get(topic);
      if (sub && !sub.cursor && map[topic]) sub.cursor = map[topic];
    });
  };

  Session.prototype._topicError = function (body) {
    var sub = body && this._subs.get(body.topic);
    if (sub) this._refused(sub, errorFromFrame(body));
  };

  // One long-poll answer: resync notices first (delivery continues after their
  // cursors), refusals, then messages, then each topic's position.
  Session.prototype._pollBody = function (body, list) {
    var self = this;
    (body.resync || []).forEach(function (r) {
      var sub = r && self._subs.get(r.topic);
      if (sub) self._topicResync(sub, r.cursor || null, r.reason || null);
    });
    (body.errors || []).forEach(function (e) {
      self._topicError(e);
    });
    this._confirmTopics(list);
    (body.messages || []).forEach(function (obj) {
      var m = messageFromObject(obj);
      if (m) self._deliver(m[0], m[1], m[2], m[3]);
    });
    var cursors = body.cursors || {};
    Object.keys(cursors).forEach(function (topic) {
      var sub = self._subs.get(topic);
      if (sub) sub.cursor = advanceCursor(sub.cursor, cursors[topic]);
    });
    // Presence events (presence=1) and messages to the user, in the server's order.
    (body.events || []).forEach(function (f) {
      self._httpEvent(f);
    });
  };

  /**
   * The server disconnected this session over SSE or long-poll (`info` {code, reason}):
   * it refuses the old presence client id for a while, so a session that made its own
   * takes a new one before it reconnects (fatal codes do not reconnect).
   */
  Session.prototype._disconnected = function (info) {
    if (this._ownClient) this.presenceClient = randomClientId();
    return info;
  };

  /** A join, leave, presence_gap or direct object of an SSE event or a long-poll answer. */
  Session.prototype._httpEvent = function (f) {
    if (!f || typeof f !== "object") return;
    if (f.type === "join" || f.type === "leave" || f.type === "presence_gap") this._presenceEvent(f.type, f);
    else if (f.type === "direct") this._emit("direct", [f.data]);
  };

  /**
   * The server disconnected this session's user (UserRegistry.disconnect_user) over
   * SSE or long-poll: `{code, close_code, reason}` / `{type: "disconnect", code,
   * reason}`. Closes like a WebSocket closed with that code (4401, 4403, 4429: fatal).
   */
  function disconnectInfo(body) {
    if (!body || typeof body !== "object") return null;
    if (body.type === "disconnect" && typeof body.code === "number") return { code: body.code, reason: body.reason || "" };
    if (body.code === "disconnected" && typeof body.close_code === "number") return { code: body.close_code, reason: body.reason || "" };
    return null;
  }

  Session.prototype._hasCursors = function () {
    var any = false;
    this._subs.forEach(function (sub) {
      if (sub.cursor) any = true;
    });
    return any;
  };

  var SESSION_OPENERS = {
    websocket: OPENERS.websocket,

    // One EventSource for the topic set; restarted (same transport, no backoff) when
    // the set changes. No topics: nothing to stream, the transport waits.
    sse: function (conn, hooks) {
      var es = null;
      var done = false;
      var opened = false;
      var scheduled = true;
      function finish(info) {
        if (done) return;
        done = true;
        if (es) es.close();
        hooks.closed(info);
      }
      function markOpen(idle) {
        if (!idle) hooks.pin();
        if (!opened) {
          opened = true;
          hooks.opened(idle);
        }
      }
      function start() {
        scheduled = false;
        if (done || !hooks.live()) return;
        if (es) es.close();
        es = null;
        var q = conn._topicQuery();
        if (!q) return markOpen(true);
        var params = conn._httpParams(q, q.presence ? { presence: 1 } : {});
        var mine = new EventSource(buildUrl(conn.options.sseUrl, params), {
          withCredentials: !!conn.options.withCredentials,
        });
        es = mine;
        function current() {
          return es === mine && !done && hooks.live();
        }
        mine.onopen = function () {
          if (current()) markOpen();
        };
        // `event: ready` opens the stream: its cursors are the start position of every
        // topic the server accepted (refused ones follow as `event: error`).
        mine.addEventListener("ready", function (ev) {
          if (!current()) return;
          markOpen();
          var body = tryJson(ev.data);
          var start = (body && typeof body === "object" && body.cursors) || null;
          if (start && typeof start === "object") {
            conn._fillCursors(start);
            conn._confirmTopics(
              q.list.filter(function (t) {
                return Object.prototype.hasOwnProperty.call(start, t);
              })
            );
          } else {
            conn._confirmTopics(q.list);
          }
        });
        mine.onmessage = function (ev) {
          if (!current()) return;
          var m = messageFromObject(tryJson(ev.data));
          if (!m) return;
          conn._deliver(m[0], m[1], m[2], m[3]);
          conn._fillCursors(parseCursorMap(ev.lastEventId || ""));
        };
        mine.addEventListener("resync", function (ev) {
          if (!current()) return;
          var r = tryJson(ev.data);
          var sub = r && conn._subs.get(r.topic);
          if (sub) conn._topicResync(sub, r.cursor || null, r.reason || null);
        });
        ["join", "leave", "presence_gap", "direct"].forEach(function (kind) {
          mine.addEventListener(kind, function (ev) {
            if (current()) conn._httpEvent(tryJson(ev.data));
          });
        });
        // The user was disconnected: the stream's last event.
        mine.addEventListener("disconnect", function (ev) {
          if (!current()) return;
          var info = disconnectInfo(tryJson(ev.data));
          if (info) finish(conn._disconnected(info));
        });
        // "error" is both the server's `event: error` (a refused topic, with data)
        // and the stream's failure (no data). EventSource would reconnect by itself;
        // we close it and reconnect with our backoff and cursors.
        mine.onerror = function (ev) {
          if (!current()) return;
          if (ev && typeof ev.data === "string") {
            conn._topicError(tryJson(ev.data));
            return;
          }
          finish({ code: null, reason: "event stream error" });
        };
      }
      Promise.resolve().then(start);
      return {
        close: function () {
          done = true;
          if (es) es.close();
        },
        abort: function (reason) {
          finish({ code: null, reason: reason });
        },
        topicsChanged: function () {
          if (done || scheduled) return;
          scheduled = true;
          Promise.resolve().then(start);
        },
      };
    },

    // Long-poll with the cursor map; a change of the topic set aborts the waiting
    // request and asks again at once (timeout=0) with the new set.
    longpoll: function (conn, hooks) {
      var done = false;
      var opened = false;
      var fresh = true; // the next request answers at once
      var scheduled = true;
      var controller = null;
      var timer = null;
      function finish(info) {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (controller) controller.abort();
        hooks.closed(info);
      }
      function markOpen(idle) {
        if (!idle) hooks.pin();
        if (!opened) {
          opened = true;
          hooks.opened(idle);
        }
      }
      function poll() {
        scheduled = false;
        if (done || !hooks.live()) return;
        var q = conn._topicQuery();
        if (!q) {
          controller = null;
          clearTimeout(timer);
          return markOpen(true);
        }
        var timeout = fresh ? 0 : conn.options.pollTimeout;
        fresh = false;
        var ctl = typeof AbortController === "function" ? new AbortController() : { abort: function () {}, signal: undefined };
        controller = ctl;
        var params = conn._httpParams(q, q.presence ? { timeout: timeout, presence: 1 } : { timeout: timeout });
        clearTimeout(timer);
        timer = setTimeout(function () {
          finish({ code: null, reason: "poll timeout" });
        }, timeout * 1000 + 10000);
        function current() {
          return controller === ctl && !done && hooks.live();
        }
        fetch(buildUrl(conn.options.pollUrl, params), {
          headers: { Accept: "application/json" },
          credentials: conn.options.withCredentials ? "include" : "same-origin",
          cache: "no-store",
          signal: ctl.signal,
        })
          .then(function (res) {
            if (!current()) return null;
            if (res.status === 400 && conn._hasCursors()) {
              // Cursors the server cannot read (e.g. from another deployment).
              conn._resync(null, "cursor rejected");
              fresh = true;
              return null;
            }
            if (!res.ok) {
              // The user was disconnected: close with the close code it stands for.
              return res.json().then(
                function (body) {
                  var info = disconnectInfo(body);
                  if (info && current()) finish(conn._disconnected(info));
                  else throw new Error("HTTP " + res.status);
                  return null;
                },
                function () {
                  throw new Error("HTTP " + res.status);
                }
              );
            }
            return res.json();
          })
          .then(function (body) {
            if (!current()) return;
            markOpen();
            if (body) conn._pollBody(body, q.list);
            poll();
          })
          .catch(function (err) {
            if (!current()) return; // aborted for a new topic set
            finish({ code: null, reason: String((err && err.message) || err) });
          });
      }
      Promise.resolve().then(poll);
      return {
        close: function () {
          done = true;
          clearTimeout(timer);
          if (controller) controller.abort();
        },
        abort: function (reason) {
          finish({ code: null, reason: reason });
        },
        topicsChanged: function () {
          if (done || scheduled) return;
          scheduled = true;
          fresh = true;
          var old = controller;
          controller = null;
          if (old) old.abort();
          Promise.resolve().then(poll);
        },
      };
    },
  };

  Session.prototype._openers = SESSION_OPENERS;

  /**
   * Create a Session (the subscriptions protocol v1) and start it:
   *
   *   const conn = LongConn.session({url: "/ws", sseUrl: "/sse", pollUrl: "/poll", publishUrl: "/publish"});
   *   const room = conn.subscribe("room:1", {onMessage(data, cursor) {}});
   *   await conn.publish("room:1", {text: "hi"});
   *   const rooms = await conn.call("rooms.list", {});
   */
  function session(options) {
    return new Session(options).start();
  }

  // ------------------------------------------------------------------ upload

  var UPLOAD_DEFAULTS = {
    protocol: "tus", // "tus" | "websocket"
    endpoint: null, // tus creation URL (e.g. "/files/")
    url: null, // WebSocket upload endpoint
    params: null, // WebSocket: extra query parameters
    chunkSize: 256 * 1024,
    metadata: null, // extra metadata; filename and filetype are added
    headers: null, // extra HTTP headers (tus)
    checksum: "auto", // "auto" (sha256 when crypto.subtle exists) | "sha256" | false
    retries: 5, // consecutive failures before giving up
    backoff: { base: 500, max: 8000 },
    rememberUrl: true, // tus: keep the upload URL in localStorage to resume after a reload
    onProgress: null, // function(sent, total)
    signal: null, // AbortSignal
    random: null,
  };

  function sleep(ms, signal) {
    return new Promise(function (resolve, reject) {
      var t = setTimeout(resolve, ms);
      if (signal) {
        signal.addEventListener("abort", function () {
          clearTimeout(t);
          reject(new Error("upload aborted"));
        });
      }
    });
  }

  function b64(text) {
    var bytes = new TextEncoder().encode(String(text));
    var bin = "";
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin);
  }

  function bufToB64(buf) {
    var bytes = new Uint8Array(buf);
    var bin = "";
    for (var i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
    return btoa(bin);
  }

  function bufToHex(buf) {
    var bytes = new Uint8Array(buf);
    var out = "";
    for (var i = 0; i < bytes.length; i++) out += (bytes[i] < 16 ? "0" : "") + bytes[i].toString(16);
    return out;
  }

  function useChecksum(opt) {
    if (opt === false || opt === null) return false;
    var ok = typeof crypto !== "undefined" && crypto.subtle && typeof crypto.subtle.digest === "function";
    if (opt === "sha256" && !ok) throw new Error("LongConn: crypto.subtle is unavailable (not a secure context?)");
    return !!ok;
  }

  function UploadError(message, status) {
    var e = new Error(message);
    e.name = "UploadError";
    e.status = status || null;
    return e;
  }

  /** Send one XHR, reporting upload progress; resolves with the XHR whatever its status. */
  function xhr(method, url, headers, body, onProgress, signal) {
    return new Promise(function (resolve, reject) {
      var req = new XMLHttpRequest();
      req.open(method, url, true);
      Object.keys(headers).forEach(function (k) {
        req.setRequestHeader(k, headers[k]);
      });
      if (onProgress && req.upload) {
        req.upload.onprogress = function (ev) {
          onProgress(ev.loaded);
        };
      }
      req.onload = function () {
        resolve(req);
      };
      req.onerror = function () {
        reject(UploadError("network error during " + method));
      };
      req.onabort = function () {
        reject(UploadError("upload aborted"));
      };
      if (signal) {
        if (signal.aborted) return req.abort();
        signal.addEventListener("abort", function () {
          req.abort();
        });
      }
      req.send(body === undefined ? null : body);
    });
  }

  function tusUpload(file, o) {
    var total = file.size;
    var checksum = useChecksum(o.checksum);
    var meta = assign({ filename: file.name || "blob", filetype: file.type || "application/octet-stream" }, o.metadata);
    var metaHeader = Object.keys(meta)
      .map(function (k) {
        return k + " " + b64(meta[k]);
      })
      .join(",");
    var key = "longconn-tus:" + o.endpoint + ":" + [file.name, file.size, file.lastModified].join(":");
    var storage = null;
    try {
      storage = o.rememberUrl && typeof localStorage !== "undefined" ? localStorage : null;
    } catch (e) {
      storage = null;
    }
    var uploadUrl = null;
    var offset = 0;
    var failures = 0;
    function headers(extra) {
      return assign({ "Tus-Resumable": "1.0.0" }, o.headers, extra);
    }
    function progress(n) {
      if (o.onProgress) o.onProgress(Math.min(n, total), total);
    }
    function create() {
      return xhr("POST", buildUrl(o.endpoint), headers({
        "Upload-Length": String(total),
        "Upload-Metadata": metaHeader,
      }), null, null, o.signal).then(function (res) {
        if (res.status !== 201) throw UploadError("tus creation failed: HTTP " + res.status, res.status);
        uploadUrl = new URL(res.getResponseHeader("Location"), buildUrl(o.endpoint)).toString();
        offset = 0;
        if (storage) storage.setItem(key, uploadUrl);
      });
    }
    function head() {
      return xhr("HEAD", uploadUrl, headers({}), null, null, o.signal).then(function (res) {
        if (res.status === 404 || res.status === 410) {
          uploadUrl = null;
          if (storage) storage.removeItem(key);
          return false;
        }
        if (res.status < 200 || res.status >= 300) throw UploadError("tus HEAD failed: HTTP " + res.status, res.status);
        offset = Number(res.getResponseHeader("Upload-Offset"));
        progress(offset);
        return true;
      });
    }
    function patch() {
      var end = Math.min(total, offset + o.chunkSize);
      var blob = file.slice(offset, end);
      return blob.arrayBuffer().then(function (buf) {
        var digest = checksum ? crypto.subtle.digest("SHA-256", buf) : Promise.resolve(null);
        return digest.then(function (d) {
          var h = headers({ "Upload-Offset": String(offset), "Content-Type": "application/offset+octet-stream" });
          if (d) h["Upload-Checksum"] = "sha256 " + bufToB64(d);
          var start = offset;
          return xhr("PATCH", uploadUrl, h, buf, function (n) {
            progress(start + n);
          }, o.signal);
        });
      }).then(function (res) {
        if (res.status === 204 || res.status === 200) {
          offset = Number(res.getResponseHeader("Upload-Offset"));
          failures = 0;
          progress(offset);
          return;
        }
        if ([409, 423, 460].indexOf(res.status) >= 0 || (res.status >= 500 && res.status !== 507)) {
          // Offset mismatch, a concurrent writer, a chunk damaged on the way (checksum
          // mismatch) or a server error: ask the offset again and continue from there.
          throw UploadError("tus PATCH: HTTP " + res.status, res.status);
        }
        var fatal = UploadError("tus PATCH refused: HTTP " + res.status + " " + res.responseText, res.status);
        fatal.fatal = true;
        throw fatal;
      });
    }
    function step() {
      if (offset >= total && uploadUrl) return Promise.resolve();
      return patch().then(step);
    }
    function attempt() {
      var start;
      if (!uploadUrl) start = create();
      else start = head().then(function (found) {
        return found ? null : create();
      });
      return start.then(step).catch(function (err) {
        if (err.fatal || (o.signal && o.signal.aborted)) throw err;
        failures++;
        if (failures > o.retries) throw err;
        return sleep(backoffDelay(failures, o.backoff.base, o.backoff.max, o.random), o.signal).then(attempt);
      });
    }
    if (storage) uploadUrl = storage.getItem(key);
    progress(0);
    return attempt().then(function () {
      if (storage) storage.removeItem(key);
      return { url: uploadUrl, size: total, protocol: "tus" };
    });
  }

  /**
   * Upload `file` (a File or Blob). Returns a Promise of {url, size, protocol, ...}.
   * Options: see UPLOAD_DEFAULTS. tus needs `endpoint`; "websocket" needs `url`.
   */
  function upload(file, options) {
    var o = assign({}, UPLOAD_DEFAULTS, options);
    o.backoff = assign({}, UPLOAD_DEFAULTS.backoff, options && options.backoff);
    if (o.protocol === "tus") {
      if (!o.endpoint) return Promise.reject(new Error("LongConn.upload: tus needs `endpoint`"));
      return tusUpload(file, o);
    }
    if (o.protocol === "websocket") {
      if (!o.url) return Promise.reject(new Error("LongConn.upload: websocket needs `url`"));
      return wsUpload(file, o);
    }
    return Promise.reject(new Error("LongConn.upload: unknown protocol " + o.protocol));
  }

  // Close codes after which retrying the same upload cannot help.
  var FATAL_UPLOAD_CODES = [
    CloseCode.UPLOAD_BAD_REQUEST,
    CloseCode.UPLOAD_TOO_LARGE,
    CloseCode.UPLOAD_CHECKSUM_MISMATCH,
    CloseCode.UPLOAD_STORAGE_FULL,
    CloseCode.POLICY_VIOLATION,
    CloseCode.MESSAGE_TOO_BIG,
  ];

  /** The reason of the 4409 close that tells a connection its upload was resumed elsewhere. */
  var UPLOAD_TAKEN_OVER = "upload resumed on another connection";

  /**
   * The WebSocket chunk protocol (tornado_longconn.upload_ws): "start" (or "resume"
   * with the id), then binary chunks [8-byte big-endian offset][data], at most
   * `window` unacknowledged; every "ack" carries the durable offset. After a broken
   * connection it reconnects (backoff) and resumes from the server's offset.
   */
  function wsUpload(file, o) {
    var total = file.size;
    var key = "longconn-ws:" + o.url + ":" + [file.name, file.size, file.lastModified].join(":");
    var storage = null;
    try {
      storage = o.rememberUrl && typeof localStorage !== "undefined" ? localStorage : null;
    } catch (e) {
      storage = null;
    }
    var uploadId = storage ? storage.getItem(key) : null;
    var failures = 0;
    var wantDigest = o.checksum === "sha256" || (o.checksum === "auto" && total <= 64 * 1024 * 1024);
    var digest = null;
    function progress(n) {
      if (o.onProgress) o.onProgress(Math.min(n, total), total);
    }
    function fileDigest() {
      if (!wantDigest || !useChecksum(o.checksum === "auto" ? "auto" : "sha256")) return Promise.resolve(null);
      if (digest) return Promise.resolve(digest);
      return file.arrayBuffer().then(function (buf) {
        return crypto.subtle.digest("SHA-256", buf);
      }).then(function (d) {
        digest = bufToHex(d);
        return digest;
      });
    }
    function once(sha256) {
      return new Promise(function (resolve, reject) {
        var ws = new WebSocket(buildUrl(o.url, o.params, true));
        ws.binaryType = "arraybuffer";
        var credit = 1; // chunks the server lets us send before an ack
        var chunk = o.chunkSize;
        var next = 0; // next offset to send
        var inflight = 0;
        var sending = false;
        var done = false;
        function onAbort() {
          ws.close(CloseCode.NORMAL, "aborted");
          finish(UploadError("upload aborted"));
        }
        function finish(err, result) {
          if (done) return;
          done = true;
          if (o.signal) o.signal.removeEventListener("abort", onAbort);
          if (err) reject(err);
          else resolve(result);
        }
        function pump() {
          if (sending || done) return;
          if (inflight >= credit || next >= total) return;
          sending = true;
          var start = next;
          var end = Math.min(total, start + chunk);
          file.slice(start, end).arrayBuffer().then(function (buf) {
            sending = false;
            if (done || ws.readyState !== 1) return;
            var msg = new Uint8Array(8 + buf.byteLength);
            var view = new DataView(msg.buffer);
            view.setUint32(0, Math.floor(start / 4294967296));
            view.setUint32(4, start >>> 0);
            msg.set(new Uint8Array(buf), 8);
            ws.send(msg);
            next = end;
            inflight++;
            pump();
          }, function (err) {
            sending = false;
            ws.close(CloseCode.NORMAL, "read error");
            finish(err);
          });
        }
        if (o.signal) {
          if (o.signal.aborted) return onAbort();
          o.signal.addEventListener("abort", onAbort);
        }
        ws.onopen = function () {
          var meta = assign({}, o.metadata);
          var first = uploadId
            ? { type: "resume", id: uploadId }
            : { type: "start", size: total, name: file.name || "blob", metadata: meta };
          if (sha256) first.sha256 = sha256;
          ws.send(JSON.stringify(first));
        };
        ws.onmessage = function (ev) {
          if (typeof ev.data !== "string") return;
          var msg = tryJson(ev.data);
          if (!msg || typeof msg !== "object") return;
          if (msg.type === "ready") {
            uploadId = msg.id;
            if (storage) storage.setItem(key, uploadId);
            credit = Math.max(1, msg.window || 1);
            chunk = Math.max(1, Math.min(o.chunkSize, msg.chunk_size || o.chunkSize));
            next = msg.offset;
            inflight = 0;
            progress(msg.offset);
            pump();
          } else if (msg.type === "ack") {
            inflight = Math.max(0, inflight - 1);
            failures = 0;
            progress(msg.offset);
            pump();
          } else if (msg.type === "complete") {
            progress(total);
            if (storage) storage.removeItem(key);
            ws.close(CloseCode.NORMAL);
            finish(null, { id: msg.id, size: msg.size, sha256: msg.sha256, protocol: "websocket" });
          }
        };
        ws.onclose = function (ev) {
          if (done) return;
          var err = UploadError("upload connection closed: " + ev.code + " " + ev.reason, ev.code);
          err.code = ev.code;
          if (FATAL_UPLOAD_CODES.indexOf(ev.code) >= 0) err.fatal = true;
          if (ev.code === CloseCode.UPLOAD_CONFLICT && ev.reason === UPLOAD_TAKEN_OVER) {
            // A newer connection (another tab, or this client after a network change)
            // resumed this upload: this one stops, or the two would take it in turns.
            err.fatal = true;
            err.takenOver = true;
          }
          if (ev.code === CloseCode.UPLOAD_NOT_FOUND) {
            // The upload expired or is unknown here: start again from zero.
            uploadId = null;
            if (storage) storage.removeItem(key);
          }
          finish(err);
        };
      });
    }
    function attempt() {
      return Promise.resolve().then(fileDigest).then(once).catch(function (err) {
        if (err.fatal || (o.signal && o.signal.aborted)) throw err;
        failures++;
        if (failures > o.retries) throw err;
        return sleep(backoffDelay(failures, o.backoff.base, o.backoff.max, o.random), o.signal).then(attempt);
      });
    }
    progress(0);
    return attempt();
  }

  return {
    VERSION: VERSION,
    PROTOCOL_VERSION: PROTOCOL_VERSION,
    CloseCode: CloseCode,
    ErrorCode: ErrorCode,
    LongConnError: LongConnError,
    Connection: Connection,
    Session: Session,
    Subscription: Subscription,
    connect: connect,
    session: session,
    upload: upload,
    backoffDelay: backoffDelay,
    parseCursor: parseCursor,
    isAfter: isAfter,
    validTopic: validTopic,
    _bufToHex: bufToHex,
    // Pure helpers, exported for tests (not part of the public API).
    _internal: {
      advanceCursor: advanceCursor,
      encodeCursorMap: encodeCursorMap,
      parseCursorMap: parseCursorMap,
      parseFrame: parseFrame,
      encodeBinaryFrame: encodeBinaryFrame,
      decodeBinaryFrame: decodeBinaryFrame,
      errorFromFrame: errorFromFrame,
      messageFromObject: messageFromObject,
      defaultDecode: defaultDecode,
      Pending: Pending,
    },
  };
});
