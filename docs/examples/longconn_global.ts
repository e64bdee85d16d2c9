// longconn.js loaded with a <script> tag: the UMD global `LongConn` (no import).
// Type-checked with `tsc --strict` (npm run typecheck).
const page: LongConn.Session = LongConn.session({ url: "/ws", pollUrl: "/poll" });
const alerts: LongConn.Subscription<{ text: string }> = page.subscribe("notify:all", {
  onMessage: (alert) => console.log(alert.text),
});
alerts.ready.catch((error: LongConn.LongConnError) => console.log(error.code));
