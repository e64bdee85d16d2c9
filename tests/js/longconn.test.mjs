// Unit tests of longconn.js's pure logic and of its Session (the subscriptions
// protocol v1) against fake transports. Run: node --test tests/js/*.test.mjs (npm test)
import { test, describe, beforeEach, afterEach } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { FakeWebSocket, FakeEventSource, FAST, installFakes, recorder, removeFakes, sessionTest } from "./fakes.mjs";

const require = createRequire(import.meta.url);
const LongConn = require("../../tornado_longconn/static/longconn.js");
const I = LongConn._internal;

// ------------------------------------------------------------------ pure logic

describe("backoffDelay", () => {
  test("is uniform in [0, min(max, base * 2^attempt))", () => {
    for (let attempt = 0; attempt < 12; attempt++) {
      const ceiling = Math.min(8000, 250 * 2 ** attempt);
      assert.equal(LongConn.backoffDelay(attempt, 250, 8000, () => 0), 0);
      const top = LongConn.backoffDelay(attempt, 250, 8000, () => 0.999999);
      assert.ok(top < ceiling && top >= ceiling - 1, `${attempt}: ${top} vs ${ceiling}`);
      assert.equal(LongConn.backoffDelay(attempt, 250, 8000, () => 0.5), Math.floor(ceiling / 2));
    }
  });

  test("a huge attempt count stays at the cap", () => {
    assert.equal(LongConn.backoffDelay(5000, 500, 10000, () => 0.5), 5000);
  });
});

describe("cursors", () => {
  test("parseCursor reads <epoch>-<offset> and nothing else", () => {
    assert.deepEqual(LongConn.parseCursor("ab12-7"), { epoch: "ab12", offset: 7 });
    for (const bad of ["ab12-07", "ab12", "-1", "a b-1", "", null, 7, "ab12-1-2"]) {
      assert.equal(LongConn.parseCursor(bad), null, String(bad));
    }
  });

  test("isAfter drops only same-epoch duplicates", () => {
    assert.equal(LongConn.isAfter("ab12-5", "ab12-4"), true);
    assert.equal(LongConn.isAfter("ab12-4", "ab12-4"), false);
    assert.equal(LongConn.isAfter("ab12-3", "ab12-4"), false);
    assert.equal(LongConn.isAfter("ab12-10", "ab12-9"), true);
    assert.equal(LongConn.isAfter("cd34-1", "ab12-900"), true);
  });

  test("advanceCursor fills, moves forward, never back or across epochs", () => {
    assert.equal(I.advanceCursor(null, "e-3"), "e-3");
    assert.equal(I.advanceCursor("e-3", "e-5"), "e-5");
    assert.equal(I.advanceCursor("e-5", "e-3"), "e-5");
    assert.equal(I.advanceCursor("e-5", "f-1"), "e-5");
    assert.equal(I.advanceCursor("e-5", null), "e-5");
    assert.equal(I.advanceCursor(null, "junk"), null);
  });

  test("cursor maps round-trip and keep the order", () => {
    const text = I.encodeCursorMap([["room:1", "a1b2-17"], ["dm:ann", null], ["n/x+y@z.q", "c-0"]]);
    assert.equal(text, "room:1=a1b2-17,dm:ann=,n/x+y@z.q=c-0");
    assert.deepEqual({ ...I.parseCursorMap(text) }, { "room:1": "a1b2-17", "dm:ann": null, "n/x+y@z.q": "c-0" });
    assert.equal(I.encodeCursorMap({ a: "e-1", b: null }), "a=e-1,b=");
    assert.deepEqual({ ...I.parseCursorMap("") }, {});
  });

  test("malformed cursor maps are refused", () => {
    for (const bad of ["room", "room=x-", "a=e-1,a=e-2", "bad topic=e-1", "=e-1", "a=e-01", null]) {
      assert.equal(I.parseCursorMap(bad), null, String(bad));
    }
  });

  test("validTopic follows the spec's alphabet and length", () => {
    for (const ok of ["room:1", "dm:ann", "a", "x".repeat(128), "A-z_0.9:@/+"]) assert.ok(LongConn.validTopic(ok), ok);
    for (const bad of ["", "x".repeat(129), "a,b", "a=b", "a b", "caf\u00e9", "a\n", 7, null]) {
      assert.ok(!LongConn.validTopic(bad), String(bad));
    }
  });
});

