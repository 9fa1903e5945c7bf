/**
 * PopOSModelService: the desktop app's client for wan-server (REST under /api/v1, WebSocket /ws).
 *
 * Runs in a browser (fetch, FormData, WebSocket are the platform's) and in Node 20 (fetch is
 * global; pass the `ws` package's WebSocket as `WebSocket`, since Node 20 has none without a flag).
 */
import { CLIENT_CODES, PopOSApiError, errorInfo, isRecord } from "./errors.js";
import {
  FINAL_STATUSES,
  type IApiErrorInfo,
  type IDownloadProgress,
  type IGenerationRequest,
  type IGenerationResponse,
  type IJobEvent,
  type IJobList,
  type IJobResult,
  type IJobState,
  type IJobStatus,
  type IListQuery,
  type JobStatus,
} from "./types.js";

/** The API-key subprotocol: a browser cannot set headers on a WebSocket, so the token goes as
 * `["wan.bearer", "<token>"]` (gateway/auth.py); the server accepts with "wan.bearer". */
export const WS_SUBPROTOCOL = "wan.bearer";

/** What the client needs of a WebSocket: the browser's and the `ws` package's both fit. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open", listener: () => void): void;
  addEventListener(type: "message", listener: (event: { data: unknown }) => void): void;
  addEventListener(type: "close", listener: (event: { code: number; reason: string }) => void): void;
  addEventListener(type: "error", listener: (event: unknown) => void): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface IServiceOptions {
  /** e.g. "http://127.0.0.1:8001" (a path prefix is kept: "https://host/wan") */
  baseUrl: string;
  /** an API key token (`python -m gateway.keys create NAME`); sent as a Bearer token, or as the
   * `wan.bearer` subprotocol on the WebSocket */
  apiKey?: string;
  /** per request, for everything but downloads (default 30 s) */
  timeoutMs?: number;
  /** default: globalThis.fetch */
  fetch?: typeof fetch;
  /** default: globalThis.WebSocket (a browser's); in Node 20 pass `WebSocket` from the `ws` package */
  WebSocket?: WebSocketConstructor;
}

/** An input image: a Blob or File (its type and name are used), or bytes. Without a type the
 * server tells PNG, JPEG and WebP apart by their magic bytes. */
export type IImageInput = Blob | { data: Uint8Array | ArrayBuffer | Blob; filename?: string; type?: string };

export interface IRequestOptions {
  signal?: AbortSignal;
}

export interface IGenerateOptions extends IRequestOptions {
  /** Sent as `Idempotency-Key`: the same key and body within 24 h give the same job back, so a retry
   * after a lost answer cannot make a second job; the same key with another body is 409
   * IDEMPOTENCY_KEY_REUSED. */
  idempotencyKey?: string;
}

export interface IDownloadOptions extends IRequestOptions {
  /** called after every chunk, and once at the end (received === total when the length was known) */
  onProgress?: (progress: IDownloadProgress) => void;
}

/** Reconnection: the n-th retry in a row waits min(maxMs, initialMs * factor^(n-1)) ms. */
export interface IBackoff {
  initialMs: number;
  maxMs: number;
  factor: number;
  /** retries in a row before giving up (the pending `done()`s reject with NETWORK_ERROR) */
  maxRetries: number;
}
export const DEFAULT_BACKOFF: IBackoff = { initialMs: 250, maxMs: 10_000, factor: 2, maxRetries: Infinity };

export interface ISubscribeOptions {
  /** every event as received, snapshots included */
  onEvent?: (event: IJobEvent) => void;
  /** a followed job's state changed (after the event is applied) */
  onState?: (state: IJobState, event: IJobEvent) => void;
  /** a connection opened (1 for the first, 2 after the first reconnect, ...) */
  onConnect?: (connection: number) => void;
  /** the connection closed without `close()`; `retryInMs` null: giving up */
  onDisconnect?: (info: { code: number; reason: string; retryInMs: number | null }) => void;
  /** an error event about no followed job (a refused message) */
  onError?: (error: PopOSApiError) => void;
  backoff?: Partial<IBackoff>;
  /** close the socket once every followed job is final (default true; never for `all`) */
  closeWhenDone?: boolean;
}

const RETRYABLE_CODES = new Set(["BROKER_UNAVAILABLE", "RATE_LIMITED"]);

function isFinal(status: JobStatus): boolean {
  return FINAL_STATUSES.includes(status);
}

