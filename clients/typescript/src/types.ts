/**
 * The client's types, in the desktop app's naming (IGenerationRequest, QualityPreset, ...).
 *
 * Everything the OpenAPI document describes is taken from src/openapi.ts, which is generated from
 * the server's document (itself generated from common/catalog.py), so a field or bound changed on
 * the server shows up here at the next `npm run generate`. The WebSocket events and the job list,
 * which the document does not describe field by field, are written here.
 */
import type { paths } from "./openapi.js";

type Json<T> = T extends { content: { "application/json": infer B } } ? B : never;

type GenerateOp = paths["/api/v1/generate"]["post"];
type GenerateJson = GenerateOp["requestBody"]["content"]["application/json"];

/** The body of POST /api/v1/generate (the image goes as a multipart part: see `IImageInput`). */
export type IGenerationRequest = Omit<GenerateJson, "image">;
/** Overrides of the preset (steps, cfg_scale, resolution "WxH", fps, duration, num_frames, ...). */
export type ICustomOptions = NonNullable<IGenerationRequest["custom_options"]>;
/** 202 of POST /api/v1/generate: the job is queued. `created_at` is Unix seconds. */
export type IGenerationResponse = Json<GenerateOp["responses"][202]>;
/** GET /api/v1/status/{job_id} and POST /api/v1/cancel/{job_id}. */
export type IJobStatus = Json<paths["/api/v1/status/{job_id}"]["get"]["responses"][200]>;
/** GET /api/v1/result/{job_id}. */
export type IJobResult = Json<paths["/api/v1/result/{job_id}"]["get"]["responses"][200]>;
/** The query of GET /api/v1/jobs. */
export type IListQuery = NonNullable<paths["/api/v1/jobs"]["get"]["parameters"]["query"]>;
/** The structured error every route answers with: `{success: false, error: {code, message, details}}`. */
export type IErrorBody = Json<GenerateOp["responses"][422]>;

export type ModelType = IGenerationRequest["model"];
export type JobStatus = IJobStatus["status"];
export type QualityPresetT = NonNullable<IGenerationRequest["quality_preset"]>;

/** The quality presets, named as in the desktop app (`QualityPreset.DRAFT`, ...). */
export const QualityPreset = {
  DRAFT: "draft", // fast preview
  STANDARD: "standard",
  PROFESSIONAL: "pro",
  CINEMA: "cinema",
  ULTIMATE: "ultimate",
} as const satisfies Record<string, QualityPresetT>;
export type QualityPreset = (typeof QualityPreset)[keyof typeof QualityPreset];

/** Model ids and their aliases. */
export const Model = {
  T2V_A14B: "t2v-A14B",
  I2V_A14B: "i2v-A14B",
  TI2V_5B: "ti2v-5B",
  S2V_14B: "s2v-14B",
} as const satisfies Record<string, ModelType>;

// The server's presets and statuses must all have a name here: a new one fails `tsc` until added.
type Missing<All, Named> = Exclude<All, Named> extends never ? true : ["not named here:", Exclude<All, Named>];
const presetsNamed: Missing<QualityPresetT, QualityPreset> = true;
void presetsNamed;

export const FINAL_STATUSES: readonly JobStatus[] = ["completed", "failed", "cancelled"];

/** One job in GET /api/v1/jobs (its status, plus when it was made and which attempt runs). */
export interface IJobListEntry extends IJobStatus {
  attempt?: number;
  created_at?: number;
}

/** GET /api/v1/jobs: newest first. */
export interface IJobList {
  jobs: IJobListEntry[];
  total: number;
  limit: number;
  offset: number;
}

/** The structured error of a job or of a request: `code` is e.g. JOB_NOT_FOUND, VALIDATION_ERROR. */
export interface IApiErrorInfo {
  code: string;
  message: string;
  details: Record<string, unknown>;
}

// ---- WebSocket /ws ----

/** What the server sends on subscribe: the job as it is now (the point a reconnect resumes from). */
export interface ISnapshotEvent extends IJobStatus {
  event: "snapshot";
  output_url?: string;
}
export interface IStatusEvent {
  event: "status";
  job_id: string;
  status: JobStatus;
}
export interface IProgressEvent {
  event: "progress";
  job_id: string;
  progress: number;
  eta: number | null;
  stage: string | null;
  attempt?: number;
}
export interface ICompleteEvent {
  event: "complete";
  job_id: string;
  output_url: string;
}
/** A job failed (`stage` names where), or a subscribe or message was refused (`job_id` absent or unknown). */
export interface IErrorEvent {
  event: "error";
  job_id?: string;
  stage?: string | null;
  error: IApiErrorInfo;
}
export type IJobEvent = ISnapshotEvent | IStatusEvent | IProgressEvent | ICompleteEvent | IErrorEvent;

/** A followed job as the subscription knows it: the snapshot with every later event applied. */
export interface IJobState {
  job_id: string;
  status: JobStatus;
  progress: number;
  eta: number | null;
  stage: string | null;
  queue_position: number | null;
  output_url: string | null;
  error: IApiErrorInfo | null;
}

/** Bytes of a download so far; `total` from Content-Length (null when the server sent none). */
export interface IDownloadProgress {
  received: number;
  total: number | null;
}