describe("frames", () => {
  test("text frames are classified by type; a message has none", () => {
    assert.equal(I.parseFrame('{"topic":"t","cursor":"e-1","data":1}').kind, "message");
    for (const type of ["welcome", "subscribed", "resync", "unsubscribed", "published", "result", "error", "ping"]) {
      assert.equal(I.parseFrame(JSON.stringify({ type })).kind, type);
    }
    assert.equal(I.parseFrame('{"type":"from-the-future"}').kind, "unknown");
    for (const bad of ["not json", "[1]", "null", "3", '{"data":1}']) assert.equal(I.parseFrame(bad), null, bad);
  });

  test("binary frames: 2-byte big-endian header length, JSON header, raw payload", () => {
    const payload = new Uint8Array(300).map((_, i) => i & 255);
    const frame = I.encodeBinaryFrame({ type: "publish", id: 5, topic: "caf\u00e9" }, payload);
    const header = new TextEncoder().encode('{"type":"publish","id":5,"topic":"caf\u00e9"}');
    assert.equal((frame[0] << 8) | frame[1], header.length);
    assert.deepEqual(frame.subarray(2, 2 + header.length), header);
    const back = I.decodeBinaryFrame(frame.buffer);
    assert.deepEqual(back.header, { type: "publish", id: 5, topic: "caf\u00e9" });
    assert.ok(back.payload instanceof Uint8Array);
    assert.deepEqual(Array.from(back.payload), Array.from(payload));
    assert.equal(back.payload.buffer.byteLength, 300); // a buffer of its own
    // A view into a larger buffer is encoded from its own bytes only.
    const big = new Uint8Array([9, 9, 1, 2, 3, 9]);
    const sub = I.decodeBinaryFrame(I.encodeBinaryFrame({ topic: "t" }, big.subarray(2, 5)));
    assert.deepEqual(Array.from(sub.payload), [1, 2, 3]);
    assert.deepEqual(Array.from(I.decodeBinaryFrame(I.encodeBinaryFrame({ topic: "t" }, new ArrayBuffer(0))).payload), []);
  });

  test("SSE and long-poll message objects; base64 binary payloads become bytes", () => {
    assert.deepEqual(I.messageFromObject({ topic: "t", cursor: "e-1", data: { a: 1 } }), ["t", "e-1", { a: 1 }, false]);
    const [, , bytes, binary] = I.messageFromObject({ topic: "t", cursor: null, data: "AAH/", binary: true });
    assert.equal(binary, true);
    assert.deepEqual(Array.from(bytes), [0, 1, 255]);
    assert.equal(I.messageFromObject({ topic: "t", data: "***", binary: true }), null);
    assert.equal(I.messageFromObject({ data: 1 }), null);
  });

  test("malformed binary frames are refused", () => {
    const enc = (s) => new TextEncoder().encode(s);
    const frame = (len, head) => new Uint8Array([len >> 8, len & 255, ...enc(head)]);
    assert.equal(I.decodeBinaryFrame(new Uint8Array([0])), null);
    assert.equal(I.decodeBinaryFrame(frame(10, "{}")), null); // header longer than the frame
    assert.equal(I.decodeBinaryFrame(frame(3, "{x}")), null); // not JSON
    assert.equal(I.decodeBinaryFrame(frame(3, "[1]")), null); // not an object
    assert.equal(I.decodeBinaryFrame(new Uint8Array([0, 2, 0xff, 0xfe])), null); // not UTF-8
    assert.equal(I.decodeBinaryFrame("text"), null);
    assert.throws(() => I.encodeBinaryFrame({ topic: "x".repeat(70000) }, new Uint8Array(1)), { code: "too_large" });
  });
});

describe("errors", () => {
  test("LongConnError is an Error with code, status, topic and id", () => {
    const e = new LongConn.LongConnError("nope", "forbidden", 403, { topic: "t", id: 3 });
    assert.ok(e instanceof Error && e instanceof LongConn.LongConnError);
    assert.equal(e.name, "LongConnError");
    assert.deepEqual([e.code, e.status, e.topic, e.id, e.message], ["forbidden", 403, "t", 3, "nope"]);
    assert.match(String(e.stack), /LongConnError/);
  });

  test("an error frame becomes a LongConnError; the status comes from the code when absent", () => {
    const e = I.errorFromFrame({ type: "error", id: 4, code: "limit", reason: "too many topics" });
    assert.deepEqual([e.code, e.status, e.id, e.message], ["limit", 429, 4, "too many topics"]);
    assert.equal(I.errorFromFrame({}).code, "internal");
    assert.equal(LongConn.ErrorCode.timeout, 504);
  });
});

