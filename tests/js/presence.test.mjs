// Presence in longconn.js's Session: session.presence(topic), onJoin / onLeave /
// onPresenceGap subscription options and onDirect, against a fake WebSocket.
// Run: node --test tests/js/*.test.mjs (npm test)
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { FakeWebSocket, FakeEventSource, FAST, sessionTest } from "./fakes.mjs";

const require = createRequire(import.meta.url);
const LongConn = require("../../tornado_longconn/static/longconn.js");

describe("Session presence", () => {
  const t = sessionTest();

  test("onJoin / onLeave ask for presence events and receive them in order", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const seen = [];
    const room = t.conn.subscribe("room:1", {
      params: { token: "t" },
      onJoin(member, info) {
        seen.push(["join", member.client, info.topic, info.reason]);
      },
      onLeave(member, info) {
        seen.push(["leave", member.client, info.topic, info.reason]);
      },
      onPresenceGap(info) {
        seen.push(["gap", info.topic, info.reason]);
      },
    });
    t.conn.subscribe("dm:ann");
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const [s1, s2] = ws.frames("subscribe");
    assert.deepEqual(s1.params, { token: "t", presence: true });
    assert.equal(s2.params, undefined);
    const ann = { client: "c1", user: "ann", info: null, since: 1.5, transport: "websocket" };
    // an event before `subscribed` is not delivered
    ws.push({ type: "join", topic: "room:1", member: ann });
    ws.push({ type: "subscribed", id: s1.id, topic: "room:1", cursor: "e-1" });
    ws.push({ type: "subscribed", id: s2.id, topic: "dm:ann", cursor: "e-1" });
    await room.ready;
    ws.push({ type: "join", topic: "room:1", member: ann });
    ws.push({ type: "join", topic: "dm:ann", member: ann }); // no handler: ignored
    ws.push({ type: "leave", topic: "room:1", member: ann, reason: "expired" });
    ws.push({ type: "presence_gap", topic: "room:1", reason: "reconnect" });
    assert.deepEqual(seen, [
      ["join", "c1", "room:1", null],
      ["leave", "c1", "room:1", "expired"],
      ["gap", "room:1", "reconnect"],
    ]);
  });

  test("presence() answers a page of members and the counts; errors reject", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    await assert.rejects(t.conn.presence("room:1"), (e) => e.code === "disconnected");
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    await assert.rejects(t.conn.presence("a,b"), (e) => e.code === "bad_request");
    const first = t.conn.presence("room:1", { limit: 2 });
    const refused = t.conn.presence("secret", { cursor: "17" });
    const [p1, p2] = ws.frames("presence");
    assert.deepEqual(p1, { type: "presence", id: p1.id, topic: "room:1", limit: 2 });
    assert.deepEqual(p2, { type: "presence", id: p2.id, topic: "secret", cursor: "17" });
    const members = [{ client: "c1", user: "ann", info: { n: 1 }, since: 2, transport: "sse" }];
    ws.push({ type: "presence", id: p1.id, topic: "room:1", members, cursor: "5", connections: 3, users: 2 });
    ws.push({ type: "error", id: p2.id, code: "forbidden", status: 403, reason: "presence refused" });
    assert.deepEqual(await first, { topic: "room:1", members, cursor: "5", connections: 3, users: 2 });
    await assert.rejects(refused, (e) => e instanceof LongConn.LongConnError && e.code === "forbidden");
  });

  test("a direct message reaches onDirect and `direct` listeners", async () => {
    const got = [];
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST, onDirect: (data) => got.push(["option", data]) });
    t.conn.on("direct", (data) => got.push(["listener", data]));
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.push({ type: "direct", data: { text: "hi" } });
    assert.deepEqual(got, [
      ["option", { text: "hi" }],
      ["listener", { text: "hi" }],
    ]);
  });
});

