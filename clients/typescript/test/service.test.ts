/** PopOSModelService against the running tiny server: every route, uploads, errors, the WebSocket. */
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { test } from "node:test";

import {
  CLIENT_CODES,
  Model,
  PopOSApiError,
  QualityPreset,
  type IDownloadProgress,
  type IGenerationRequest,
  type IJobEvent,
  type IJobState,
} from "../src/index.js";
import { png } from "./png.js";
import { JOB_ID, service } from "./server.js";

const api = service();

/** An API error with this code and HTTP status (and its details checked by `details`). */
async function refused(promise: Promise<unknown>, code: string, status: number | null,
                       details: Record<string, unknown> = {}): Promise<PopOSApiError> {
  const error = await promise.then(() => assert.fail(`expected ${code}`), (e: unknown) => e);
  assert.ok(error instanceof PopOSApiError, `not a PopOSApiError: ${String(error)}`);
  assert.equal(error.code, code, error.message);
  assert.equal(error.status, status);
  assert.ok(error.message.length > 0);
  for (const [key, value] of Object.entries(details)) assert.deepEqual(error.details[key], value, key);
  return error;
}

/** A TCP port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  assert.ok(address !== null && typeof address === "object");
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return address.port;
}

test("text to video: generate (JSON), follow over the WebSocket, status, result, download, list", { timeout: 60_000 }, async () => {
  const request: IGenerationRequest = {
    prompt: "a typescript cat walks on the beach", model: Model.T2V_A14B, quality_preset: QualityPreset.DRAFT,
    seed: 1234,
  };
  const submitted = await api.generate(request);
  assert.match(submitted.job_id, JOB_ID);
  assert.ok(["queued", "processing"].includes(submitted.status), submitted.status);
  assert.equal(typeof submitted.created_at, "number");

  const events: IJobEvent[] = [];
  const states: IJobState[] = [];
  const final = await api.wait(submitted.job_id, { onEvent: (e) => events.push(e), onState: (s) => states.push(s) });
  assert.equal(events[0]?.event, "snapshot");
  assert.equal(final.status, "completed");
  assert.equal(final.progress, 1);
  assert.equal(final.output_url, `/api/v1/files/${submitted.job_id}.mp4`);
  assert.ok(events.some((e) => e.event === "complete"), JSON.stringify(events));
  const progress = states.map((s) => s.progress);
  assert.deepEqual(progress, [...progress].sort((a, b) => a - b), "progress went backwards");

  const status = await api.status(submitted.job_id);
  assert.equal(status.status, "completed");
  assert.equal(status.progress, 1);

  const result = await api.result(submitted.job_id);
  assert.equal(result.output_url, final.output_url);
  assert.equal(result.metadata["seed"], 1234);
  assert.equal(result.metadata["model"], "t2v-A14B");
  assert.equal(result.metadata["quality_preset"], "draft");

  const seen: IDownloadProgress[] = [];
  const video = await api.download(submitted.job_id, { onProgress: (p) => seen.push({ ...p }) });
  const last = seen.at(-1);
  assert.ok(last !== undefined && last.total !== null);
  assert.equal(last.received, video.byteLength);
  assert.equal(last.total, video.byteLength);
  assert.ok(seen.every((p, i) => i === 0 || p.received >= seen[i - 1]!.received), "received went backwards");
  assert.equal(Buffer.from(video.subarray(4, 8)).toString("latin1"), "ftyp"); // an MP4
  const direct = new Uint8Array(await (await fetch(api.videoUrl(submitted.job_id))).arrayBuffer());
  assert.deepEqual(video, direct);

  const listed = await api.list({ status: "completed", limit: 100 });
  assert.ok(listed.jobs.some((j) => j.job_id === submitted.job_id));
  assert.ok(listed.jobs.every((j) => j.status === "completed"));
  assert.equal(listed.limit, 100);
  assert.ok(listed.total >= listed.jobs.length);
});

test("image to video: the image goes as multipart/form-data", { timeout: 60_000 }, async () => {
  const image = new Blob([png(40, 24)], { type: "image/png" });
  const submitted = await api.generate(
    { prompt: "the gradient turns", model: "i2v", quality_preset: QualityPreset.DRAFT, seed: 5 }, image);
  const final = await api.wait(submitted.job_id);
  assert.equal(final.status, "completed", JSON.stringify(final));
  const params = (await api.result(submitted.job_id)).metadata["params"] as Record<string, unknown>;
  assert.match(String(params["image_sha256"]), /^[0-9a-f]{64}$/);

  // Bytes with a name and a declared type go the same way; what the server refuses comes back typed.
  await refused(api.generate({ prompt: "no image", model: "i2v-A14B", quality_preset: "draft" }),
                "VALIDATION_ERROR", 422, { field: "image" });
  await refused(api.generate({ prompt: "a lie", model: "i2v", quality_preset: "draft" },
                             { data: png(16, 16), filename: "x.jpg", type: "image/jpeg" }),
                "UNSUPPORTED_MEDIA_TYPE", 415, { field: "image", declared: "image/jpeg", detected: "image/png" });
  await refused(api.generate({ prompt: "cut short", model: "i2v", quality_preset: "draft" },
                             { data: png(16, 16).subarray(0, 40), filename: "cut.png" }),
                "INVALID_IMAGE", 422, { field: "image" });
});

test("cancel: a running job stops; cancelling it again is 409 JOB_NOT_CANCELLABLE", { timeout: 60_000 }, async () => {
  const submitted = await api.generate({
    prompt: "a long one", model: "t2v", quality_preset: "draft", custom_options: { steps: 60 },
  });
  const cancelled = await api.cancel(submitted.job_id);
  assert.equal(cancelled.status, "cancelled");
  assert.equal(cancelled.error?.["code"], "JOB_CANCELLED");
  await refused(api.cancel(submitted.job_id), "JOB_NOT_CANCELLABLE", 409, { status: "cancelled" });
  // A subscription to a final job resolves from its snapshot alone.
  const final = await api.wait(submitted.job_id);
  assert.equal(final.status, "cancelled");
  assert.equal(final.error?.code, "JOB_CANCELLED");
  await refused(api.download(submitted.job_id), "RESULT_NOT_AVAILABLE", 404, { status: "cancelled" });
});

test("Idempotency-Key: a retried generate gives the same job; another body under the key is 409", { timeout: 60_000 }, async () => {
  const key = `ts-${Date.now()}-${Math.random()}`;
  const request: IGenerationRequest = { prompt: "once only", model: "t2v", quality_preset: "draft" };
  const first = await api.generate(request, undefined, { idempotencyKey: key });
  const again = await api.generate(request, undefined, { idempotencyKey: key });
  assert.equal(again.job_id, first.job_id);
  await refused(api.generate({ ...request, prompt: "something else" }, undefined, { idempotencyKey: key }),
                "IDEMPOTENCY_KEY_REUSED", 409);
  const other = await api.generate(request, undefined, { idempotencyKey: `${key}-2` });
  assert.notEqual(other.job_id, first.job_id);
  await api.wait(first.job_id);
  await api.wait(other.job_id);
});

test("errors carry the structured code, message, details and HTTP status", { timeout: 60_000 }, async () => {
  const missing = "0".repeat(32);
  await refused(api.status(missing), "JOB_NOT_FOUND", 404, { job_id: missing });
  await refused(api.result(missing), "JOB_NOT_FOUND", 404);
  await refused(api.generate({ prompt: "x", model: "t2v", seed: -1 }), "VALIDATION_ERROR", 422, { field: "seed" });
  await refused(api.generate({ prompt: "x", model: "t2v", custom_options: { num_frames: 6 } }),
                "VALIDATION_ERROR", 422, { field: "custom_options.num_frames" });
  await refused(api.list({ limit: 0 }), "VALIDATION_ERROR", 422);
  // Over the WebSocket: a refused subscribe rejects done() with the server's error (no HTTP status).
  await refused(api.wait(missing), "JOB_NOT_FOUND", null);
  // No server there: NETWORK_ERROR, no status.
  const nowhere = service(`http://127.0.0.1:${await closedPort()}`);
  await refused(nowhere.status(missing), CLIENT_CODES.NETWORK_ERROR, null);
  const aborted = new AbortController();
  aborted.abort();
  await refused(api.status(missing, { signal: aborted.signal }), CLIENT_CODES.ABORTED, null);
});

test("the WebSocket retries with exponential backoff, then gives up", { timeout: 60_000 }, async () => {
  const nowhere = service(`http://127.0.0.1:${await closedPort()}`);
  const waits: (number | null)[] = [];
  const sub = nowhere.subscribe("0".repeat(32), {
    backoff: { initialMs: 20, factor: 2, maxMs: 60, maxRetries: 4 },
    onDisconnect: (info) => waits.push(info.retryInMs),
  });
  await refused(sub.done("0".repeat(32)), CLIENT_CODES.NETWORK_ERROR, null, { retries: 4 });
  assert.deepEqual(waits, [20, 40, 60, 60, null]);
  assert.equal(sub.connections, 0);
});

test("subscribeAll: a snapshot of each active job, then the events of new ones", { timeout: 60_000 }, async () => {
  const events: IJobEvent[] = [];
  let connected!: () => void;
  const open = new Promise<void>((resolve) => { connected = resolve; });
  const sub = api.subscribeAll({ onEvent: (e) => events.push(e), onConnect: () => connected() });
  try {
    await open;
    const submitted = await api.generate({ prompt: "seen by all", model: "t2v", quality_preset: "draft" });
    const final = await sub.done(submitted.job_id);
    assert.equal(final.status, "completed");
    const mine = events.filter((e) => e.job_id === submitted.job_id).map((e) => e.event);
    assert.ok(mine.includes("complete") && mine.includes("progress"), JSON.stringify(mine));
  } finally {
    sub.close();
  }
});