describe("Pending", () => {
  function manualTimers() {
    const timers = new Map();
    let next = 1;
    return {
      setTimeout: (fn, ms) => (timers.set(next, { fn, ms }), next++),
      clearTimeout: (t) => timers.delete(t),
      fire: () => [...timers.entries()].forEach(([t, { fn }]) => (timers.delete(t), fn())),
      count: () => timers.size,
    };
  }

  test("ids are unique; answers settle their own request", async () => {
    const p = new I.Pending(manualTimers());
    const a = p.add("call", 1000);
    const b = p.add("call", 1000);
    assert.notEqual(a.id, b.id);
    assert.equal(p.resolve(b.id, "B"), true);
    assert.equal(p.resolve(b.id, "again"), false);
    assert.equal(await b.promise, "B");
    assert.equal(p.size(), 1);
  });

  test("a timeout rejects with code timeout; an answer stops the timer", async () => {
    const timers = manualTimers();
    const p = new I.Pending(timers);
    const slow = p.add("call", 50);
    const fast = p.add("publish", 50);
    p.resolve(fast.id, 1);
    assert.equal(timers.count(), 1);
    timers.fire();
    await assert.rejects(slow.promise, { name: "LongConnError", code: "timeout", id: slow.id });
    assert.equal(p.size(), 0);
  });

  test("rejectAll rejects every request with its own error", async () => {
    const p = new I.Pending(manualTimers());
    const reqs = [p.add("call", 0), p.add("publish", 0)];
    p.rejectAll(new LongConn.LongConnError("gone", "disconnected", null));
    for (const r of reqs) await assert.rejects(r.promise, { code: "disconnected", id: r.id });
    assert.equal(p.size(), 0);
  });
});

describe("stream decoding (single-topic API)", () => {
  test("envelope, resync notice, plain JSON and text", () => {
    assert.deepEqual(I.defaultDecode('{"cursor":"e-1","data":{"a":1}}', "websocket"), {
      data: { a: 1 },
      cursor: "e-1",
      enveloped: true,
    });
    assert.deepEqual(I.defaultDecode('{"type":"resync","cursor":"f-0","reason":"epoch"}', "websocket"), {
      control: "resync",
      cursor: "f-0",
      reason: "epoch",
    });
    assert.deepEqual(I.defaultDecode("hello", "sse"), { data: "hello", cursor: null });
  });
});

// ------------------------------------------------------------------ Session over WebSocket

