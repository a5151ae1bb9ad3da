// The live stream (websocket /api/v1/stream): one socket per subscriber, reconnecting with
// backoff while the page that opened it is shown.
import { qs } from "./api.js";

export class LiveStream {
  /** filter: {host, kind, severity, text}; onMessage({kind, data, missed}); onState(text). */
  constructor(filter, onMessage, onState = () => {}) {
    this.filter = filter; this.onMessage = onMessage; this.onState = onState;
    this.closed = false; this.delay = 500; this.open();
  }

  open() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    this.ws = new WebSocket(`${proto}//${location.host}/api/v1/stream${qs(this.filter)}`);
    // "connected" only once the server's hello says the subscription exists: events published
    // between the socket opening and the subscription would otherwise be missed unseen.
    this.ws.onopen = () => { this.delay = 500; this.onState("subscribing…"); };
    this.ws.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch { this.onState("bad message from the stream"); return; }
      if (msg.kind === "error") { this.onState(`stream refused: ${msg.error}`); return; }
      if (msg.kind === "hello") { this.onState("connected"); return; }
      this.onMessage(msg);
    };
    this.ws.onclose = (ev) => {
      if (this.closed) return;
      this.onState(`disconnected (${ev.reason || ev.code}); reconnecting…`);
      setTimeout(() => { if (!this.closed) this.open(); }, this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    };
  }

  close() { this.closed = true; if (this.ws) this.ws.close(); }
}
