// The studio page: the submit form (built from the server's models, presets and OpenAPI document),
// the queue and the results, kept live by the WebSocket.

import { Api, ApiError, Live, storedKey, storeKey } from "./api.js";

const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["queued", "processing"]);
const FINAL = new Set(["completed", "failed", "cancelled"]);
const STATUS_TEXT = {
  queued: "Queued", processing: "Generating", completed: "Done", failed: "Failed", cancelled: "Cancelled",
};
const OPTION_LABELS = {
  steps: "Steps", cfg_scale: "Guidance", cfg_scale_2: "Guidance, low-noise expert", shift: "Shift",
  resolution: "Resolution", fps: "Frames per second", duration: "Duration (seconds)", num_frames: "Frames",
};
// Which preset field shows as each option's placeholder (what the option overrides).
const PRESET_OF_OPTION = {
  steps: "steps", cfg_scale: "guidance_scale", cfg_scale_2: "guidance_scale_2", shift: "shift",
  resolution: "resolution", fps: "fps", num_frames: "num_frames",
};

const state = {
  api: new Api(storedKey()),
  live: null,
  models: [],       // GET /api/v1/models
  presets: {},      // model id -> preset name -> row
  inputs: [],       // [{name, accept, description}] from the OpenAPI document's multipart schema
  options: {},      // custom option name -> JSON Schema, from the OpenAPI document
  jobs: new Map(),  // job id -> Job
};

// ---- small helpers ----

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function toast(message, kind = "info") {
  const node = el("div", { class: `toast ${kind}`, text: message });
  $("toasts").append(node);
  setTimeout(() => node.remove(), 5000);
}

function describeError(err) {
  if (!(err instanceof ApiError)) return "Something went wrong.";
  const field = err.details && err.details.field ? ` (${err.details.field})` : "";
  return `${err.message}${field}`;
}

