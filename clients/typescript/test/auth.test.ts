/**
 * API keys against a gateway that requires them (tests/test_ts_client.py starts one beside the
 * tiny system's, on the same broker, and makes a key): Bearer on REST, the `wan.bearer`
 * subprotocol on the WebSocket, and the refusals typed.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { WebSocket } from "ws";

import { PopOSApiError, PopOSModelService } from "../src/index.js";

const url = process.env["WAN_KEYED_URL"];
const token = process.env["WAN_API_KEY"];
const skip = url === undefined || token === undefined ? "needs WAN_KEYED_URL and WAN_API_KEY (run by tests/test_ts_client.py)" : false;

function keyed(apiKey?: string): PopOSModelService {
  assert.ok(url !== undefined);
  return new PopOSModelService({ baseUrl: url, WebSocket, ...(apiKey === undefined ? {} : { apiKey }) });
}

async function unauthorized(promise: Promise<unknown>): Promise<void> {
  const error = await promise.then(() => assert.fail("expected 401"), (e: unknown) => e);
  assert.ok(error instanceof PopOSApiError, String(error));
  assert.equal(error.status, 401);
  assert.equal(error.code, "UNAUTHORIZED");
}

test("with a key: REST with Bearer, the WebSocket with the wan.bearer subprotocol", { skip, timeout: 60_000 }, async () => {
  const api = keyed(token);
  const submitted = await api.generate({ prompt: "a keyed job", model: "t2v", quality_preset: "draft" });
  const connections: number[] = [];
  const final = await api.wait(submitted.job_id, { onConnect: (n) => connections.push(n) });
  assert.equal(final.status, "completed");
  assert.deepEqual(connections, [1]);
  const video = await api.download(submitted.job_id);
  assert.equal(Buffer.from(video.subarray(4, 8)).toString("latin1"), "ftyp");
  assert.ok((await api.list({ limit: 100 })).jobs.some((j) => j.job_id === submitted.job_id));
});

test("without a key, or with a wrong one: 401 UNAUTHORIZED, on REST and on the WebSocket", { skip, timeout: 60_000 }, async () => {
  await unauthorized(keyed().list());
  await unauthorized(keyed("wan_00000000_not-a-secret").status("0".repeat(32)));
  // The refused handshake ends the subscription with the reason (asked of a REST route), no retries.
  const attempts: (number | null)[] = [];
  const sub = keyed("wan_00000000_not-a-secret").subscribe("0".repeat(32), {
    onDisconnect: (info) => attempts.push(info.retryInMs),
  });
  await unauthorized(sub.done("0".repeat(32)));
  assert.equal(sub.connections, 0);
  assert.equal(attempts.length, 1);
});
