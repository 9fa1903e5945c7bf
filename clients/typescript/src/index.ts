export * from "./types.js";
export * from "./errors.js";
export * from "./PopOSModelService.js";
export type { paths } from "./openapi.js";
