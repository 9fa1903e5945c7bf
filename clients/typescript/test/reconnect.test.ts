/**
 * The subscription survives a gateway restart: tests/test_ts_client.py restarts the gateway
 * (supervisorctl) when this test writes `restart` in WAN_TS_RESTART_DIR, and writes `restarted`
 * when the new one runs. The job runs on in the stages meanwhile; the client reconnects with
 * backoff, subscribes again, and resumes from the snapshot the new gateway sends.
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import type { IJobEvent } from "../src/index.js";
import { service } from "./server.js";

/** Resolves once `predicate()` holds, polling; rejects after `timeoutMs`. */
async function until(predicate: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const dir = process.env["WAN_TS_RESTART_DIR"];
const api = service();

test("a subscription resumes from the snapshot after the gateway restarts", {
  skip: dir === undefined ? "needs WAN_TS_RESTART_DIR (run by tests/test_ts_client.py)" : false, timeout: 90_000,
}, async (t) => {
  assert.ok(dir !== undefined);
  // Long enough to outlast the gateway's stop (a fraction of a second) with a margin: tiny steps
  // take some 30 ms here at 32x32, twice that at 64x64.
  const submitted = await api.generate({ prompt: "through a restart", model: "t2v", quality_preset: "draft",
                                         custom_options: { steps: 100, resolution: "64x64" } });
  const seen: { connection: number; event: IJobEvent }[] = [];
  let restartAsked = false;
  const sub = api.subscribe(submitted.job_id, {
    backoff: { initialMs: 100, factor: 2, maxMs: 1000 },
    onEvent: (event) => {
      seen.push({ connection: sub.connections, event });
      if (!restartAsked && event.event === "snapshot") {
        restartAsked = true; // subscribed: ask for the restart now
        writeFileSync(join(dir, "restart"), String(event.progress));
      }
    },
  });
  const final = await sub.done(submitted.job_id);
  await until(() => existsSync(join(dir, "restarted")), 60_000, "the restart to be done");
  const pids = JSON.parse(readFileSync(join(dir, "restarted"), "utf8")) as { old: number; new: number };
  assert.notEqual(pids.old, pids.new);

  assert.equal(final.status, "completed", JSON.stringify(final));
  assert.equal(final.progress, 1);
  assert.ok(sub.connections >= 2, `connections: ${sub.connections}`);
  const before = seen.filter((s) => s.connection === 1).map((s) => s.event.event);
  const after = seen.filter((s) => s.connection >= 2).map((s) => s.event);
  assert.ok(!before.includes("complete"), `completed before the restart: ${JSON.stringify(before)}`);
  assert.equal(after[0]?.event, "snapshot", JSON.stringify(after));
  // It completed on the new connection: by its events, or already in the snapshot.
  const first = after[0];
  assert.ok(after.some((e) => e.event === "complete") || (first?.event === "snapshot" && first.status === "completed"));
  t.diagnostic(`connections ${sub.connections}; after the restart: ${after.map((e) => e.event).join(" ")}`);
  const video = await api.download(submitted.job_id);
  assert.equal(Buffer.from(video.subarray(4, 8)).toString("latin1"), "ftyp");
});