function titleCase(name) {
  const words = name.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function seconds(value) {
  if (value === null || value === undefined) return "";
  if (value < 60) return `${Math.max(0, Math.round(value))} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

function presetSummary(row) {
  if (!row) return "";
  const parts = [`${row.steps} steps`, row.resolution, `${row.num_frames} frames at ${row.fps} fps`];
  if (row.fps) parts.push(`${(row.num_frames / row.fps).toFixed(1)} s`);
  return parts.join(" · ");
}

function authLost(err) {
  if (err instanceof ApiError && err.status === 401 && state.api.key) {
    signOut("This API key is no longer accepted. Enter a valid one.");
    return true;
  }
  return false;
}

// ---- start: the key, then the catalog ----

async function boot() {
  $("key-form").addEventListener("submit", onKey);
  $("sign-out").addEventListener("click", () => signOut(""));
  try {
    await start();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      const stale = Boolean(state.api.key);
      storeKey("");
      state.api = new Api("");
      showKeyPanel(stale ? "The stored API key is not valid any more. Enter a valid one." : "");
    } else {
      setConnection("offline");
      toast(`Cannot load the studio: ${describeError(err)}`, "error");
    }
  }
}

function showKeyPanel(message) {
  $("studio").hidden = true;
  $("key-panel").hidden = false;
  $("sign-out").hidden = true;
  $("key-error").textContent = message;
  setConnection("signed-out");
  $("api-key").focus();
}

async function onKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  state.api = new Api(key);
  $("key-error").textContent = "";
  try {
    await start();
    storeKey(key);
    $("api-key").value = "";
  } catch (err) {
    state.api = new Api("");
    $("key-error").textContent = err instanceof ApiError && err.status === 401
      ? "This API key is not valid." : describeError(err);
  }
}

function signOut(message) {
  storeKey("");
  if (state.live) state.live.close();
  state.live = null;
  for (const job of state.jobs.values()) job.dispose();
  state.jobs.clear();
  $("queue").replaceChildren();
  $("results").replaceChildren();
  state.api = new Api("");
  showKeyPanel(message);
}

async function start() {
  const [models, presets, doc] = await Promise.all([state.api.models(), state.api.presets(), state.api.openapi()]);
  state.models = models.models;
  state.presets = presets.presets;
  readCatalog(doc);
  buildForm();
  $("key-panel").hidden = true;
  $("studio").hidden = false;
  $("sign-out").hidden = !state.api.key;
  await refresh();
  state.live = new Live(state.api.key, { onevent: onEvent, onstate: setConnection, onopen: refresh });
}

// What the generate request takes, from the OpenAPI document (generated from the server's catalog):
// the input files (the multipart parts besides `request`) and the custom options with their bounds.
function readCatalog(doc) {
  const content = doc.paths["/api/v1/generate"].post.requestBody.content;
  const multipart = content["multipart/form-data"].schema.properties;
  state.inputs = Object.entries(multipart)
    .filter(([name]) => name !== "request")
    .map(([name, schema]) => ({ name, accept: schema.contentMediaType || "", description: schema.description || "" }));
  const request = content["application/json"].schema.properties;
  state.options = (request.custom_options && request.custom_options.properties) || {};
  state.promptMax = (request.prompt && request.prompt.maxLength) || 2000;
}

// ---- the form ----

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function buildForm() {
  const model = $("model");
  model.replaceChildren();
  for (const m of state.models) {
    const alias = m.aliases && m.aliases.length ? ` (${m.aliases[0]})` : "";
    model.append(el("option", { value: m.id, disabled: !m.served, text: m.served ? `${m.id}${alias}` : `${m.id} — not served` }));
  }
  const first = state.models.find((m) => m.served);
  if (first) model.value = first.id;
  model.onchange = onModelChange;
  $("preset").onchange = updatePresetSummary;

  const inputs = $("inputs");
  inputs.replaceChildren();
  for (const spec of state.inputs) inputs.append(inputField(spec));

  const options = $("options");
  options.replaceChildren();
  for (const [name, schema] of Object.entries(state.options)) options.append(optionField(name, schema));

  const prompt = $("prompt");
  const max = state.promptMax;
  prompt.setAttribute("maxlength", String(max));
  const count = () => { $("prompt-count").textContent = `${prompt.value.length} / ${max}`; };
  prompt.oninput = count;
  count();
  $("generate-form").onsubmit = onSubmit;
  $("refresh").onclick = () => refresh().catch((err) => authLost(err) || toast(describeError(err), "error"));
  onModelChange();
}

function inputField(spec) {
  const id = `input-${spec.name}`;
  const kind = spec.accept.split("/")[0];
  const preview = kind === "audio"
    ? el("audio", { class: "input-preview", controls: true, hidden: true })
    : el("img", { class: "input-preview", alt: `Selected ${spec.name}`, hidden: true });
  const file = el("input", { id, name: spec.name, type: "file", accept: spec.accept });
  const hint = el("p", { class: "muted small", id: `${id}-hint` });
  file.setAttribute("aria-describedby", hint.id);
  const clear = el("button", { type: "button", class: "ghost small", hidden: true, text: "Remove" });
  clear.setAttribute("aria-label", `Remove ${spec.name}`);
  let url = null;
  const show = () => {
    if (url) URL.revokeObjectURL(url);
    url = null;
    const chosen = file.files && file.files[0];
    preview.hidden = !chosen;
    clear.hidden = !chosen;
    if (chosen) {
      url = URL.createObjectURL(chosen);
      preview.src = url;
    } else {
      preview.removeAttribute("src");
    }
  };
  file.addEventListener("change", show);
  clear.addEventListener("click", () => { file.value = ""; show(); });
  return el("div", { class: "field input-field", "data-input": spec.name },
    el("label", { for: id, text: titleCase(spec.name) }), file, hint, el("div", { class: "input-row" }, preview, clear));
}

function optionField(name, schema) {
  const id = `opt-${name}`;
  const label = el("label", { for: id, text: OPTION_LABELS[name] || titleCase(name) });
  let control;
  if (name === "resolution") {
    control = el("select", { id, name });
  } else if (schema.type === "string" || (Array.isArray(schema.type) && schema.type.includes("string"))) {
    control = el("input", { id, name, type: "text", pattern: schema.pattern ? schema.pattern.replace(/^\^|\$$/g, "") : null });
  } else {
    const integer = schema.type === "integer" || (Array.isArray(schema.type) && schema.type.includes("integer"));
    control = el("input", {
      id, name, type: "number", inputmode: integer ? "numeric" : "decimal",
      min: schema.minimum, max: schema.maximum, step: name === "num_frames" ? 4 : integer ? 1 : "any",
    });
  }
  control.dataset.option = name;
  control.dataset.kind = Array.isArray(schema.type) ? schema.type[0] : schema.type;
  if (schema.description) control.title = schema.description;
  return el("div", { class: "field" }, label, control);
}

function onModelChange() {
  const model = currentModel();
  if (!model) return;
  const summary = model.summary || "";
  const starting = model.ready === false ? " Its processes are starting: jobs wait until they are up." : "";
  $("model-summary").textContent = summary.charAt(0).toUpperCase() + summary.slice(1) + (summary ? "." : "") + starting;
  const preset = $("preset");
  const previous = preset.value || "standard";
  preset.replaceChildren();
  for (const name of model.presets || []) preset.append(el("option", { value: name, text: titleCase(name) }));
  preset.value = (model.presets || []).includes(previous) ? previous : (model.presets || [])[0] || "";
  const uses = model.inputs || {};
  for (const field of document.querySelectorAll("[data-input]")) {
    const use = uses[field.dataset.input];
    field.hidden = !use;
    const file = field.querySelector("input[type=file]");
    file.required = use === "required";
    if (!use) { file.value = ""; file.dispatchEvent(new Event("change")); }
    field.querySelector("p").textContent = use === "required" ? "Required for this model." : "Optional: leave empty for text only.";
  }
  updatePresetSummary();
}

function updatePresetSummary() {
  const model = currentModel();
  const row = model && (state.presets[model.id] || {})[$("preset").value];
  $("preset-summary").textContent = presetSummary(row);
  for (const control of document.querySelectorAll("[data-option]")) {
    const name = control.dataset.option;
    const value = row ? row[PRESET_OF_OPTION[name]] : undefined;
    if (name === "resolution") {
      const chosen = control.value;
      control.replaceChildren(el("option", { value: "", text: row ? `Preset (${row.resolution})` : "Preset" }));
      for (const res of (model && model.resolutions) || []) control.append(el("option", { value: res, text: res.replace("x", " × ") }));
      control.value = [...control.options].some((o) => o.value === chosen) ? chosen : "";
    } else if (name === "duration") {
      control.placeholder = row && row.fps ? `${(row.num_frames / row.fps).toFixed(2)}` : "";
    } else {
      control.placeholder = value === undefined || value === null ? "default" : String(value);
    }
    if (name === "num_frames" && model && model.max_frames) control.max = String(model.max_frames);
  }
}

function readRequest() {
  const model = currentModel();
  const request = { prompt: $("prompt").value, model: model ? model.id : "", quality_preset: $("preset").value };
  const negative = $("negative_prompt").value.trim();
  if (negative) request.negative_prompt = negative;
  for (const name of ["seed", "priority"]) {
    const value = $(name).value.trim();
    if (value !== "") request[name] = Number(value);
  }
  const options = {};
  for (const control of document.querySelectorAll("[data-option]")) {
    const value = control.value.trim();
    if (value === "") continue;
    const kind = control.dataset.kind;
    options[control.dataset.option] = kind === "integer" || kind === "number" ? Number(value) : value;
  }
  if (Object.keys(options).length) request.custom_options = options;
  return request;
}

async function onSubmit(event) {
  event.preventDefault();
  const error = $("form-error");
  error.textContent = "";
  if (!$("prompt").value.trim()) {
    error.textContent = "Write a prompt: what the video shows.";
    $("prompt").focus();
    return;
  }
  const files = {};
  for (const field of document.querySelectorAll("[data-input]")) {
    if (field.hidden) continue;
    const input = field.querySelector("input[type=file]");
    const file = input.files && input.files[0];
    if (input.required && !file) {
      error.textContent = `This model needs ${field.dataset.input === "image" ? "an image" : `a ${field.dataset.input} file`}.`;
      input.focus();
      return;
    }
    if (file) files[field.dataset.input] = file;
  }
  const request = readRequest();
  const button = $("generate");
  button.disabled = true;
  button.textContent = "Submitting…";
  try {
    const submitted = await state.api.generate(request, files);
    const job = upsert(submitted.job_id, { status: submitted.status, queue_position: submitted.queue_position,
      eta: submitted.eta_seconds, created_at: submitted.created_at });
    job.describe({ prompt: request.prompt, model: request.model, preset: request.quality_preset });
    toast("Queued. Progress shows in the queue.");
  } catch (err) {
    if (!authLost(err)) error.textContent = describeError(err);
  } finally {
    button.disabled = false;
    button.textContent = "Generate";
  }
}

// ---- jobs ----

class Job {
  constructor(id) {
    this.id = id;
    this.status = "queued";
    this.progress = 0;
    this.eta = null;
    this.stage = null;
    this.queue_position = null;
    this.error = null;
    this.created_at = Date.now() / 1000;
    this.info = null;        // {prompt, model, preset, params}
    this.detailsAsked = false;
    this.video = null;       // {url, blob}
    this.videoAsked = false;
    this.preview = null;     // {url, blob}
    this.build();
  }

  build() {
    const short = this.id.slice(0, 8);
    this.promptEl = el("p", { class: "job-prompt", text: "…" });
    this.badge = el("span", { class: "badge" });
    this.meta = el("p", { class: "job-meta muted small", text: `#${short}` });
    this.bar = el("progress", { max: 100, value: 0 });
    this.pct = el("span", { class: "pct", text: "0%" });
    this.detail = el("p", { class: "job-detail muted small" });
    this.previewImg = el("img", { class: "preview", hidden: true });
    this.errorEl = el("p", { class: "error small", hidden: true });
    this.cancelBtn = el("button", { type: "button", class: "danger small", text: "Cancel" });
    this.cancelBtn.addEventListener("click", () => this.cancel());
    this.videoEl = el("video", { controls: true, playsinline: true, muted: true, loop: true, preload: "auto", hidden: true });
    this.download = el("a", { class: "button small", hidden: true, text: "Download" });
    this.progressRow = el("div", { class: "job-progress" }, this.bar, this.pct);
    this.node = el("li", { class: "job", "data-job-id": this.id },
      el("div", { class: "job-head" }, this.promptEl, this.badge),
      this.meta, this.progressRow, this.detail, this.previewImg, this.videoEl, this.errorEl,
      el("div", { class: "job-actions" }, this.cancelBtn, this.download));
  }

  update(fields) {
    for (const key of ["status", "eta", "stage", "queue_position", "error", "created_at"]) {
      if (fields[key] !== undefined) this[key] = fields[key];
    }
    if (typeof fields.progress === "number") {
      this.progress = fields.status && fields.status !== this.status ? fields.progress : Math.max(this.progress, fields.progress);
    }
    if (this.status === "completed") this.progress = 1;
    this.render();
  }

  describe(info) {
    this.info = { ...(this.info || {}), ...info };
    this.render();
  }

  async loadDetails() {
    if (this.detailsAsked) return;
    this.detailsAsked = true;
    try {
      const result = await state.api.result(this.id);
      const md = result.metadata || {};
      const params = md.params || {};
      this.describe({ prompt: params.prompt, model: md.model, preset: md.quality_preset, params });
      if (result.error) this.update({ error: result.error });
    } catch (err) {
      this.detailsAsked = false;
      authLost(err);
    }
  }

  async loadVideo() {
    if (this.videoAsked) return;
    this.videoAsked = true;
    try {
      this.video = await state.api.mediaUrl(`/api/v1/files/${this.id}.mp4`);
      this.render();
    } catch (err) {
      this.videoAsked = false;
      if (!authLost(err)) this.errorEl.textContent = "The video could not be loaded.";
    }
  }

  async showPreview(event) {
    if (!event.frame_url || FINAL.has(this.status)) return;
    const step = event.step;
    try {
      const media = await state.api.mediaUrl(event.frame_url);
      if (FINAL.has(this.status)) {
        if (media.blob) URL.revokeObjectURL(media.url);
        return;
      }
      if (this.preview && this.preview.blob) URL.revokeObjectURL(this.preview.url);
      this.preview = media;
      this.previewImg.src = media.url;
      this.previewImg.alt = step !== undefined && event.steps ? `Preview at step ${step} of ${event.steps}` : "Preview";
      this.previewImg.hidden = false;
    } catch {
      // a preview is a nicety: the next one, or the video, follows
    }
  }

  async cancel() {
    this.cancelBtn.disabled = true;
    try {
      this.update(await state.api.cancel(this.id));
      toast("Cancelled.");
    } catch (err) {
      if (!authLost(err)) toast(describeError(err), "error");
      this.cancelBtn.disabled = false;
    }
  }

  render() {
    const info = this.info || {};
    const label = info.prompt || "Untitled job";
    this.promptEl.textContent = label;
    this.node.setAttribute("aria-label", `${STATUS_TEXT[this.status] || this.status}: ${label}`);
    this.badge.textContent = STATUS_TEXT[this.status] || this.status;
    this.badge.className = `badge status-${this.status}`;
    const params = info.params || {};
    const size = params.width && params.height ? `${params.width}×${params.height}` : null;
    const length = params.num_frames && params.fps ? `${(params.num_frames / params.fps).toFixed(1)} s` : null;
    this.meta.textContent = [info.model, info.preset && titleCase(info.preset), size, length,
      params.seed !== undefined ? `seed ${params.seed}` : null, `#${this.id.slice(0, 8)}`].filter(Boolean).join(" · ");

    const percent = this.progress >= 1 ? 100 : Math.floor(this.progress * 100);
    this.bar.value = percent;
    this.bar.setAttribute("aria-label", `Progress: ${label}`);
    this.bar.setAttribute("aria-valuetext", `${percent}%`);
    this.pct.textContent = `${percent}%`;
    const active = ACTIVE.has(this.status);
    this.progressRow.hidden = !active && this.status !== "completed";
    this.cancelBtn.hidden = !active;
    this.cancelBtn.setAttribute("aria-label", `Cancel: ${label}`);
    if (active) this.cancelBtn.disabled = false;

    const bits = [];
    if (this.status === "queued" && this.queue_position) bits.push(`position ${this.queue_position} in the queue`);
    if (this.status === "processing" && this.stage) bits.push(this.stage.replace(/_/g, " "));
    if (active && this.eta) bits.push(`about ${seconds(this.eta)} left`);
    this.detail.textContent = bits.join(" · ");
    this.detail.hidden = !bits.length;

    const error = this.status === "failed" && this.error ? this.error.message || this.error.code : "";
    this.errorEl.textContent = error;
    this.errorEl.hidden = !error;

    if (FINAL.has(this.status)) {
      this.previewImg.hidden = true;
      if (this.preview && this.preview.blob) URL.revokeObjectURL(this.preview.url);
      this.preview = null;
    }
    if (this.status === "completed") {
      this.progressRow.hidden = true;
      if (this.video) {
        if (this.videoEl.getAttribute("src") !== this.video.url) this.videoEl.src = this.video.url;
        this.videoEl.hidden = false;
        this.videoEl.setAttribute("aria-label", `Video: ${label}`);
        this.download.hidden = false;
        this.download.href = this.video.url;
        this.download.download = `${this.id}.mp4`;
        this.download.setAttribute("aria-label", `Download: ${label}`);
      } else {
        this.loadVideo();
      }
    }
    place(this);
  }

  dispose() {
    for (const media of [this.video, this.preview]) if (media && media.blob) URL.revokeObjectURL(media.url);
    this.node.remove();
  }
}

