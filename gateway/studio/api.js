// The gateway's API as the studio uses it: REST under /api/v1 with the key as a Bearer header, and
// the WebSocket /ws with the key as the subprotocol pair ["wan.bearer", key] (a browser cannot set
// headers on a WebSocket). Every error is an ApiError carrying the server's structured code.

const KEY_STORAGE = "wan.apiKey";

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class Api {
  constructor(key = "") {
    this.key = key;
  }

  headers(extra = {}) {
    return this.key ? { Authorization: `Bearer ${this.key}`, ...extra } : { ...extra };
  }

  async request(method, path, body) {
    const init = { method, headers: this.headers() };
    if (body instanceof FormData) {
      init.body = body; // the browser writes the multipart boundary
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch {
      throw new ApiError(0, "NETWORK_ERROR", "the server cannot be reached");
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const err = data && data.error ? data.error : {};
      throw new ApiError(response.status, err.code || `HTTP_${response.status}`,
        err.message || response.statusText || "request failed", err.details || {});
    }
    return data;
  }

  models() { return this.request("GET", "/api/v1/models"); }
  presets() { return this.request("GET", "/api/v1/presets"); }
  openapi() { return this.request("GET", "/api/v1/openapi.json"); }
  jobs(limit = 20) { return this.request("GET", `/api/v1/jobs?limit=${limit}`); }
  status(jobId) { return this.request("GET", `/api/v1/status/${jobId}`); }
  result(jobId) { return this.request("GET", `/api/v1/result/${jobId}`); }
  cancel(jobId) { return this.request("POST", `/api/v1/cancel/${jobId}`); }

  // files: {input name: File}; with none the request goes as JSON, else as multipart/form-data
  // (the request object in a `request` part, each file in a part of its input's name).
  generate(request, files = {}) {
    const parts = Object.entries(files).filter(([, file]) => file);
    if (!parts.length) return this.request("POST", "/api/v1/generate", request);
    const form = new FormData();
    form.append("request", JSON.stringify(request));
    for (const [name, file] of parts) form.append(name, file, file.name || name);
    return this.request("POST", "/api/v1/generate", form);
  }

  // A URL the page can put in <video src> or <img src>. With a key the file is fetched with it and
  // handed over as a blob: URL (the caller revokes it); without one the server's URL plays directly
  // (and streams, with HTTP Range).
  async mediaUrl(path) {
    if (!this.key || path.startsWith("data:")) return { url: path, blob: false };
    let response;
    try {
      response = await fetch(path, { headers: this.headers() });
    } catch {
      throw new ApiError(0, "NETWORK_ERROR", "the server cannot be reached");
    }
    if (!response.ok) throw new ApiError(response.status, `HTTP_${response.status}`, "the file is not available");
    return { url: URL.createObjectURL(await response.blob()), blob: true };
  }
}

// The WebSocket, kept open: it reconnects with backoff (1 s doubling to 30 s) and, on every
// (re)connect, subscribes to all of the user's jobs, which sends a snapshot of each queued and
// running one; `onopen` lets the page poll for what it missed while away.
export class Live {
  constructor(key, { onevent, onstate, onopen }) {
    this.key = key;
    this.onevent = onevent;
    this.onstate = onstate;
    this.onopen = onopen;
    this.delay = 1000;
    this.closed = false;
    this.socket = null;
    this.timer = null;
    this.connect();
  }

  connect() {
    if (this.closed) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/ws`;
    this.onstate("connecting");
    const socket = this.key ? new WebSocket(url, ["wan.bearer", this.key]) : new WebSocket(url);
    this.socket = socket;
    socket.onopen = () => {
      this.delay = 1000;
      this.onstate("live");
      socket.send(JSON.stringify({ action: "subscribe", all: true }));
      this.onopen();
    };
    socket.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      this.onevent(event);
    };
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.closed) return;
      this.onstate("offline");
      this.timer = setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 30000);
    };
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close();
    this.socket = null;
  }
}