describe("Session over WebSocket", () => {
  const t = sessionTest();

  test("subscribes every topic on open, each from its own cursor", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", params: { user: "ann" }, ...FAST });
    t.conn.subscribe("room:1", { cursor: "e-4", params: { x: 1 } });
    t.conn.subscribe("dm:ann");
    const ws = await FakeWebSocket.nth(0);
    assert.equal(ws.url.searchParams.get("user"), "ann");
    assert.equal(ws.url.searchParams.get("cursor"), null);
    ws.accept();
    const subs = ws.frames("subscribe");
    assert.deepEqual(
      subs.map((f) => [f.topic, f.cursor, f.params]),
      [["room:1", "e-4", { x: 1 }], ["dm:ann", undefined, undefined]]
    );
    assert.notEqual(subs[0].id, subs[1].id);
  });

  test("delivers per topic, drops duplicates and messages before `subscribed`", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const room = recorder();
    const dm = recorder();
    const a = t.conn.subscribe("room:1", { cursor: "e-4", onMessage: room });
    const b = t.conn.subscribe("dm:ann", { onMessage: dm });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.push({ type: "welcome", v: 1, client: "c1" });
    assert.equal(t.conn.clientId, "c1");
    const [s1, s2] = ws.frames("subscribe");
    ws.push({ topic: "room:1", cursor: "e-5", data: "early" }); // before subscribed: not ours yet
    ws.push({ type: "subscribed", id: s1.id, topic: "room:1", cursor: "e-6" });
    ws.push({ type: "subscribed", id: s2.id, topic: "dm:ann", cursor: "e-9" });
    assert.equal(await a.ready, a);
    await b.ready;
    assert.equal(a.cursor, "e-4"); // history after e-4 follows: not moved to the head
    assert.equal(b.cursor, "e-9"); // no cursor: starts at the head
    ws.push({ topic: "room:1", cursor: "e-5", data: "five" });
    ws.push({ topic: "room:1", cursor: "e-6", data: "six" });
    ws.push({ topic: "room:1", cursor: "e-6", data: "six again" });
    ws.push({ topic: "dm:ann", cursor: "e-10", data: { text: "hi" } });
    ws.push({ topic: "other", cursor: "e-1", data: "not subscribed" });
    assert.deepEqual(room.calls.map((c) => c[0]), ["five", "six"]);
    assert.deepEqual(room.calls[1][2], { topic: "room:1", transport: "websocket", binary: false });
    assert.deepEqual(dm.calls.map((c) => [c[0], c[1]]), [[{ text: "hi" }, "e-10"]]);
    assert.equal(t.conn.stats.duplicates, 1);
    assert.equal(a.state, "active");
  });

  test("after a reconnect every topic resumes from its own last cursor", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const got = recorder();
    t.conn.subscribe("a", { onMessage: got });
    t.conn.subscribe("b", { cursor: "e-1", onMessage: got });
    let ws = await FakeWebSocket.nth(0);
    ws.accept();
    for (const f of ws.frames("subscribe")) ws.push({ type: "subscribed", id: f.id, topic: f.topic, cursor: "e-2" });
    ws.push({ topic: "a", cursor: "e-3", data: "a3" });
    ws.push({ topic: "b", cursor: "e-2", data: "b2" });
    ws.drop(1006);
    ws = await FakeWebSocket.nth(1);
    ws.accept();
    const again = ws.frames("subscribe");
    assert.deepEqual(again.map((f) => [f.topic, f.cursor]), [["a", "e-3"], ["b", "e-2"]]);
    assert.deepEqual(t.conn.subscriptions().map((s) => s.state), ["pending", "pending"]);
    for (const f of again) ws.push({ type: "subscribed", id: f.id, topic: f.topic, cursor: "e-4" });
    ws.push({ topic: "a", cursor: "e-3", data: "a3 replayed" });
    ws.push({ topic: "a", cursor: "e-4", data: "a4" });
    assert.deepEqual(got.calls.map((c) => c[0]), ["a3", "b2", "a4"]);
  });

  test("a resync notice moves the topic's cursor and is reported", async () => {
    const onResync = recorder();
    t.conn = LongConn.session({ url: "ws://h/ws", onResync, ...FAST });
    const topicResync = recorder();
    const got = recorder();
    const sub = t.conn.subscribe("a", { cursor: "old-7", onMessage: got, onResync: topicResync });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const [f] = ws.frames("subscribe");
    ws.push({ type: "subscribed", id: f.id, topic: "a", cursor: "new-2" });
    ws.push({ type: "resync", topic: "a", cursor: "new-0", reason: "epoch" });
    ws.push({ topic: "a", cursor: "new-1", data: 1 });
    assert.equal(sub.cursor, "new-1");
    assert.deepEqual(topicResync.calls[0][0], { topic: "a", cursor: "new-0", reason: "epoch", transport: "websocket" });
    assert.equal(onResync.calls.length, 1);
    assert.deepEqual(got.calls.map((c) => c[0]), [1]);
  });

  test("publish and call resolve with their answers; errors reject with code and status", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const published = t.conn.publish("room:1", { text: "hi" });
    const called = t.conn.call("rooms.list", { limit: 2 });
    const refused = t.conn.call("admin.wipe");
    const [pub] = ws.frames("publish");
    assert.deepEqual(pub, { type: "publish", id: pub.id, topic: "room:1", data: { text: "hi" } });
    const [c1, c2] = ws.frames("call");
    assert.deepEqual(c1.params, { limit: 2 });
    assert.equal("params" in c2, false);
    ws.push({ type: "result", id: c1.id, result: ["lobby"] });
    ws.push({ type: "published", id: pub.id, topic: "room:1", cursor: "e-18" });
    ws.push({ type: "error", id: c2.id, code: "forbidden", status: 403, reason: "admins only" });
    assert.deepEqual(await published, { topic: "room:1", cursor: "e-18" });
    assert.deepEqual(await called, ["lobby"]);
    await assert.rejects(refused, (e) => {
      assert.ok(e instanceof LongConn.LongConnError);
      assert.deepEqual([e.code, e.status, e.message], ["forbidden", 403, "admins only"]);
      return true;
    });
  });

  test("a call without an answer times out; a late answer is ignored", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const slow = t.conn.call("slow", null, { timeout: 5 });
    await assert.rejects(slow, { code: "timeout" });
    ws.push({ type: "result", id: ws.frames("call")[0].id, result: "late" });
    assert.equal(t.conn._pending.size(), 0);
  });

  test("pending requests reject with code disconnected when the connection drops", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const called = t.conn.call("x");
    const published = t.conn.publish("t", 1);
    ws.drop(1006);
    await assert.rejects(called, { code: "disconnected" });
    await assert.rejects(published, { code: "disconnected" });
    // Offline: no WebSocket, no publishUrl.
    await assert.rejects(t.conn.call("x"), { code: "disconnected" });
    await assert.rejects(t.conn.publish("t", 1), { code: "disconnected" });
  });

  test("binary messages arrive as Uint8Array; binary publish sends a binary frame", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const got = recorder();
    t.conn.subscribe("files", { onMessage: got });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.push({ type: "subscribed", id: ws.frames("subscribe")[0].id, topic: "files", cursor: null });
    const frame = I.encodeBinaryFrame({ topic: "files", cursor: "e-1" }, new Uint8Array([1, 2, 255]));
    ws.push(frame.buffer);
    assert.deepEqual(Array.from(got.calls[0][0]), [1, 2, 255]);
    assert.equal(got.calls[0][1], "e-1");
    assert.equal(got.calls[0][2].binary, true);
    const p = t.conn.publish("files", new Uint8Array([7, 8]));
    const sent = I.decodeBinaryFrame(ws.sent.find((d) => typeof d !== "string"));
    assert.equal(sent.header.type, "publish");
    assert.deepEqual(Array.from(sent.payload), [7, 8]);
    ws.push({ type: "published", id: sent.header.id, topic: "files", cursor: "e-2" });
    assert.equal((await p).cursor, "e-2");
  });

  test("a refused subscription rejects `ready`, reports onError and is not sent again", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const onError = recorder();
    const sub = t.conn.subscribe("secret", { onError });
    t.conn.subscribe("open");
    let ws = await FakeWebSocket.nth(0);
    ws.accept();
    const [f] = ws.frames("subscribe");
    ws.push({ type: "error", id: f.id, code: "forbidden", status: 403, reason: "no" });
    await assert.rejects(sub.ready, { code: "forbidden", topic: "secret" });
    assert.equal(onError.calls[0][0].code, "forbidden");
    assert.equal(sub.state, "closed");
    ws.drop();
    ws = await FakeWebSocket.nth(1);
    ws.accept();
    assert.deepEqual(ws.frames("subscribe").map((x) => x.topic), ["open"]);
  });

  test("unsubscribe, server-ended subscriptions and local checks", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const got = recorder();
    const ended = recorder();
    const a = t.conn.subscribe("a", { onMessage: got });
    t.conn.subscribe("b", { onUnsubscribed: ended });
    assert.throws(() => t.conn.subscribe("a"), { code: "conflict" });
    assert.throws(() => t.conn.subscribe("no spaces"), { code: "bad_request" });
    assert.throws(() => t.conn.subscribe("c", { cursor: "nonsense" }), { code: "bad_request" });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    for (const f of ws.frames("subscribe")) ws.push({ type: "subscribed", id: f.id, topic: f.topic, cursor: "e-1" });
    const done = a.unsubscribe();
    const [u] = ws.frames("unsubscribe");
    assert.equal(u.topic, "a");
    ws.push({ topic: "a", cursor: "e-2", data: "after unsubscribe" });
    ws.push({ type: "unsubscribed", id: u.id, topic: "a" });
    await done;
    assert.equal(got.calls.length, 0);
    ws.push({ type: "unsubscribed", id: null, topic: "b", reason: "revoked" });
    assert.deepEqual(ended.calls[0][0], { topic: "b", reason: "revoked" });
    assert.deepEqual(t.conn.subscriptions(), []);
  });

  test("the answer to a subscription given up before it came is dropped quietly", async () => {
    const onError = recorder();
    t.conn = LongConn.session({ url: "ws://h/ws", onError, ...FAST });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const sub = t.conn.subscribe("secret");
    const [f] = ws.frames("subscribe");
    const done = sub.unsubscribe();
    ws.push({ type: "error", id: f.id, code: "forbidden", status: 403, reason: "no", topic: "secret" });
    const [u] = ws.frames("unsubscribe");
    ws.push({ type: "error", id: u.id, code: "not_found", status: 404, reason: "not subscribed" });
    await done;
    assert.deepEqual(onError.calls, []);
    await assert.rejects(sub.ready, { code: "closed" });
  });

  test("a function is the message handler", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const got = recorder();
    t.conn.subscribe("t", got);
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.push({ type: "subscribed", id: ws.frames("subscribe")[0].id, topic: "t", cursor: "e-1" });
    ws.push({ topic: "t", cursor: "e-2", data: "x" });
    assert.deepEqual(got.calls.map((c) => c[0]), ["x"]);
  });

  test("pings are answered; unknown frame types are ignored", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.push({ type: "ping" });
    ws.push({ type: "from-the-future", x: 1 });
    assert.deepEqual(ws.frames("pong"), [{ type: "pong" }]);
  });

  test("a fatal close code ends the session and its subscriptions", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const sub = t.conn.subscribe("a");
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.drop(4403, "refused");
    await assert.rejects(sub.ready, { code: "forbidden" });
    assert.equal(t.conn.state, "closed");
    assert.throws(() => t.conn.subscribe("b"), { code: "closed" });
  });

  test("a rate-limited close (4429) ends the session without reconnecting", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const sub = t.conn.subscribe("a");
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.drop(4429, "rate limited");
    await assert.rejects(sub.ready, { code: "limit" });
    assert.equal(t.conn.state, "closed");
  });

  test("close() rejects pending requests with code closed", async () => {
    t.conn = LongConn.session({ url: "ws://h/ws", ...FAST });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    const called = t.conn.call("x");
    t.conn.close();
    await assert.rejects(called, { code: "closed" });
    await assert.rejects(t.conn.publish("t", 1), { code: "closed" });
  });
});