export class PopOSModelService {
  readonly baseUrl: string;
  private readonly apiKey: string | undefined;
  private readonly timeoutMs: number;
  private readonly fetchImpl: typeof fetch;
  private readonly webSocketCtor: WebSocketConstructor | undefined;

  constructor(options: IServiceOptions) {
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    const fetchImpl = options.fetch ?? globalThis.fetch;
    this.fetchImpl = fetchImpl.bind(globalThis);
    this.webSocketCtor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  }

  // ---- REST ----

  /** Submit a job: JSON, or multipart/form-data when `image` is given (i2v needs one, ti2v takes one). */
  async generate(request: IGenerationRequest, image?: IImageInput,
                 options: IGenerateOptions = {}): Promise<IGenerationResponse> {
    const { idempotencyKey, ...rest } = options;
    const keyHeader: Record<string, string> = idempotencyKey === undefined ? {} : { "Idempotency-Key": idempotencyKey };
    if (image === undefined) {
      return this.json<IGenerationResponse>("POST", "/api/v1/generate", {
        body: JSON.stringify(request), headers: { "Content-Type": "application/json", ...keyHeader }, ...rest,
      });
    }
    const form = new FormData();
    form.append("request", JSON.stringify(request)); // a field, not a file: the server insists
    const [blob, filename] = imageBlob(image);
    form.append("image", blob, filename);
    return this.json<IGenerationResponse>("POST", "/api/v1/generate", { body: form, headers: keyHeader, ...rest });
  }

  status(jobId: string, options: IRequestOptions = {}): Promise<IJobStatus> {
    return this.json("GET", `/api/v1/status/${encodeURIComponent(jobId)}`, options);
  }

  result(jobId: string, options: IRequestOptions = {}): Promise<IJobResult> {
    return this.json("GET", `/api/v1/result/${encodeURIComponent(jobId)}`, options);
  }

  /** Cancel a queued job, or stop a running one at its next denoising step (409 JOB_NOT_CANCELLABLE if final). */
  cancel(jobId: string, options: IRequestOptions = {}): Promise<IJobStatus> {
    return this.json("POST", `/api/v1/cancel/${encodeURIComponent(jobId)}`, options);
  }

