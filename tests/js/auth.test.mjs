// Token authentication in longconn.js's Session: getToken sends {"type":"auth"} first
// on every WebSocket, subscribes once "authenticated", and refreshes the token
// before the identity expires. Against a fake WebSocket.
// Run: node --test tests/js/*.test.mjs (npm test)
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { FakeWebSocket, FAST, sessionTest } from "./fakes.mjs";

const require = createRequire(import.meta.url);
const LongConn = require("../../tornado_longconn/static/longconn.js");

describe("Session token authentication", () => {
  const t = sessionTest();

  test("auth is the first frame; subscribes only once authenticated", async () => {
    const reasons = [];
    const authed = [];
    t.conn = LongConn.session({
      url: "ws://h/ws",
      ...FAST,
      getToken: async (reason) => {
        reasons.push(reason);
        return "tok-1";
      },
      onAuthenticated: (info) => authed.push(info),
    });
    t.conn.subscribe("room:1");
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const [auth] = await ws.waitFrames("auth", 1);
    assert.equal(auth.token, "tok-1");
    assert.deepEqual(reasons, ["open"]);
    assert.equal(ws.frames("subscribe").length, 0); // not before the answer
    ws.push({ type: "authenticated", id: auth.id, user: "ann", expires_in: 3600 });
    const [sub] = await ws.waitFrames("subscribe", 1);
    assert.equal(sub.topic, "room:1");
    assert.deepEqual(authed, [{ user: "ann", expiresIn: 3600 }]);
    assert.deepEqual(
      ws.sent.map((d) => JSON.parse(d).type),
      ["auth", "subscribe"]
    );
  });

  test("refreshes with a new token before the identity expires", async () => {
    let n = 0;
    const authed = [];
    let onRefreshed;
    const refreshed = new Promise((resolve) => (onRefreshed = resolve));
    t.conn = LongConn.session({
      url: "ws://h/ws",
      ...FAST,
      refreshMargin: 30000,
      getToken: (reason) => `tok-${++n}-${reason}`,
      onAuthenticated: (info) => {
        authed.push(info);
        if (authed.length === 2) onRefreshed();
      },
    });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const [auth] = await ws.waitFrames("auth", 1);
    // 0.04 s left: the refresh comes half-way (the margin is longer than the lifetime)
    ws.push({ type: "authenticated", id: auth.id, user: "ann", expires_in: 0.04 });
    const [refresh] = await ws.waitFrames("refresh", 1);
    assert.equal(refresh.token, "tok-2-refresh");
    ws.push({ type: "authenticated", id: refresh.id, user: "ann", expires_in: 3600 });
    await refreshed;
    assert.deepEqual(authed.map((a) => a.expiresIn), [0.04, 3600]);
    assert.equal(ws.frames("refresh").length, 1); // the next one is an hour away
  });

  test("a refused token ends the session with unauthorized (4401)", async () => {
    const errors = [];
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST, getToken: () => "forged", onError: (e) => errors.push(e) });
    const sub = t.conn.subscribe("room:1");
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const [auth] = await ws.waitFrames("auth", 1);
    ws.push({ type: "error", id: auth.id, code: "unauthorized", status: 401, reason: "invalid token" });
    await new Promise((resolve) => setImmediate(resolve)); // the close frame comes next
    ws.drop(4401, "invalid token");
    await assert.rejects(sub.ready, (e) => e.code === "unauthorized");
    assert.equal(t.conn.state, "closed");
    assert.equal(errors[0].code, "unauthorized");
    assert.equal(FakeWebSocket.instances.length, 1); // no reconnect
  });

  test("an identity that expired without refresh (4401 expired): reconnect with a new token", async () => {
    let n = 0;
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST, getToken: () => `tok-${++n}` });
    const first = await FakeWebSocket.nth(0);
    first.accept();
    const [auth] = await first.waitFrames("auth", 1);
    first.push({ type: "authenticated", id: auth.id, user: "ann", expires_in: 3600 });
    first.drop(4401, "expired");
    const second = await FakeWebSocket.nth(1);
    second.accept();
    const [again] = await second.waitFrames("auth", 1);
    assert.equal(again.token, "tok-2");
    assert.notEqual(t.conn.state, "closed");
  });

  test("no token on open: the connection is dropped and tried again", async () => {
    let calls = 0;
    t.conn = LongConn.session({
      url: "ws://h/ws",
      ...FAST,
      getToken: () => {
        calls++;
        if (calls === 1) throw new Error("login service down");
        return "tok";
      },
    });
    const first = await FakeWebSocket.nth(0);
    first.accept();
    const second = await FakeWebSocket.nth(1);
    assert.ok(first.closedBy);
    second.accept();
    const [auth] = await second.waitFrames("auth", 1);
    assert.equal(auth.token, "tok");
  });
});
