/** What the tests share: the server they run against (WAN_SERVER_URL) and a service for it. */
import { WebSocket } from "ws";

import { PopOSModelService } from "../src/index.js";

export function serverUrl(): string {
  const url = process.env["WAN_SERVER_URL"];
  if (!url) throw new Error("set WAN_SERVER_URL to a running server's URL (tests/test_ts_client.py does)");
  return url;
}

export function service(baseUrl = serverUrl()): PopOSModelService {
  return new PopOSModelService({ baseUrl, WebSocket, timeoutMs: 30_000 });
}

export const JOB_ID = /^[0-9a-f]{32}$/;
