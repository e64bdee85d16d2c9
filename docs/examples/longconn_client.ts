// longconn.js from TypeScript: a chat page with rooms, direct messages and
// notifications on one connection (the subscriptions protocol v1), plus the
// single-stream API and uploads. Type-checked with `tsc --strict` (npm run typecheck).
import * as LongConn from "tornado-longconn";
import type {
  ConnectOptions,
  Connection,
  Cursor,
  ErrorCodeName,
  Json,
  LongConnError,
  MessageMeta,
  Published,
  ResyncInfo,
  Session,
  SessionOptions,
  StatusInfo,
  SubscribeOptions,
  Subscription,
  TopicMessageMeta,
  TopicResyncInfo,
  UploadOptions,
  UploadResult,
  WelcomeInfo,
  AuthenticatedInfo,
} from "tornado-longconn";

/** What this application publishes to a room (any JSON shape you choose). */
interface ChatMessage {
  type: "chat";
  user: string;
  text: string;
}

interface Notification {
  kind: string;
  text: string;
}

/** Where the page keeps each topic's cursor, to resume after a reload. */
const saved = new Map<string, Cursor>();

function showStatus(s: StatusInfo): void {
  const delay = s.state === "waiting" ? ` (retry in ${s.delay ?? 0} ms)` : "";
  console.log(`${s.state} ${s.transport ?? ""}${delay}`, s.fatal === true ? "for good" : "");
}

const options: SessionOptions = {
  url: "/ws",
  sseUrl: "/sse",
  pollUrl: "/poll",
  publishUrl: "/publish",
  params: { user: "ann" },
  backoff: { base: 250, max: 5000 },
  requestTimeout: 5000,
  onStatus: showStatus,
  onWelcome(welcome: WelcomeInfo) {
    console.log("connection", welcome.client, "protocol", welcome.v);
  },
  onResync(info: TopicResyncInfo) {
    console.log("resync of", info.topic, info.reason);
  },
};

const conn: Session = LongConn.session(options);

function roomOptions(room: string): SubscribeOptions<ChatMessage> {
  return {
    cursor: saved.get(`room:${room}`) ?? null,
    params: { room },
    onMessage(msg: ChatMessage, cursor: Cursor | null, meta: TopicMessageMeta) {
      if (cursor !== null) saved.set(meta.topic, cursor);
      console.log(`[${meta.topic} via ${meta.transport}] ${msg.user}: ${msg.text}`);
    },
    onResync(info: TopicResyncInfo) {
      // The history no longer reaches back: reload the room from the server.
      console.log("reload", info.topic, "from", info.cursor);
    },
    onError(error: LongConnError) {
      console.log("refused:", error.code, error.status, error.reason);
    },
    onUnsubscribed(info) {
      console.log("the server ended", info.topic, info.reason);
    },
  };
}

const lobby: Subscription<ChatMessage> = conn.subscribe<ChatMessage>("room:lobby", roomOptions("lobby"));
const dms = conn.subscribe<ChatMessage>("dm:ann", {
  onMessage: (msg, cursor) => console.log("dm from", msg.user, cursor),
});
const alerts = conn.subscribe<Notification>("alerts", (n, cursor) => console.log(n.text, cursor));
const notes = conn.subscribe<Notification>("notify:ann");
notes.on("message", (n: Notification, _cursor: Cursor | null, meta: TopicMessageMeta) => {
  console.log(meta.binary ? "binary" : n.kind, n.text);
});
const files = conn.subscribe<Uint8Array>("files:lobby", {
  onMessage: (bytes) => console.log("got", bytes.byteLength, "bytes"),
});

function isLongConnError(e: unknown): e is LongConnError {
  return e instanceof LongConn.LongConnError;
}

async function main(): Promise<void> {
  const ready: Subscription<ChatMessage> = await lobby.ready;
  console.log(ready.topic, ready.state, ready.cursor, ready.params);

  const message: ChatMessage = { type: "chat", user: "ann", text: "hello" };
  const published: Published = await conn.publish("room:lobby", message as unknown as Json);
  console.log("published at", published.cursor);
  await conn.publish("files:lobby", new Uint8Array([1, 2, 3]));

  try {
    const rooms = await conn.call<string[]>("rooms.list", { limit: 10 }, { timeout: 2000 });
    console.log(rooms.join(", "));
  } catch (e) {
    if (isLongConnError(e)) {
      const code: ErrorCodeName = e.code;
      if (code === "timeout" || code === "disconnected") console.log("try again later");
      else if (e.status === LongConn.ErrorCode.forbidden) console.log("not allowed");
    }
  }

  console.log(conn.subscriptions().map((s) => `${s.topic}@${s.cursor ?? "-"}`));
  console.log(conn.clientId, conn.protocolVersion, conn.stats.duplicates, LongConn.PROTOCOL_VERSION);
  await dms.unsubscribe();
  await conn.unsubscribe("files:lobby");
  conn.on("error", (error: Error) => console.log(error.message));
  conn.on("resync", (info: TopicResyncInfo) => console.log(info.topic));
  conn.setTransport("longpoll");
  conn.reconnect();
  void files;
  await alerts.unsubscribe();
  conn.close();
}

// The single-stream API: one topic per connection (handlers without SubscriptionMixin).
const streamOptions: ConnectOptions = {
  url: "/ws/lobby",
  sseUrl: "/sse/lobby",
  pollUrl: "/poll/lobby",
  sendUrl: "/send/lobby",
  cursor: null,
  idleTimeout: 25000,
  onMessage(data: unknown, cursor: Cursor | null, meta: MessageMeta) {
    console.log(data, cursor, meta.transport);
  },
  onResync(info: ResyncInfo) {
    console.log(info.cursor, info.reason);
  },
  heartbeat: { match: (data) => (data === "ping" ? "pong" : null) },
  decode: (raw) => ({ data: raw, cursor: null }),
};
const stream: Connection = LongConn.connect(streamOptions);
void stream.send({ type: "chat", text: "hi" });
stream.on("status", (s) => console.log(s.state, stream.cursor, LongConn.CloseCode.SLOW_CONSUMER));

async function sendFile(file: File): Promise<void> {
  const uploadOptions: UploadOptions = {
    protocol: "tus",
    endpoint: "/files/",
    metadata: { room: "lobby" },
    onProgress: (sent, total) => console.log(sent / total),
  };
  const result: UploadResult = await LongConn.upload(file, uploadOptions);
  console.log(result.protocol === "tus" ? result.url : result.sha256, result.size);
}

const delay: number = LongConn.backoffDelay(3, 500, 10000);
const parsed = LongConn.parseCursor("a1b2-17");
console.log(delay, parsed?.epoch, LongConn.isAfter("a1b2-18", "a1b2-17"), LongConn.validTopic("room:1"), LongConn.VERSION);

void main();
void sendFile;

// A token in the first message, refreshed before it expires: the page asks its own
// backend for a short-lived token (the login cookie stays on that request).
async function fetchToken(reason: "open" | "refresh"): Promise<string> {
  const res = await fetch(`/token?for=${reason}`, { method: "POST", credentials: "same-origin" });
  if (!res.ok) throw new Error(`token: HTTP ${res.status}`);
  return ((await res.json()) as { token: string }).token;
}

const authed: Session = LongConn.session({
  url: "/ws/token",
  getToken: fetchToken,
  refreshMargin: 60_000,
  onAuthenticated(info: AuthenticatedInfo) {
    console.log("signed in as", info.user, "for", info.expiresIn ?? "ever", "s");
  },
});
authed.subscribe<ChatMessage>("room:lobby", (msg) => console.log(msg.text));