describe("Session presence over SSE and long-poll", () => {
  const t = sessionTest();

  test("SSE sends the presence client and presence=1, and delivers join / leave events", async () => {
    t.conn = LongConn.session({ sseUrl: "http://h/sse", transport: "sse", presenceClient: "tab-1", ...FAST });
    const seen = [];
    t.conn.subscribe("room:1", {
      onJoin: (m, info) => seen.push(["join", m.client, info.topic]),
      onLeave: (m, info) => seen.push(["leave", m.client, info.reason]),
    });
    const es = await FakeEventSource.nth(0);
    assert.equal(es.url.searchParams.get("client"), "tab-1");
    assert.equal(es.url.searchParams.get("presence"), "1");
    es.accept();
    es.event("ready", { cursors: { "room:1": "e-1" } });
    const ann = { client: "c1", user: "ann", info: null, since: 1, transport: "sse" };
    es.event("join", { type: "join", topic: "room:1", member: ann });
    es.event("leave", { type: "leave", topic: "room:1", member: ann, reason: "left" });
    assert.deepEqual(seen, [
      ["join", "c1", "room:1"],
      ["leave", "c1", "left"],
    ]);
  });

  test("a long-poll carries the session's presence client; no presence=1 without handlers", async () => {
    t.conn = LongConn.session({ pollUrl: "http://h/poll", transport: "longpoll", ...FAST });
    t.conn.subscribe("a");
    const poll = await t.fetcher.nth(0);
    assert.match(poll.url.searchParams.get("client"), /^[0-9a-f]{16}$/);
    assert.equal(poll.url.searchParams.get("client"), t.conn.presenceClient);
    assert.equal(poll.url.searchParams.get("presence"), null);
  });
});

describe("Session presence over HTTP: long-poll events, direct messages, disconnects", () => {
  const t = sessionTest();

  test("a long-poll asks presence=1 and delivers the answer's events in order", async () => {
    const direct = [];
    t.conn = LongConn.session({ pollUrl: "http://h/poll", transport: "longpoll", onDirect: (d) => direct.push(d), ...FAST });
    const seen = [];
    t.conn.subscribe("room:1", {
      onJoin: (m, info) => seen.push(["join", m.client, info.topic]),
      onLeave: (m, info) => seen.push(["leave", m.client, info.reason]),
      onPresenceGap: (info) => seen.push(["gap", info.reason]),
    });
    const first = await t.fetcher.nth(0);
    assert.equal(first.url.searchParams.get("presence"), "1");
    const me = { client: t.conn.presenceClient, user: null, info: null, since: 1, transport: "longpoll" };
    const bob = { client: "b", user: "bob", info: null, since: 2, transport: "websocket" };
    first.respond(200, {
      messages: [],
      cursors: { "room:1": "e-1" },
      resync: [],
      errors: [],
      events: [
        { type: "join", topic: "room:1", member: me },
        { type: "join", topic: "room:1", member: bob },
        { type: "direct", data: { text: "hi" } },
        { type: "leave", topic: "room:1", member: bob, reason: "expired" },
        { type: "presence_gap", topic: "room:1", reason: "overflow" },
      ],
    });
    const second = await t.fetcher.nth(1);
    assert.equal(second.url.searchParams.get("presence"), "1");
    assert.deepEqual(seen, [
      ["join", t.conn.presenceClient, "room:1"],
      ["join", "b", "room:1"],
      ["leave", "b", "expired"],
      ["gap", "overflow"],
    ]);
    assert.deepEqual(direct, [{ text: "hi" }]);
  });

  test("a long-poll answered `disconnected` closes with its close code (4403: fatal)", async () => {
    const statuses = [];
    let onClosed;
    const closedOnce = new Promise((resolve) => (onClosed = resolve));
    const onStatus = (s) => {
      statuses.push(s);
      if (s.state === "closed") onClosed();
    };
    t.conn = LongConn.session({ pollUrl: "http://h/poll", transport: "longpoll", onStatus, ...FAST });
    t.conn.subscribe("a");
    const old = t.conn.presenceClient;
    const poll = await t.fetcher.nth(0);
    poll.respond(403, { code: "disconnected", close_code: 4403, reason: "revoked" });
    await closedOnce;
    const closed = statuses.filter((s) => s.state === "closed");
    assert.equal(closed.length, 1);
    assert.deepEqual([closed[0].code, closed[0].reason, closed[0].fatal], [4403, "revoked", true]);
    assert.notEqual(t.conn.presenceClient, old); // a new id for a new session
  });

  test("SSE delivers `direct` and ends at `disconnect` with its close code", async () => {
    const direct = [];
    const statuses = [];
    t.conn = LongConn.session({
      sseUrl: "http://h/sse",
      transport: "sse",
      presenceClient: "tab-1",
      onDirect: (d) => direct.push(d),
      onStatus: (s) => statuses.push(s),
      ...FAST,
    });
    t.conn.subscribe("room:1");
    const es = await FakeEventSource.nth(0);
    es.accept();
    es.event("ready", { cursors: { "room:1": "e-1" } });
    es.event("direct", { type: "direct", data: 7 });
    es.event("disconnect", { type: "disconnect", code: 4401, reason: "expired" });
    assert.deepEqual(direct, [7]);
    const closed = statuses.filter((s) => s.state === "closed");
    assert.deepEqual([closed[0].code, closed[0].fatal], [4401, true]);
    assert.equal(t.conn.presenceClient, "tab-1"); // the application's own id is kept
  });
});
