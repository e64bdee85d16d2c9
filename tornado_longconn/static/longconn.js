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
  var FATAL_CLOSE_CODES = [CloseCode.POLICY_VIOLATION, 4401, 4403];

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
    var openTimer = setTimeout(function () {
      if (gen === self._gen && !opened) {
        self._closeImpl();
        hooks.closed({ code: null, reason: "open timeout" });
      }
    }, this.options.openTimeout);
    var hooks = {
      opened: function () {
        if (gen !== self._gen || opened) return;
        opened = true;
        clearTimeout(openTimer);
        self._onOpen();
      },
      message: function (raw, cursor) {
        if (gen === self._gen) self._onRaw(raw, cursor);
      },
      resync: function (cursor, reason) {
        if (gen === self._gen) self._resync(cursor, reason);
      },
      closed: function (info) {
        if (gen !== self._gen) return;
        clearTimeout(openTimer);
        self._gen++;
        self._impl = null;
        self._onClosed(opened, info || {});
      },
    };
    try {
      this._impl = OPENERS[name](this, hooks);
    } catch (e) {
      this._emit("error", [e]);
      hooks.closed({ code: null, reason: String(e && e.message) });
    }
  };

  Connection.prototype._onOpen = function () {
    this._openedAt = Date.now();
    this._failures = 0;
    this._pinned = true;
    this.stats.opened++;
    this._touch();
    this._status("open");
  };

  Connection.prototype._onClosed = function (opened, info) {
    clearTimeout(this._idleTimer);
    if (this.state === "closed") return;
    var code = info.code;
    if (FATAL_CLOSE_CODES.indexOf(code) >= 0) {
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

  // -------------------------------------------------------------- transports

  var OPENERS = {
    websocket: function (conn, hooks) {
      var ws = new WebSocket(buildUrl(conn.options.url, conn._query(), true));
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

  /** Create a Connection and start it. See DEFAULTS for the options. */
  function connect(options) {
    return new Connection(options).start();
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
    CloseCode: CloseCode,
    Connection: Connection,
    connect: connect,
    upload: upload,
    backoffDelay: backoffDelay,
    parseCursor: parseCursor,
    isAfter: isAfter,
    _bufToHex: bufToHex,
  };
});