// ------------------------------------------------------------------ Session over SSE

describe("Session over SSE", () => {
  const t = sessionTest();

  test("one stream for the topic set, with the cursor map; reopened when the set changes", async () => {
    t.conn = LongConn.session({ sseUrl: "http://h/sse", params: { user: "ann" }, ...FAST });
    const got = recorder();
    const a = t.conn.subscribe("room:1", { cursor: "e-3", onMessage: got });
    const b = t.conn.subscribe("dm:ann", { onMessage: got });
    let es = await FakeEventSource.nth(0);
    assert.equal(es.url.searchParams.get("topics"), "room:1,dm:ann");
    assert.equal(es.url.searchParams.get("cursors"), "room:1=e-3,dm:ann=");
    assert.equal(es.url.searchParams.get("user"), "ann");
    es.accept();
    assert.equal(a.state, "pending");
    es.event("ready", { cursors: { "room:1": "e-3", "dm:ann": "e-9" } });
    await a.ready;
    await b.ready;
    assert.equal(b.cursor, "e-9"); // its start position, from the ready event
    es.message({ topic: "room:1", cursor: "e-4", data: "r4" }, "room:1=e-4,dm:ann=e-9");
    es.message({ topic: "room:1", cursor: "e-4", data: "r4 again" }, "room:1=e-4,dm:ann=e-9");
    t.conn.subscribe("news");
    es = await FakeEventSource.nth(1);
    assert.ok(FakeEventSource.instances[0].closed);
    assert.equal(es.url.searchParams.get("cursors"), "room:1=e-4,dm:ann=e-9,news=");
    assert.deepEqual(got.calls.map((c) => c[0]), ["r4"]);
    assert.equal(t.conn.state, "open");
  });

  test("resync and refused-topic events; a stream error reconnects with the cursors", async () => {
    t.conn = LongConn.session({ sseUrl: "http://h/sse", ...FAST });
    const onError = recorder();
    const resync = recorder();
    const a = t.conn.subscribe("a", { cursor: "old-5", onResync: resync });
    const b = t.conn.subscribe("b", { onError });
    let es = await FakeEventSource.nth(0);
    es.accept();
    es.event("ready", { cursors: { a: "old-5" } }); // b is not accepted: its error follows
    await a.ready;
    assert.equal(b.state, "pending");
    es.event("resync", { topic: "a", cursor: "new-0", reason: "epoch" });
    es.event("error", { topic: "b", code: "forbidden", status: 403, reason: "no" });
    await assert.rejects(b.ready, { code: "forbidden" });
    assert.equal(a.cursor, "new-0");
    assert.equal(resync.calls[0][0].reason, "epoch");
    assert.equal(onError.calls[0][0].code, "forbidden");
    assert.equal(b.state, "closed");
    assert.equal(t.conn.state, "open"); // the other topics go on
    es.fail();
    es = await FakeEventSource.nth(1);
    assert.equal(es.url.searchParams.get("cursors"), "a=new-0");
  });

  test("publish goes to publishUrl; call needs the WebSocket", async () => {
    const fetcher = installFakes();
    t.conn = LongConn.session({ sseUrl: "http://h/sse", publishUrl: "http://h/publish", ...FAST });
    t.conn.subscribe("t");
    (await FakeEventSource.nth(0)).accept();
    const ok = t.conn.publish("t", { n: 1 });
    const req = await fetcher.nth(0);
    assert.equal(req.init.method, "POST");
    assert.deepEqual(JSON.parse(req.init.body), { topic: "t", data: { n: 1 } });
    req.respond(200, { topic: "t", cursor: "e-5" });
    assert.deepEqual(await ok, { topic: "t", cursor: "e-5" });
    const refused = t.conn.publish("t", 2);
    (await fetcher.nth(1)).respond(503, { code: "unavailable", reason: "backend down" });
    await assert.rejects(refused, { code: "unavailable", status: 503, message: "backend down" });
    await assert.rejects(t.conn.call("x"), { code: "unsupported" });
    await assert.rejects(t.conn.publish("t", new Uint8Array(1)), { code: "unsupported" });
  });
});