  /** Jobs, newest first (your own; every job for an admin key). */
  list(query: IListQuery = {}, options: IRequestOptions = {}): Promise<IJobList> {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(query)) {
      if (value !== undefined && value !== null) params.set(key, String(value));
    }
    const qs = params.toString();
    return this.json("GET", `/api/v1/jobs${qs ? `?${qs}` : ""}`, options);
  }

  /** What the server serves: each model's resolutions, max_frames and presets. */
  models(options: IRequestOptions = {}): Promise<Record<string, unknown>> {
    return this.json("GET", "/api/v1/models", options);
  }

  /** What each quality preset resolves to, per model. */
  presets(options: IRequestOptions = {}): Promise<Record<string, unknown>> {
    return this.json("GET", "/api/v1/presets", options);
  }

  /** The video's URL (for a <video> element with auth off; with keys, download it). */
  videoUrl(jobId: string): string {
    return `${this.baseUrl}/api/v1/files/${encodeURIComponent(jobId)}.mp4`;
  }

  /** The MP4 of a completed job (404 RESULT_NOT_AVAILABLE before), reporting bytes as they arrive. */
  async download(jobId: string, options: IDownloadOptions = {}): Promise<Uint8Array> {
    const response = await this.send("GET", `/api/v1/files/${encodeURIComponent(jobId)}.mp4`,
                                     { signal: options.signal, timeout: false });
    const length = response.headers.get("content-length");
    const total = length !== null && /^\d+$/.test(length) ? Number(length) : null;
    const chunks: Uint8Array[] = [];
    let received = 0;
    const reader = response.body?.getReader();
    try {
      while (reader !== undefined) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
        received += value.byteLength;
        options.onProgress?.({ received, total });
      }
    } catch (cause) {
      throw networkError(cause, options.signal);
    }
    if (total !== null && received !== total) {
      throw new PopOSApiError({ code: CLIENT_CODES.NETWORK_ERROR, message: `download ended at ${received} of ${total} bytes`,
                                details: { received, total } }, response.status);
    }
    options.onProgress?.({ received, total });
    const out = new Uint8Array(received);
    let offset = 0;
    for (const chunk of chunks) {
      out.set(chunk, offset);
      offset += chunk.byteLength;
    }
    return out;
  }

  // ---- WebSocket ----

  /** Follow jobs over /ws: a snapshot of each, then its events; reconnects with backoff and resumes
   * from the snapshot the server sends again. `done(jobId)` resolves with the final state. */
  subscribe(jobIds: string | string[], options: ISubscribeOptions = {}): JobSubscription {
    return new JobSubscription(this.socketFactory(), typeof jobIds === "string" ? [jobIds] : jobIds, false, options);
  }

  /** Follow every job you can see: a snapshot of each queued and running one, then every event. */
  subscribeAll(options: ISubscribeOptions = {}): JobSubscription {
    return new JobSubscription(this.socketFactory(), [], true, options);
  }

  /** Submit-and-wait helper: follows the job until it is final and returns its final state. */
  async wait(jobId: string, options: ISubscribeOptions = {}): Promise<IJobState> {
    const sub = this.subscribe(jobId, options);
    try {
      return await sub.done(jobId);
    } finally {
      sub.close();
    }
  }

  wsUrl(): string {
    return `${this.baseUrl.replace(/^http/, "ws")}/ws`;
  }

  private socketFactory(): ISocketFactory {
    const Ctor = this.webSocketCtor;
    if (Ctor === undefined) {
      throw new TypeError("no WebSocket in this runtime: pass one as options.WebSocket (in Node 20: the ws package's)");
    }
    const url = this.wsUrl();
    const protocols = this.apiKey ? [WS_SUBPROTOCOL, this.apiKey] : [];
    return {
      open: () => (protocols.length > 0 ? new Ctor(url, protocols) : new Ctor(url)),
      // A refused handshake shows no status to a browser: the same key on a REST route does.
      refusal: async () => {
        try {
          await this.list({ limit: 1 });
          return null;
        } catch (error) {
          return error instanceof PopOSApiError && (error.status === 401 || error.status === 403) ? error : null;
        }
      },
    };
  }

  // ---- HTTP plumbing ----

  private async json<T>(method: string, path: string,
                        init: { body?: string | FormData; headers?: Record<string, string>; signal?: AbortSignal }): Promise<T> {
    const response = await this.send(method, path,
                                     { ...init, headers: { Accept: "application/json", ...init.headers }, timeout: true });
    let body: unknown;
    try {
      body = await response.json();
    } catch (cause) {
      throw new PopOSApiError({ code: CLIENT_CODES.BAD_RESPONSE, message: "the answer is not JSON", details: {} },
                              response.status, null, { cause });
    }
    if (!isRecord(body)) {
      throw new PopOSApiError({ code: CLIENT_CODES.BAD_RESPONSE, message: "the answer is not a JSON object", details: {} },
                              response.status);
    }
    return body as T; // the shape the OpenAPI document gives this route (src/openapi.ts)
  }

  /** One request; a non-2xx answer is thrown as its PopOSApiError. */
  private async send(method: string, path: string,
                     init: { body?: string | FormData; headers?: Record<string, string>; signal?: AbortSignal | undefined;
                             timeout: boolean }): Promise<Response> {
    const headers: Record<string, string> = { ...init.headers };
    if (this.apiKey) headers["Authorization"] = `Bearer ${this.apiKey}`;
    const signals = [init.signal, init.timeout ? AbortSignal.timeout(this.timeoutMs) : undefined]
      .filter((s): s is AbortSignal => s !== undefined);
    const request: RequestInit = { method, headers };
    if (init.body !== undefined) request.body = init.body;
    if (signals.length > 0) request.signal = signals.length === 1 ? signals[0]! : AbortSignal.any(signals);
    let response: Response;
    try {
      response = await this.fetchImpl(this.baseUrl + path, request);
    } catch (cause) {
      throw networkError(cause, init.signal);
    }
    if (!response.ok) throw await PopOSApiError.fromResponse(response);
    return response;
  }
}

function networkError(cause: unknown, signal: AbortSignal | undefined): PopOSApiError {
  if (signal?.aborted) {
    return new PopOSApiError({ code: CLIENT_CODES.ABORTED, message: "the request was aborted", details: {} },
                             null, null, { cause });
  }
  const timedOut = cause instanceof DOMException && cause.name === "TimeoutError";
  return new PopOSApiError({ code: CLIENT_CODES.NETWORK_ERROR, details: {},
                             message: timedOut ? "the request timed out" : "the server could not be reached" },
                           null, null, { cause });
}

function imageBlob(image: IImageInput): [Blob, string] {
  if (image instanceof Blob) {
    const name = (image as { name?: unknown }).name;
    return [image, typeof name === "string" && name ? name : "image"];
  }
  const type = image.type ?? "";
  const data = image.data;
  const blob = data instanceof Blob ? data : new Blob([data instanceof Uint8Array ? new Uint8Array(data) : data], { type });
  return [type && blob.type !== type ? new Blob([blob], { type }) : blob, image.filename ?? "image"];
}

