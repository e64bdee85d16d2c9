/**
 * Type declarations of longconn.js, the browser client of tornado-longconn.
 *
 * The same file is the UMD global `LongConn` (loaded with a <script> tag) and a
 * CommonJS module (`require("tornado-longconn")`, `import * as LongConn from
 * "tornado-longconn"`).
 */

export as namespace LongConn;

/** The client's version. */
export const VERSION: string;

/** The version of the subscriptions protocol a Session speaks (1). */
export const PROTOCOL_VERSION: number;

/** Close codes sent by tornado-longconn (tornado_longconn.codes.CloseCode). */
export const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  POLICY_VIOLATION: 1008;
  MESSAGE_TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  SLOW_CONSUMER: 4000;
  RESYNC_REQUIRED: 4001;
  HEARTBEAT_TIMEOUT: 4002;
  UPLOAD_BAD_REQUEST: 4400;
  UPLOAD_NOT_FOUND: 4404;
  UPLOAD_CONFLICT: 4409;
  UPLOAD_TOO_LARGE: 4413;
  UPLOAD_CHECKSUM_MISMATCH: 4460;
  UPLOAD_STORAGE_FULL: 4507;
}>;

/** The error codes of the subscriptions protocol and their statuses. */
export const ErrorCode: Readonly<{
  bad_request: 400;
  unauthorized: 401;
  forbidden: 403;
  not_found: 404;
  conflict: 409;
  too_large: 413;
  limit: 429;
  internal: 500;
  unavailable: 503;
  timeout: 504;
}>;

/** An error code sent by the server (see ErrorCode). */
export type ServerErrorCode = keyof typeof ErrorCode;

/**
 * An error code set by the client: "disconnected" (the connection was lost before the
 * answer: a publish may or may not have happened), "closed" (the session or the
 * subscription was closed), "unsupported" (the transport in use cannot do it).
 */
export type ClientErrorCode = "disconnected" | "closed" | "unsupported";

export type ErrorCodeName = ServerErrorCode | ClientErrorCode;

/**
 * The error of a request or a subscription. `code` tells what to do: e.g. "forbidden"
 * (do not retry), "unavailable" (retry later), "timeout" (no answer in time: the server's
 * 504 or the client's own deadline, then `status` is null).
 */
export class LongConnError extends Error {
  constructor(
    message: string,
    code: ErrorCodeName,
    status?: number | null,
    extra?: { topic?: string | null; id?: RequestId | null; reason?: string },
  );
  readonly name: "LongConnError";
  /** The protocol's error code, or a client code. */
  code: ErrorCodeName;
  /** The protocol's (HTTP-like) status; null for client codes and client timeouts. */
  status: number | null;
  /** The topic concerned, when known. */
  topic: string | null;
  /** The id of the request, when known. */
  id: RequestId | null;
  /** The server's reason (or the message). */
  reason: string;
}

/** A request id of the subscriptions protocol. */
export type RequestId = number | string;

/** "<epoch>-<offset>": opaque to applications, compared by the client. */
export type Cursor = string;

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export type TransportName = "websocket" | "sse" | "longpoll";

export type ConnectionState = "idle" | "connecting" | "open" | "waiting" | "closed";

/** Reported through onStatus / on("status"). */
export interface StatusInfo {
  state: ConnectionState;
  transport: TransportName | null;
  /** Consecutive failures (the backoff exponent). */
  attempt: number;
  /** "waiting": milliseconds until the next attempt. */
  delay?: number;
  /** The close code of the transport that went away (null for network errors). */
  code?: number | null;
  reason?: string;
  /** "waiting": the transport tried next. */
  next?: TransportName;
  /** "closed" after a close code that reconnecting cannot help (1008, 4401, 4403, 4429). */
  fatal?: boolean;
}

export interface ResyncInfo {
  /** Delivery continues after this cursor (null: from now). */
  cursor: Cursor | null;
  /** "epoch", "trimmed", "gap", "cursor rejected", ... */
  reason: string | null;
  transport: TransportName | null;
}

/** A Session's resync notice: one topic could not be resumed exactly. */
export interface TopicResyncInfo extends ResyncInfo {
  topic: string;
}

export interface MessageMeta {
  transport: TransportName | null;
}

export interface TopicMessageMeta extends MessageMeta {
  topic: string;
  /** True when `data` is a binary payload (a Uint8Array). */
  binary: boolean;
}

export interface BackoffOptions {
  /** Milliseconds (default 500). */
  base?: number;
  /** Milliseconds (default 10000). */
  max?: number;
}

export interface HeartbeatOptions {
  /** The reply to send for `data`, or null when it is not a heartbeat. */
  match(data: unknown): string | null;
}

export type DecodedMessage =
  | { data: unknown; cursor: Cursor | null; enveloped?: boolean }
  | { control: "resync"; cursor: Cursor | null; reason: string | null }
  | { control: "ignore" };