// ------------------------------------------------------------------ Session over long-poll

describe("Session over long-poll", () => {
  const t = sessionTest();

  test("polls with the cursor map; resync before messages; cursors move forward", async () => {
    t.conn = LongConn.session({ pollUrl: "http://h/poll", pollTimeout: 20, ...FAST });
    const got = recorder();
    const resync = recorder();
    const a = t.conn.subscribe("a", { cursor: "old-3", onMessage: got, onResync: resync });
    const b = t.conn.subscribe("b", { onMessage: got });
    const first = await t.fetcher.nth(0);
    assert.equal(first.url.searchParams.get("topics"), "a,b");
    assert.equal(first.url.searchParams.get("cursors"), "a=old-3,b=");
    assert.equal(first.url.searchParams.get("timeout"), "0");
    first.respond(200, {
      messages: [
        { topic: "a", cursor: "new-1", data: "a1" },
        { topic: "b", cursor: "new-7", data: "b7" },
      ],
      cursors: { a: "new-1", b: "new-7" },
      resync: [{ topic: "a", cursor: "new-0", reason: "epoch" }],
      errors: [],
    });
    await a.ready;
    await b.ready;
    const second = await t.fetcher.nth(1);
    assert.equal(second.url.searchParams.get("cursors"), "a=new-1,b=new-7");
    assert.equal(second.url.searchParams.get("timeout"), "20");
    assert.deepEqual(got.calls.map((c) => c[0]), ["a1", "b7"]);
    assert.equal(resync.calls.length, 1);
    // A timeout answer with positions: a topic without messages gets its start position.
    second.respond(200, { messages: [{ topic: "a", cursor: "new-1", data: "dup" }], cursors: { a: "new-1", b: "new-7" }, resync: [], errors: [] });
    const third = await t.fetcher.nth(2);
    assert.deepEqual(got.calls.map((c) => c[0]), ["a1", "b7"]);
    // Subscribing aborts the waiting request and asks at once with the new set.
    t.conn.subscribe("c");
    const fourth = await t.fetcher.nth(3);
    assert.ok(third.aborted);
    assert.equal(fourth.url.searchParams.get("topics"), "a,b,c");
    assert.equal(fourth.url.searchParams.get("timeout"), "0");
    fourth.respond(200, { messages: [], cursors: { a: "new-1", b: "new-7", c: "new-2" }, resync: [], errors: [] });
    await t.fetcher.nth(4);
    assert.equal(t.conn.subscriptions()[2].cursor, "new-2");
  });

  test("refused topics end; the others go on", async () => {
    t.conn = LongConn.session({ pollUrl: "http://h/poll", ...FAST });
    const a = t.conn.subscribe("a");
    const b = t.conn.subscribe("b");
    (await t.fetcher.nth(0)).respond(200, {
      messages: [],
      cursors: { a: "e-1" },
      resync: [],
      errors: [{ topic: "b", code: "forbidden", status: 403, reason: "no" }],
    });
    await a.ready;
    await assert.rejects(b.ready, { code: "forbidden" });
    const next = await t.fetcher.nth(1);
    assert.equal(next.url.searchParams.get("topics"), "a");
  });

  test("a failed poll reconnects with backoff and the same cursors", async () => {
    t.conn = LongConn.session({ pollUrl: "http://h/poll", ...FAST });
    t.conn.subscribe("a", { cursor: "e-5" });
    (await t.fetcher.nth(0)).respond(200, { messages: [], cursors: { a: "e-5" }, resync: [], errors: [] });
    (await t.fetcher.nth(1)).respond(502, "bad gateway");
    const retry = await t.fetcher.nth(2);
    assert.equal(retry.url.searchParams.get("cursors"), "a=e-5");
  });
});