/** How a subscription opens its sockets, and learns why a handshake was refused (a bad key, a
 * refused Origin: null when it may pass on a retry). */
export interface ISocketFactory {
  open(): WebSocketLike;
  refusal(): Promise<PopOSApiError | null>;
}

interface Waiter {
  resolve: (state: IJobState) => void;
  reject: (error: PopOSApiError) => void;
}

/**
 * A WebSocket subscription to jobs. The server answers each subscribe with a snapshot (the job as
 * it is now), then sends the job's events; events sent while the socket was down are not
 * replayed, so after a reconnect the snapshot it asks for again is where the state resumes.
 */
export class JobSubscription {
  /** the followed jobs' states, by job id */
  readonly jobs = new Map<string, IJobState>();
  /** connections opened so far (reconnects = connections - 1) */
  connections = 0;
  private readonly following = new Set<string>();
  private readonly waiters = new Map<string, Waiter[]>();
  private readonly backoff: IBackoff;
  private socket: WebSocketLike | null = null;
  private snapshotted = new Set<string>(); // jobs whose snapshot this connection has delivered
  private retries = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private closed = false;

  constructor(private readonly sockets: ISocketFactory, jobIds: string[], private readonly all: boolean,
              private readonly options: ISubscribeOptions) {
    this.backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    for (const id of jobIds) this.following.add(id);
    this.connect();
  }

  get reconnects(): number {
    return Math.max(0, this.connections - 1);
  }

  /** Follow one more job (its snapshot comes first). */
  follow(jobId: string): void {
    if (this.closed) throw new TypeError("this subscription is closed");
    this.following.add(jobId);
    if (this.socket?.readyState === 1) this.sendSubscribe(jobId);
  }