/** Options shared by connect() and session(). */
export interface TransportOptions {
  /** WebSocket endpoint. */
  url?: string | null;
  /** Server-Sent Events endpoint. */
  sseUrl?: string | null;
  /** Long-poll endpoint. */
  pollUrl?: string | null;
  /** "auto" (default) tries `transports` in order; a name forces one. */
  transport?: "auto" | TransportName;
  transports?: TransportName[];
  /** Failures of a transport that never opened before "auto" tries the next (2). */
  fallbackAfter?: number;
  /** Extra query parameters added to every URL. */
  params?: Record<string, string | number | boolean> | null;
  backoff?: BackoffOptions;
  /** Milliseconds open before the backoff resets (3000). */
  stableAfter?: number;
  /** Milliseconds a transport may take to open (10000). */
  openTimeout?: number;
  /** Seconds the server may hold a long-poll (25). */
  pollTimeout?: number;
  /** WebSocket: milliseconds without any inbound frame before reconnecting (null: off). */
  idleTimeout?: number | null;
  /** Cookies on cross-origin SSE, long-poll and POST requests. */
  withCredentials?: boolean;
  /** A source of randomness in [0, 1) (tests). */
  random?: (() => number) | null;
}

/** Options of connect(): one stream of messages (the single-topic API). */
export interface ConnectOptions extends TransportOptions {
  /** POST endpoint used by send() when not on WebSocket. */
  sendUrl?: string | null;
  /** Resume after this cursor. */
  cursor?: Cursor | null;
  /** The query parameter carrying the cursor ("cursor"). */
  cursorParam?: string;
  /** Application-level heartbeat replies; false turns them off. */
  heartbeat?: HeartbeatOptions | false | null;
  decode?: ((raw: unknown, transport: TransportName) => DecodedMessage | null) | null;
  onMessage?: (this: Connection, data: any, cursor: Cursor | null, meta: MessageMeta) => void;
  onResync?: (this: Connection, info: ResyncInfo) => void;
  onStatus?: (this: Connection, status: StatusInfo) => void;
  onError?: (this: Connection, error: Error) => void;
}

export interface ConnectionStats {
  opened: number;
  messages: number;
  duplicates: number;
  resyncs: number;
  fallbacks: number;
}

/** One stream of messages over WebSocket, SSE or long-poll, resumed from its cursor. */
export class Connection {
  constructor(options: ConnectOptions);
  readonly options: ConnectOptions;
  /** The cursor of the last message delivered. */
  cursor: Cursor | null;
  transport: TransportName | null;
  state: ConnectionState;
  attempt: number;
  stats: ConnectionStats;
  on(event: "message", fn: (this: Connection, data: any, cursor: Cursor | null, meta: MessageMeta) => void): this;
  on(event: "resync", fn: (this: Connection, info: ResyncInfo) => void): this;
  on(event: "status", fn: (this: Connection, status: StatusInfo) => void): this;
  on(event: "error", fn: (this: Connection, error: Error) => void): this;
  /** Start connecting (connect() does it). */
  start(): this;
  /** A WebSocket message, or a JSON POST to sendUrl on the other transports. */
  send(data: unknown): Promise<unknown>;
  /** Close for good. */
  close(): void;
  /** Drop the transport and reconnect now, resuming from the cursor. */
  reconnect(): void;
  /** Switch to another transport ("auto" to choose again) and reconnect. */
  setTransport(name: "auto" | TransportName): void;
}

/** Create a Connection (one stream) and start it. */
export function connect(options: ConnectOptions): Connection;

// ------------------------------------------------------------------ subscriptions

/** Options of session(): the subscriptions protocol v1 (many topics, one connection). */
export interface SessionOptions extends TransportOptions {
  /** POST endpoint used by publish() when not on WebSocket. */
  publishUrl?: string | null;
  /** Milliseconds publish(), call() and unsubscribe() wait for their answer (10000). */
  requestTimeout?: number;
  /** Any subscription's resync notice (in addition to its own onResync). */
  onResync?: (this: Session, info: TopicResyncInfo) => void;
  /** The server's welcome frame. */
  onWelcome?: (this: Session, welcome: WelcomeInfo) => void;
  onStatus?: (this: Session, status: StatusInfo) => void;
  onError?: (this: Session, error: Error) => void;
  /** A message the server sent to this session's user (`UserRegistry.send_to_user`). */
  onDirect?: (this: Session, data: Json) => void;
  /** The `client` of SSE and long-poll requests: the session's presence member id (default: random). */
  presenceClient?: string;
  /**
   * A token for the server's `authenticate` hook. On every WebSocket open the session
   * first sends `{"type":"auth","token"}` (reason "open") and subscribes once it is
   * accepted; `refreshMargin` ms before the identity expires it sends
   * `{"type":"refresh","token"}` (reason "refresh"). A token the server refuses closes
   * the connection with 4401 / 4403 (the session ends); a 4401 "expired" (a refresh
   * missed) reconnects with a fresh token.
   */
  getToken?: (this: Session, reason: "open" | "refresh") => string | Promise<string>;
  /** Milliseconds before expiry to refresh the token (30000; at most half the lifetime). */
  refreshMargin?: number;
  /** An auth or refresh was accepted. */
  onAuthenticated?: (this: Session, info: AuthenticatedInfo) => void;
}