describe("Session lifecycle", () => {
  beforeEach(() => installFakes());
  afterEach(() => removeFakes());

  test("welcome is reported; switching transport rejects pending requests and resubscribes", async () => {
    const welcome = recorder();
    const conn = LongConn.session({ url: "ws://h/ws", sseUrl: "http://h/sse", onWelcome: welcome, ...FAST });
    const sub = conn.subscribe("a", { cursor: "e-1" });
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.push({ type: "welcome", v: 1, client: "abc" });
    assert.deepEqual(welcome.calls[0][0], { v: 1, client: "abc" });
    ws.push({ type: "subscribed", id: ws.frames("subscribe")[0].id, topic: "a", cursor: "e-1" });
    ws.push({ topic: "a", cursor: "e-2", data: 2 });
    const pending = conn.call("x");
    conn.setTransport("sse");
    await assert.rejects(pending, { code: "disconnected" });
    const es = await FakeEventSource.nth(0);
    assert.equal(es.url.searchParams.get("cursors"), "a=e-2");
    assert.equal(sub.state, "pending");
    es.accept();
    es.event("ready", { cursors: { a: "e-2" } });
    assert.equal(sub.state, "active");
    conn.close();
  });

  test("without topics SSE waits idle, and a stream that never opens still falls back", async () => {
    const fetcher = installFakes();
    const conn = LongConn.session({ sseUrl: "http://h/sse", pollUrl: "http://h/poll", fallbackAfter: 1, ...FAST });
    await new Promise((resolve) => conn.on("status", (s) => s.state === "open" && resolve()));
    assert.equal(conn.transport, "sse");
    assert.equal(FakeEventSource.instances.length, 0); // nothing to stream yet
    conn.subscribe("a");
    (await FakeEventSource.nth(0)).fail(); // refused before it ever opened
    const poll = await fetcher.nth(0);
    assert.equal(conn.transport, "longpoll");
    assert.equal(poll.url.searchParams.get("topics"), "a");
    conn.close();
  });
});

