// Outpost browser client: events and logs to an Outpost edge, batched,
// retried with the same event ids, and sent with sendBeacon when the page
// goes away. No dependencies. ES module; `npm run build:client` (esbuild)
// makes the script-tag build `dist/outpost.global.js` (global `outpost`).
//
//   import * as outpost from "./outpost.js";
//   outpost.init({ endpoint: "https://edge.example.com", writeKey: "my-web-app" });
//   outpost.track("signup", { plan: "pro" });
//   outpost.log("error", "checkout failed", { logger: "cart", status: 502 });
//   outpost.identify("user-42");

export const VERSION = "0.1.0";

const DEFAULTS = {
  // Send when this many events are queued…
  batchSize: 20,
  // …or this long after the first one was queued.
  flushIntervalMs: 5000,
  // Most events kept while the edge is unreachable; the oldest go first.
  maxQueue: 1000,
  // Retry delays: doubled per failure, with jitter, between these bounds;
  // a Retry-After from the edge is honoured when longer.
  minBackoffMs: 1000,
  maxBackoffMs: 60000,
};

// Codes after which the same batch would fail the same way.
const PERMANENT = new Set([400, 401, 403, 404, 405, 413, 415]);

function uuid() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") {
    return crypto.randomUUID();
  }
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function stored(storage, key) {
  try {
    const s = globalThis[storage];
    let v = s.getItem(key);
    if (!v) {
      v = uuid();
      s.setItem(key, v);
    }
    return v;
  } catch {
    return uuid(); // storage disabled: one id per page load
  }
}

/** A client; `init` makes the default one the module functions use. */
export function createClient(options) {
  if (!options || !options.endpoint || !options.writeKey) {
    throw new Error("outpost: init({ endpoint, writeKey }) needs both");
  }
  const cfg = { ...DEFAULTS, ...options };
  const url = `${cfg.endpoint.replace(/\/+$/, "")}/v1/batch?write_key=${encodeURIComponent(cfg.writeKey)}`;
  const queue = [];
  const state = {
    userId: undefined,
    anonymousId: stored("localStorage", "outpost.anonymous_id"),
    sessionId: stored("sessionStorage", "outpost.session_id"),
    timer: undefined,
    inFlight: false,
    failures: 0,
    retryAt: 0,
    dropped: 0,
  };
  const context = {
    platform: "web",
    library_name: "outpost-js",
    library_version: VERSION,
    ...(globalThis.navigator && navigator.language ? { locale: navigator.language } : {}),
    ...(cfg.appVersion ? { app_version: String(cfg.appVersion) } : {}),
  };

  function enqueue(event) {
    event.event_id = uuid();
    event.timestamp = new Date().toISOString();
    event.anonymous_id = state.anonymousId;
    event.session_id = state.sessionId;
    if (state.userId) event.user_id = state.userId;
    event.context = context;
    queue.push(event);
    while (queue.length > cfg.maxQueue) {
      queue.shift();
      state.dropped += 1;
    }
    if (queue.length >= cfg.batchSize) {
      flush();
    } else {
      schedule(cfg.flushIntervalMs);
    }
    return event.event_id;
  }

  function schedule(ms) {
    if (state.timer !== undefined) return;
    state.timer = setTimeout(() => {
      state.timer = undefined;
      flush();
    }, ms);
  }

  function backoff(retryAfterSecs) {
    state.failures += 1;
    const exp = Math.min(cfg.maxBackoffMs, cfg.minBackoffMs * 2 ** (state.failures - 1));
    const jittered = exp / 2 + Math.random() * (exp / 2);
    const wait = Math.max(jittered, (retryAfterSecs || 0) * 1000);
    state.retryAt = Date.now() + wait;
    schedule(wait);
  }

  /** Sends what is queued (one request at a time); resolves when done. */
  async function flush() {
    if (state.inFlight || queue.length === 0) return;
    if (Date.now() < state.retryAt) {
      schedule(state.retryAt - Date.now());
      return;
    }
    if (state.timer !== undefined) {
      clearTimeout(state.timer);
      state.timer = undefined;
    }
    const batch = queue.slice(0, cfg.batchSize);
    state.inFlight = true;
    let resp;
    try {
      resp = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ batch, sent_at: new Date().toISOString() }),
        keepalive: true,
      });
    } catch {
      resp = undefined; // offline or blocked: retried with the same ids
    }
    state.inFlight = false;
    if (resp && resp.status === 202) {
      const answer = await resp.json().catch(() => ({}));
      for (const e of answer.errors || []) {
        console.warn(`outpost: event ${e.event_id} refused (${e.code}): ${e.message}`);
      }
      remove(batch);
      state.failures = 0;
      if (queue.length > 0) flush();
      return;
    }
    if (resp && PERMANENT.has(resp.status)) {
      const answer = await resp.json().catch(() => ({}));
      console.warn(`outpost: batch refused (${resp.status}, ${answer.code}): ${answer.message}`);
      remove(batch);
      return;
    }
    // 429, 503, other 5xx, network errors: keep the events, same ids.
    const retryAfter = resp ? Number(resp.headers.get("Retry-After")) || 0 : 0;
    backoff(retryAfter);
  }

  function remove(batch) {
    const sent = new Set(batch.map((e) => e.event_id));
    for (let i = queue.length - 1; i >= 0; i -= 1) {
      if (sent.has(queue[i].event_id)) queue.splice(i, 1);
    }
  }

  /** Hands what is queued to sendBeacon (the page is going away). */
  function beacon() {
    if (queue.length === 0 || !globalThis.navigator || !navigator.sendBeacon) return false;
    const batch = queue.slice(0, cfg.batchSize * 5);
    const body = new Blob([JSON.stringify({ batch, sent_at: new Date().toISOString() })], {
      type: "text/plain",
    });
    const queued = navigator.sendBeacon(url, body);
    // Accepted for delivery by the browser; if it is lost, the ids are
    // gone with the page, and a copy sent later would be dropped as a duplicate.
    if (queued) remove(batch);
    return queued;
  }

  if (globalThis.addEventListener) {
    globalThis.addEventListener("pagehide", beacon);
    if (globalThis.document) {
      document.addEventListener("visibilitychange", () => {
        if (document.visibilityState === "hidden") beacon();
      });
    }
  }

  return {
    /** Records an event; returns its id. */
    track(name, properties) {
      return enqueue({ kind: "event", name: String(name), properties: properties || {} });
    },
    /** Records a log line; `fields.logger` becomes its name. */
    log(level, message, fields) {
      const { logger, ...rest } = fields || {};
      return enqueue({
        kind: "log",
        level,
        message: String(message),
        ...(logger ? { name: String(logger) } : {}),
        properties: rest,
      });
    },
    /** Sets the user id of the events that follow (undefined to clear). */
    identify(userId) {
      state.userId = userId === undefined || userId === null ? undefined : String(userId);
    },
    flush,
    beacon,
    /** Queued events (not yet acknowledged), and how many were dropped. */
    stats() {
      return { queued: queue.length, dropped: state.dropped, failures: state.failures };
    },
  };
}

let client;

function current() {
  if (!client) throw new Error("outpost: call init({ endpoint, writeKey }) first");
  return client;
}

export function init(options) {
  client = createClient(options);
  return client;
}
export const track = (name, properties) => current().track(name, properties);
export const log = (level, message, fields) => current().log(level, message, fields);
export const identify = (userId) => current().identify(userId);
export const flush = () => current().flush();