/** The server's answer to an auth or refresh request. */
export interface AuthenticatedInfo {
  user: string | null;
  /** Seconds until the identity expires (null: never). */
  expiresIn: number | null;
}

export interface WelcomeInfo {
  v: number | null;
  client: string | null;
}

export type SubscriptionState = "pending" | "active" | "closed";

/** The message handler of a subscription; `T` is what the application publishes. */
export type MessageHandler<T> = (
  this: Subscription<T>,
  data: T,
  cursor: Cursor | null,
  meta: TopicMessageMeta,
) => void;

export interface SubscribeOptions<T = any> {
  /** Resume after this cursor (default: from now). */
  cursor?: Cursor | null;
  /** Sent with the WebSocket subscribe frame (for the server's authorization hook). */
  params?: { [key: string]: Json } | null;
  onMessage?: MessageHandler<T>;
  /** The topic could not be resumed exactly: reload what it shows. */
  onResync?: (this: Subscription<T>, info: TopicResyncInfo) => void;
  /** The server refused the subscription (it is closed). */
  onError?: (this: Subscription<T>, error: LongConnError) => void;
  /** The server ended the subscription itself. */
  onUnsubscribed?: (this: Subscription<T>, info: { topic: string; reason: string | null }) => void;
  /** A member joined the topic (setting it asks for presence events: WebSocket and SSE). */
  onJoin?: (this: Subscription<T>, member: PresenceMember, info: PresenceEventInfo) => void;
  /** A member left the topic (setting it asks for presence events: WebSocket and SSE). */
  onLeave?: (this: Subscription<T>, member: PresenceMember, info: PresenceEventInfo) => void;
  /** Presence events may have been missed: call `session.presence(topic)` again. */
  onPresenceGap?: (this: Subscription<T>, info: PresenceEventInfo) => void;
}

/** One member of a topic: one connection on some server process. */
export interface PresenceMember {
  /** The connection's id (the server's welcome `client`). */
  client: string;
  user: string | null;
  /** What the server attached (its `presence_info` hook). */
  info: Json;
  /** When it joined, seconds since the Unix epoch. */
  since: number;
  transport: "websocket" | "sse" | "longpoll";
}

export interface PresenceEventInfo {
  topic: string;
  /** A leave's reason: "left", or "expired" (its server process died); null for a join. */
  reason: string | null;
}

/** The answer of `session.presence(topic)`: one page of members and the counts. */
export interface PresencePage {
  topic: string;
  members: PresenceMember[];
  /** Pass it back for the next page; null when there is none. */
  cursor: string | null;
  /** Members (connections) on every process. */
  connections: number;
  /** Distinct user ids. */
  users: number;
}

export interface PresenceOptions {
  /** The `cursor` of a previous answer: the next page. */
  cursor?: string | null;
  /** Members per page, 1 to 1000 (server default 100). */
  limit?: number;
  /** Milliseconds to wait for the answer (default: requestTimeout). */
  timeout?: number;
}

/** One topic of a Session. */
export class Subscription<T = any> {
  private constructor();
  readonly topic: string;
  /** The cursor of the last message delivered (or the start position the server gave). */
  readonly cursor: Cursor | null;
  readonly params: { [key: string]: Json } | null;
  readonly state: SubscriptionState;
  /** Resolves once the server accepted the subscription; rejects when it refused it. */
  readonly ready: Promise<Subscription<T>>;
  on(event: "message", fn: MessageHandler<T>): this;
  on(event: "resync", fn: (this: Subscription<T>, info: TopicResyncInfo) => void): this;
  on(event: "error", fn: (this: Subscription<T>, error: LongConnError) => void): this;
  on(event: "unsubscribed", fn: (this: Subscription<T>, info: { topic: string; reason: string | null }) => void): this;
  on(event: "join" | "leave", fn: (this: Subscription<T>, member: PresenceMember, info: PresenceEventInfo) => void): this;
  on(event: "presenceGap", fn: (this: Subscription<T>, info: PresenceEventInfo) => void): this;
  /** Stop receiving the topic; never rejects. */
  unsubscribe(): Promise<void>;
}

export interface Published {
  topic: string;
  /** The cursor the message got. */
  cursor: Cursor | null;
}

