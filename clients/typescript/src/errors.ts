import type { IApiErrorInfo } from "./types.js";

/** Codes the client itself uses when the server gave no structured error. */
export const CLIENT_CODES = {
  /** no HTTP answer: the server is unreachable, the connection broke, or the request timed out */
  NETWORK_ERROR: "NETWORK_ERROR",
  /** an HTTP error whose body is not the server's structured error (a proxy's page, say) */
  HTTP_ERROR: "HTTP_ERROR",
  /** a 2xx answer whose body is not the JSON the route documents */
  BAD_RESPONSE: "BAD_RESPONSE",
  /** the caller aborted the request (its AbortSignal fired) */
  ABORTED: "ABORTED",
  /** a WebSocket subscription was closed (or gave up reconnecting) before the job was final */
  SUBSCRIPTION_CLOSED: "SUBSCRIPTION_CLOSED",
} as const;

/**
 * An error of the API: the server's structured `{code, message, details}` with the HTTP status it
 * came with (`status` is null for an error that had no HTTP answer, or came over the WebSocket).
 * For 429 and 503 `retryAfter` holds the seconds of the Retry-After header, when sent.
 */
export class PopOSApiError extends Error implements IApiErrorInfo {
  override readonly name = "PopOSApiError";
  readonly code: string;
  readonly details: Record<string, unknown>;
  readonly status: number | null;
  readonly retryAfter: number | null;

  constructor(info: IApiErrorInfo, status: number | null = null, retryAfter: number | null = null,
              options?: { cause?: unknown }) {
    super(info.message, options);
    this.code = info.code;
    this.details = info.details;
    this.status = status;
    this.retryAfter = retryAfter;
  }

  /** The error of an HTTP answer that is not 2xx (its body read as the structured error if it is one). */
  static async fromResponse(response: Response): Promise<PopOSApiError> {
    const retry = Number(response.headers.get("retry-after") ?? NaN);
    const retryAfter = Number.isFinite(retry) ? retry : null;
    let body: unknown = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: below
    }
    const info = errorInfo(isRecord(body) ? body["error"] : undefined);
    return new PopOSApiError(
      info ?? { code: CLIENT_CODES.HTTP_ERROR, message: `HTTP ${response.status}`, details: {} },
      response.status,
      retryAfter,
    );
  }
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** `value` as a structured error if it is one (a string code and message; details an object). */
export function errorInfo(value: unknown): IApiErrorInfo | null {
  if (!isRecord(value) || typeof value["code"] !== "string" || typeof value["message"] !== "string") {
    return null;
  }
  const details = value["details"];
  return { code: value["code"], message: value["message"], details: isRecord(details) ? details : {} };
}