describe("fallback", () => {
  beforeEach(() => installFakes());
  afterEach(() => removeFakes());

  test("a WebSocket that never opens falls back to SSE, and subscriptions follow", async () => {
    const conn = LongConn.session({ url: "ws://h/ws", sseUrl: "http://h/sse", fallbackAfter: 1, ...FAST });
    conn.subscribe("a", { cursor: "e-2" });
    (await FakeWebSocket.nth(0)).drop(1006);
    const es = await FakeEventSource.nth(0);
    assert.equal(es.url.searchParams.get("cursors"), "a=e-2");
    es.accept();
    assert.equal(conn.transport, "sse");
    conn.close();
  });
});

// ------------------------------------------------------------------ WebSocket uploads

describe("WebSocket upload takeover", () => {
  beforeEach(() => installFakes());
  afterEach(() => removeFakes());

  const options = { protocol: "websocket", url: "ws://upload.example/up", rememberUrl: false,
    checksum: false, backoff: { base: 1, max: 1 }, random: () => 0 };

  test("4409 'upload resumed on another connection' is final: no reconnect", { timeout: 5000 }, async () => {
    const done = LongConn.upload(new Blob([new Uint8Array(10)]), options);
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    await ws.waitFrames("start", 1);
    ws.push({ type: "ready", id: "a".repeat(32), offset: 0, size: 10, window: 1, chunk_size: 4 });
    ws.drop(4409, "upload resumed on another connection");
    await assert.rejects(done, (err) => err.fatal === true && err.takenOver === true && err.code === 4409);
    // Rejected at once: a retried close would reconnect instead of rejecting.
    assert.equal(FakeWebSocket.instances.length, 1);
  });

  test("another 4409 (a writer held the upload) is retried with a resume", async () => {
    const done = LongConn.upload(new Blob([new Uint8Array(10)]), options);
    const ws = await FakeWebSocket.nth(0);
    ws.accept();
    ws.push({ type: "ready", id: "b".repeat(32), offset: 0, size: 10, window: 1, chunk_size: 4 });
    ws.drop(4409, "another request is writing this upload");
    const again = await FakeWebSocket.nth(1);
    again.accept();
    const [resume] = await again.waitFrames("resume", 1);
    assert.equal(resume.id, "b".repeat(32));
    again.push({ type: "ready", id: "b".repeat(32), offset: 10, size: 10, window: 1, chunk_size: 4 });
    again.push({ type: "complete", id: "b".repeat(32), size: 10, sha256: "0".repeat(64) });
    const result = await done;
    assert.equal(result.id, "b".repeat(32));
  });
});