export interface CallOptions {
  /** Milliseconds to wait for the answer (default: requestTimeout; 0: no deadline). */
  timeout?: number;
}

export type BinaryPayload = ArrayBuffer | ArrayBufferView;

/** A connection speaking the subscriptions protocol: many topics, each with its own cursor. */
export class Session {
  constructor(options: SessionOptions);
  readonly options: SessionOptions;
  transport: TransportName | null;
  state: ConnectionState;
  attempt: number;
  stats: ConnectionStats;
  /** The server's id of this connection (welcome frame; WebSocket only). */
  clientId: string | null;
  /**
   * The `client` of SSE and long-poll requests (the presence member id there). A
   * random one (not set by the option) is renewed after the server disconnected the
   * user over SSE or long-poll, since the server then refuses the old id for a while.
   */
  readonly presenceClient: string;
  protocolVersion: number | null;
  /**
   * Subscribe to `topic`. Throws a LongConnError: "bad_request" (bad topic or cursor),
   * "conflict" (already subscribed), "closed" (the session is closed).
   */
  subscribe<T = any>(topic: string, options?: SubscribeOptions<T> | MessageHandler<T>): Subscription<T>;
  /** Stop receiving a topic; never rejects. */
  unsubscribe(topic: string | Subscription<any>): Promise<void>;
  /** The subscriptions held now. */
  subscriptions(): Subscription<any>[];
  /** Publish JSON (or, over WebSocket, binary) data to `topic`. */
  publish(topic: string, data: Json | BinaryPayload): Promise<Published>;
  /** Call a server method; WebSocket only. */
  call<R = any>(method: string, params?: Json, options?: CallOptions): Promise<R>;
  /** The members of `topic` on every server process (one page) and its counts; WebSocket only. */
  presence(topic: string, options?: PresenceOptions): Promise<PresencePage>;
  on(event: "status", fn: (this: Session, status: StatusInfo) => void): this;
  on(event: "resync", fn: (this: Session, info: TopicResyncInfo) => void): this;
  on(event: "welcome", fn: (this: Session, welcome: WelcomeInfo) => void): this;
  on(event: "error", fn: (this: Session, error: Error) => void): this;
  on(event: "direct", fn: (this: Session, data: Json) => void): this;
  start(): this;
  /** Close for good: pending requests reject with "closed", subscriptions end. */
  close(): void;
  /** Drop the transport and reconnect now; every topic resumes from its cursor. */
  reconnect(): void;
  setTransport(name: "auto" | TransportName): void;
}

/** Create a Session (subscriptions protocol v1) and start it. */
export function session(options: SessionOptions): Session;

// ------------------------------------------------------------------ uploads

export interface UploadOptions {
  /** "tus" (default) or "websocket". */
  protocol?: "tus" | "websocket";
  /** tus creation URL. */
  endpoint?: string | null;
  /** WebSocket upload endpoint. */
  url?: string | null;
  params?: Record<string, string | number | boolean> | null;
  /** Bytes per chunk (256 KiB). */
  chunkSize?: number;
  metadata?: Record<string, string> | null;
  headers?: Record<string, string> | null;
  checksum?: "auto" | "sha256" | false;
  /** Consecutive failures before giving up (5). */
  retries?: number;
  backoff?: BackoffOptions;
  /** Keep the upload's URL or id in localStorage to resume after a reload (true). */
  rememberUrl?: boolean;
  onProgress?: ((sent: number, total: number) => void) | null;
  signal?: AbortSignal | null;
  random?: (() => number) | null;
}

export type UploadResult =
  | { protocol: "tus"; url: string; size: number }
  | { protocol: "websocket"; id: string; size: number; sha256: string };

/**
 * Upload a File or Blob (tus 1.0 or the WebSocket chunk protocol), with progress and resume.
 * Rejects with an Error carrying `status` (HTTP) or `code` (close code) and `fatal`
 * (retrying cannot help); `takenOver` is true when a newer connection resumed the same
 * upload (close 4409 "upload resumed on another connection"): this one stops for good.
 */
export function upload(file: Blob & { name?: string; lastModified?: number }, options?: UploadOptions): Promise<UploadResult>;

// ------------------------------------------------------------------ helpers

/** Full-jitter backoff: random in [0, min(max, base * 2^attempt)) milliseconds. */
export function backoffDelay(attempt: number, base: number, max: number, random?: () => number): number;

/** Split a "<epoch>-<offset>" cursor; null when it is not one. */
export function parseCursor(cursor: unknown): { epoch: string; offset: number } | null;

/** False when `cursor` is at or before `last` in the same epoch (a duplicate). */
export function isAfter(cursor: Cursor, last: Cursor | null): boolean;

/** True for a valid topic name: 1-128 of A-Z a-z 0-9 _ - . : @ / + */
export function validTopic(topic: unknown): topic is string;
