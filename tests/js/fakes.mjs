// Fake browser transports for the Node tests of longconn.js: a WebSocket, an
// EventSource and fetch() that the test drives from the "server" side; and the
// set-up of a Session test (installFakes / removeFakes, sessionTest, FAST).
import { beforeEach, afterEach } from "node:test";

/** Resolves the n-th (0-based) instance of `cls` once it exists. */
function waitInstance(cls, n) {
  if (cls.instances.length > n) return Promise.resolve(cls.instances[n]);
  return new Promise((resolve) => cls.waiters.push({ n, resolve }));
}

function register(cls, obj) {
  cls.instances.push(obj);
  cls.waiters = cls.waiters.filter((w) => {
    if (cls.instances.length > w.n) {
      w.resolve(cls.instances[w.n]);
      return false;
    }
    return true;
  });
}

export class FakeWebSocket {
  static instances = [];
  static waiters = [];
  static reset() {
    FakeWebSocket.instances = [];
    FakeWebSocket.waiters = [];
  }
  static nth(n) {
    return waitInstance(FakeWebSocket, n);
  }

  constructor(url) {
    this.url = new URL(url);
    this.sent = [];
    this.readyState = 0;
    this.closedBy = null;
    this._waiters = [];
    register(FakeWebSocket, this);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("WebSocket is not open");
    this.sent.push(data);
    this._waiters = this._waiters.filter((w) => !w());
  }

  close(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.closedBy = { code, reason };
    queueMicrotask(() => this.onclose && this.onclose({ code: code || 1005, reason: reason || "", wasClean: true }));
  }

  // ---- the server's side
  accept() {
    this.readyState = 1;
    this.onopen({});
  }

  push(frame) {
    const data = typeof frame === "string" || frame instanceof ArrayBuffer ? frame : JSON.stringify(frame);
    this.onmessage({ data });
  }

  drop(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose({ code, reason, wasClean: false });
  }

  /** The text frames the client sent, parsed. */
  frames(type) {
    return this.sent
      .filter((d) => typeof d === "string")
      .map((d) => JSON.parse(d))
      .filter((f) => !type || f.type === type);
  }

  /** Resolves with the frames of `type` once there are at least `count`. */
  waitFrames(type, count) {
    return new Promise((resolve) => {
      const check = () => {
        const got = this.frames(type);
        if (got.length >= count) {
          resolve(got);
          return true;
        }
        return false;
      };
      if (!check()) this._waiters.push(check);
    });
  }
}

export class FakeEventSource {
  static instances = [];
  static waiters = [];
  static reset() {
    FakeEventSource.instances = [];
    FakeEventSource.waiters = [];
  }
  static nth(n) {
    return waitInstance(FakeEventSource, n);
  }

  constructor(url) {
    this.url = new URL(url);
    this.closed = false;
    this.listeners = {};
    register(FakeEventSource, this);
  }

  addEventListener(type, fn) {
    (this.listeners[type] = this.listeners[type] || []).push(fn);
  }

  close() {
    this.closed = true;
  }

  // ---- the server's side
  accept() {
    this.onopen({});
  }

  /** A message event: `data` is JSON-encoded, `id` the cursor map. */
  message(data, id) {
    this.onmessage({ data: JSON.stringify(data), lastEventId: id || "" });
  }

  event(type, data) {
    const ev = { type, data: JSON.stringify(data), lastEventId: "" };
    if (type === "error") this.onerror(ev);
    for (const fn of this.listeners[type] || []) fn(ev);
  }

  fail() {
    this.onerror({ type: "error" });
  }
}

/** A fetch() whose requests wait until the test answers them. */
export class FakeFetch {
  constructor() {
    this.requests = [];
    this.waiters = [];
    this.fetch = (url, init) => {
      const req = { url: new URL(url), init, aborted: false };
      const promise = new Promise((resolve, reject) => {
        req.respond = (status, body) =>
          resolve(
            new Response(typeof body === "string" ? body : JSON.stringify(body), {
              status,
              headers: { "Content-Type": "application/json" },
            })
          );
        req.fail = (err) => reject(err);
      });
      if (init && init.signal) {
        init.signal.addEventListener("abort", () => {
          req.aborted = true;
          req.fail(new DOMException("aborted", "AbortError"));
        });
      }
      this.requests.push(req);
      this.waiters = this.waiters.filter((w) => {
        if (this.requests.length > w.n) {
          w.resolve(this.requests[w.n]);
          return false;
        }
        return true;
      });
      return promise;
    };
  }

  nth(n) {
    if (this.requests.length > n) return Promise.resolve(this.requests[n]);
    return new Promise((resolve) => this.waiters.push({ n, resolve }));
  }
}

/** Resolves on the next call of a listener made with `recorder()`. */
export function recorder() {
  const calls = [];
  let waiters = [];
  const fn = (...args) => {
    calls.push(args);
    waiters = waiters.filter((w) => {
      if (calls.length >= w.count) {
        w.resolve(calls);
        return false;
      }
      return true;
    });
  };
  fn.calls = calls;
  fn.wait = (count) =>
    calls.length >= count ? Promise.resolve(calls) : new Promise((resolve) => waiters.push({ count, resolve }));
  return fn;
}

/** Session options for tests: reconnect after 1 ms, no jitter, no open timeout in practice. */
export const FAST = { backoff: { base: 1, max: 1 }, random: () => 0, openTimeout: 60000 };

/** Makes the fakes the globals WebSocket, EventSource and fetch; returns the FakeFetch. */
export function installFakes() {
  FakeWebSocket.reset();
  FakeEventSource.reset();
  const fetcher = new FakeFetch();
  globalThis.WebSocket = FakeWebSocket;
  globalThis.EventSource = FakeEventSource;
  globalThis.__realFetch = globalThis.__realFetch || globalThis.fetch;
  globalThis.fetch = fetcher.fetch;
  return fetcher;
}

/** Undoes installFakes(). */
export function removeFakes() {
  delete globalThis.WebSocket;
  delete globalThis.EventSource;
  globalThis.fetch = globalThis.__realFetch;
}

/**
 * The set-up of a describe() block of Session tests: before each test the fakes
 * are installed (`t.fetcher` is that test's FakeFetch); after it the session the
 * test put in `t.conn` is closed and the fakes are removed.
 */
export function sessionTest() {
  const t = { conn: null, fetcher: null };
  beforeEach(() => {
    t.fetcher = installFakes();
  });
  afterEach(() => {
    if (t.conn) t.conn.close();
    t.conn = null;
    removeFakes();
  });
  return t;
}