  /** The job's final state (completed, failed or cancelled); rejects with the PopOSApiError of a
   * refused subscribe (e.g. JOB_NOT_FOUND), or when the subscription closes or gives up first. */
  done(jobId: string): Promise<IJobState> {
    const state = this.jobs.get(jobId);
    if (state !== undefined && isFinal(state.status)) return Promise.resolve(state);
    if (this.closed) return Promise.reject(closedError());
    if (!this.all && !this.following.has(jobId)) this.follow(jobId);
    return new Promise((resolve, reject) => {
      const list = this.waiters.get(jobId) ?? [];
      list.push({ resolve, reject });
      this.waiters.set(jobId, list);
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.socket?.close(1000, "client closed");
    this.socket = null;
    this.rejectAll(closedError());
  }

  private connect(): void {
    this.timer = null;
    this.snapshotted = new Set();
    let socket: WebSocketLike;
    try {
      socket = this.sockets.open();
    } catch (cause) {
      if (this.connections === 0 && this.retries === 0) throw cause; // the first: the caller sees it
      this.rejectAll(new PopOSApiError({ code: CLIENT_CODES.NETWORK_ERROR, details: {},
                                         message: "the WebSocket could not be opened" }, null, null, { cause }));
      this.close();
      return;
    }
    this.socket = socket;
    let opened = false;
    socket.addEventListener("open", () => {
      if (socket !== this.socket) return;
      opened = true;
      this.connections += 1;
      this.options.onConnect?.(this.connections);
      if (this.all) socket.send(JSON.stringify({ action: "subscribe", all: true }));
      for (const id of this.following) {
        const state = this.jobs.get(id);
        if (state === undefined || !isFinal(state.status)) this.sendSubscribe(id);
      }
    });
    socket.addEventListener("message", (event) => {
      if (socket !== this.socket) return;
      this.retries = 0; // the server is answering: the next drop starts the backoff afresh
      if (typeof event.data !== "string") return;
      let parsed: unknown;
      try {
        parsed = JSON.parse(event.data);
      } catch {
        return;
      }
      if (isRecord(parsed) && typeof parsed["event"] === "string") this.onMessage(parsed as unknown as IJobEvent);
    });
    socket.addEventListener("error", () => {
      // always followed by "close", where reconnecting is decided
    });
    socket.addEventListener("close", (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      if (this.closed) return;
      if (!this.wanted()) {
        this.close();
        return;
      }
      this.retries += 1;
      const giveUp = this.retries > this.backoff.maxRetries;
      const delay = Math.min(this.backoff.maxMs, this.backoff.initialMs * this.backoff.factor ** (this.retries - 1));
      this.options.onDisconnect?.({ code: event.code, reason: event.reason, retryInMs: giveUp ? null : delay });
      if (giveUp) {
        this.rejectAll(new PopOSApiError({ code: CLIENT_CODES.NETWORK_ERROR, details: { retries: this.retries - 1 },
                                           message: "the WebSocket could not reconnect" }));
        this.close();
        return;
      }
      if (opened) {
        this.timer = setTimeout(() => this.connect(), delay);
        return;
      }
      // The handshake failed: a refusal that no retry will change ends the subscription.
      void this.sockets.refusal().then((refusal) => {
        if (this.closed) return;
        if (refusal !== null) {
          this.rejectAll(refusal);
          this.close();
        } else {
          this.timer = setTimeout(() => this.connect(), delay);
        }
      });
    });
  }

  /** Whether anything is left to follow. */
  private wanted(): boolean {
    if (this.all) return true;
    for (const id of this.following) {
      const state = this.jobs.get(id);
      if (state === undefined || !isFinal(state.status)) return true;
    }
    return this.options.closeWhenDone === false;
  }

  private sendSubscribe(jobId: string): void {
    this.socket?.send(JSON.stringify({ action: "subscribe", job_id: jobId }));
  }

  private onMessage(event: IJobEvent): void {
    this.options.onEvent?.(event);
    const jobId = event.job_id;
    if (jobId === undefined) {
      if (event.event === "error") this.options.onError?.(new PopOSApiError(event.error));
      return;
    }
    if (!this.all && !this.following.has(jobId)) return;
    if (event.event === "snapshot") {
      this.snapshotted.add(jobId);
      this.apply(jobId, event, {
        status: event.status, progress: event.progress, eta: event.eta, stage: event.stage ?? null,
        queue_position: event.queue_position ?? null, output_url: event.output_url ?? null,
        error: errorInfo(event.error),
      });
      return;
    }
    // The server holds a subscribed job's events until its snapshot: an error first is a refusal.
    if (event.event === "error" && this.following.has(jobId) && !this.snapshotted.has(jobId)) {
      this.refused(jobId, event.error);
      return;
    }
    const progress = this.jobs.get(jobId)?.progress ?? 0; // a new job (with `all`) starts from its first event
    switch (event.event) {
      case "status":
        this.apply(jobId, event, { status: event.status });
        break;
      case "progress":
        if (event.progress >= progress) {
          this.apply(jobId, event, { progress: event.progress, eta: event.eta, stage: event.stage });
        }
        break;
      case "complete":
        this.apply(jobId, event, { status: "completed", progress: 1, eta: 0, output_url: event.output_url });
        break;
      case "error":
        this.apply(jobId, event, { status: "failed", error: event.error });
        break;
    }
  }

  /** A subscribe the server refused: retried after the backoff if it may pass later, else final. */
  private refused(jobId: string, info: IApiErrorInfo): void {
    if (RETRYABLE_CODES.has(info.code) && !this.closed) {
      const delay = Math.min(this.backoff.maxMs, this.backoff.initialMs * this.backoff.factor ** this.retries);
      setTimeout(() => {
        if (!this.closed && this.socket?.readyState === 1) this.sendSubscribe(jobId);
      }, delay);
      return;
    }
    this.following.delete(jobId);
    const error = new PopOSApiError(info);
    for (const waiter of this.waiters.get(jobId) ?? []) waiter.reject(error);
    this.waiters.delete(jobId);
    if (this.waiters.size === 0 && !this.wanted()) this.close();
  }

  private apply(jobId: string, event: IJobEvent, change: Partial<IJobState>): void {
    const before = this.jobs.get(jobId) ?? {
      job_id: jobId, status: "queued", progress: 0, eta: null, stage: null, queue_position: null,
      output_url: null, error: null,
    };
    const state: IJobState = { ...before, ...change, job_id: jobId };
    this.jobs.set(jobId, state);
    this.options.onState?.(state, event);
    if (!isFinal(state.status)) return;
    for (const waiter of this.waiters.get(jobId) ?? []) waiter.resolve(state);
    this.waiters.delete(jobId);
    if (!this.all && this.options.closeWhenDone !== false && !this.wanted()) this.close();
  }

  private rejectAll(error: PopOSApiError): void {
    for (const list of this.waiters.values()) for (const waiter of list) waiter.reject(error);
    this.waiters.clear();
  }
}

function closedError(): PopOSApiError {
  return new PopOSApiError({ code: CLIENT_CODES.SUBSCRIPTION_CLOSED, message: "the subscription was closed", details: {} });
}