// Active jobs in the queue (oldest first, the order they run in), finished ones in the results (newest first).
function place(job) {
  const list = ACTIVE.has(job.status) ? $("queue") : $("results");
  if (job.node.parentElement !== list) {
    const newestFirst = list.id === "results";
    const after = [...list.children].find((other) => {
      const o = state.jobs.get(other.dataset.jobId);
      return o && (newestFirst ? o.created_at < job.created_at : o.created_at > job.created_at);
    });
    list.insertBefore(job.node, after || null);
  }
  const queued = $("queue").children.length;
  $("queue-empty").hidden = queued > 0;
  $("queue-count").textContent = queued ? `${queued} active` : "";
  $("results-empty").hidden = $("results").children.length > 0;
}

function upsert(id, fields = {}) {
  let job = state.jobs.get(id);
  if (!job) {
    job = new Job(id);
    state.jobs.set(id, job);
    job.loadDetails();
  }
  job.update(fields);
  return job;
}

// The REST view: the newest jobs, and the current status of every job shown as active (events sent
// while the socket was away are not replayed).
async function refresh() {
  const page = await state.api.jobs(20);
  for (const body of page.jobs) upsert(body.job_id, body);
  const listed = new Set(page.jobs.map((j) => j.job_id));
  const stale = [...state.jobs.values()].filter((j) => ACTIVE.has(j.status) && !listed.has(j.id));
  await Promise.all(stale.map(async (job) => {
    try {
      job.update(await state.api.status(job.id));
    } catch (err) {
      if (err instanceof ApiError && err.code === "JOB_NOT_FOUND") { state.jobs.delete(job.id); job.dispose(); }
    }
  }));
}

function onEvent(event) {
  const id = event.job_id;
  switch (event.event) {
    case "snapshot":
    case "status":
      if (id) upsert(id, event);
      break;
    case "progress":
      if (id) upsert(id, { progress: event.progress, eta: event.eta, stage: event.stage,
        ...(state.jobs.get(id) && state.jobs.get(id).status === "queued" ? { status: "processing" } : {}) });
      break;
    case "complete":
      if (id) upsert(id, { status: "completed", progress: 1 });
      break;
    case "preview":
      if (id) upsert(id).showPreview(event);
      break;
    case "error":
      if (id && state.jobs.has(id)) {
        upsert(id, { status: "failed", error: event.error });
        state.api.status(id).then((body) => state.jobs.get(id) && state.jobs.get(id).update(body)).catch(() => {});
      } else if (!id && event.error) {
        toast(event.error.message || "live updates reported an error", "error");
      }
      break;
    default:
      break;
  }
}

function setConnection(kind) {
  const pill = $("connection");
  const text = { connecting: "Connecting…", live: "Live", offline: "Reconnecting…", "signed-out": "Not connected" };
  pill.textContent = text[kind] || kind;
  pill.className = `pill ${kind}`;
}

boot();
