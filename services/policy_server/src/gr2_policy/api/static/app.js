// GR-2 Serve web page: pick or upload one image per camera view, send them with an
// instruction to POST /v1/predict-video/stream and show the imagined frames as they stream in.
// Plain JavaScript, no dependencies. EventSource cannot POST, so the text/event-stream
// answer is read with fetch() + a stream reader and parsed here.
"use strict";

const state = {
  views: [], // [{name, width, height}] in /v1/info order
  inputs: {}, // view name -> {blob, url}
  running: null, // AbortController of the prediction in flight
};

const $ = (id) => document.getElementById(id);

// ---- the API key: optional, kept in sessionStorage (this tab only), never in the URL ----

const KEY_STORAGE = "gr2.apiKey";

function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch (_) {
    return ""; // storage disabled: no key
  }
}

function saveApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch (_) {
    // storage disabled: the key cannot be kept
  }
}

// Request headers for /v1 calls: the Authorization header when a key is set.
function authHeaders(headers) {
  const key = apiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
  if (message) box.scrollIntoView({ block: "nearest" });
}

function setProgress(stateName, text, done, total) {
  const label = $("progress");
  label.dataset.state = stateName;
  label.textContent = text;
  const bar = $("progress-bar");
  bar.max = Math.max(total || 1, 1);
  bar.value = done || 0;
}

// Turn a failed response or an SSE error payload into one readable sentence.
function problemMessage(problem, fallback) {
  if (!problem || typeof problem !== "object") return fallback;
  if (typeof problem.detail === "string" && problem.detail) return problem.detail;
  if (Array.isArray(problem.detail)) {
    return problem.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  }
  if (problem.error && typeof problem.error.message === "string") return problem.error.message;
  if (typeof problem.message === "string" && problem.message) return problem.message;
  if (typeof problem.title === "string" && problem.title) return problem.title;
  return fallback;
}

async function responseError(response) {
  if (response.status === 401) {
    return apiKey()
      ? "The server did not accept this API key: check it in the API key field above."
      : "This server needs an API key: enter it in the API key field above and press “Use key”.";
  }
  const fallback = `The server answered ${response.status} ${response.statusText}.`;
  const text = await response.text();
  try {
    return problemMessage(JSON.parse(text), fallback);
  } catch (_) {
    return text.trim() ? `${fallback} ${text.trim().slice(0, 300)}` : fallback;
  }
}

async function getJSON(url) {
  const response = await fetch(url, { headers: authHeaders({ Accept: "application/json" }) });
  if (!response.ok) throw new Error(await responseError(response));
  return response.json();
}

// ---- the result grid: one row per view, input image then predicted frames ----

function buildRows() {
  const grid = $("frames");
  grid.replaceChildren();
  for (const view of state.views) {
    const row = document.createElement("div");
    row.className = "view-row";
    row.id = `row-${view.name}`;
    row.dataset.view = view.name;

    const input = document.createElement("figure");
    input.className = "input-cell";
    const img = document.createElement("img");
    img.className = "input-image";
    img.id = `input-${view.name}`;
    img.alt = `input ${view.name} view`;
    img.width = view.width;
    img.height = view.height;
    const caption = document.createElement("figcaption");
    caption.textContent = `${view.name} · now`;
    caption.title = `${view.name} view, ${view.width}×${view.height} px`;
    input.append(img, caption);

    const predicted = document.createElement("div");
    predicted.className = "predicted";
    predicted.id = `predicted-${view.name}`;

    row.append(input, predicted);
    grid.append(row);
  }
}

function clearPredicted() {
  for (const view of state.views) $(`predicted-${view.name}`).replaceChildren();
}

function addFrame(frame) {
  for (const view of state.views) {
    const src = frame.images && frame.images[view.name];
    if (!src) continue;
    const figure = document.createElement("figure");
    figure.className = "frame-cell";
    const img = document.createElement("img");
    img.className = "frame";
    img.dataset.view = view.name;
    img.dataset.frameIndex = String(frame.frame_index);
    img.alt = `predicted ${view.name} frame ${frame.frame_index + 1}`;
    img.width = view.width;
    img.height = view.height;
    img.src = src;
    const caption = document.createElement("figcaption");
    caption.textContent = `t+${frame.frame_index + 1}`;
    figure.append(img, caption);
    $(`predicted-${view.name}`).append(figure);
  }
}

// ---- inputs: samples and uploads ----

function setInput(viewName, blob) {
  const old = state.inputs[viewName];
  if (old) URL.revokeObjectURL(old.url);
  const url = URL.createObjectURL(blob);
  state.inputs[viewName] = { blob, url };
  $(`input-${viewName}`).src = url;
}

function imageSize(blob) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(blob);
    const img = new Image();
    img.onload = () => {
      URL.revokeObjectURL(url);
      resolve({ width: img.naturalWidth, height: img.naturalHeight });
    };
    img.onerror = () => {
      URL.revokeObjectURL(url);
      reject(new Error("not a readable image"));
    };
    img.src = url;
  });
}

async function onUpload(view, fileInput) {
  const file = fileInput.files && fileInput.files[0];
  if (!file) return;
  showError("");
  let size;
  try {
    size = await imageSize(file);
  } catch (_) {
    fileInput.value = "";
    showError(`“${file.name}” for the ${view.name} view could not be read as an image. Use a PNG or JPEG file.`);
    return;
  }
  if (size.width !== view.width || size.height !== view.height) {
    fileInput.value = "";
    showError(
      `“${file.name}” is ${size.width}×${size.height} px, but the ${view.name} view must be ` +
        `${view.width}×${view.height} px. Resize it (or pick a sample) and try again.`,
    );
    return;
  }
  setInput(view.name, file);
  for (const el of document.querySelectorAll(".sample")) el.classList.remove("selected");
}

function buildUploads() {
  const box = $("uploads");
  box.replaceChildren();
  for (const view of state.views) {
    const label = document.createElement("label");
    label.className = "upload";
    label.append(`${view.name} (${view.width}×${view.height} px)`);
    const input = document.createElement("input");
    input.type = "file";
    input.accept = "image/png,image/jpeg";
    input.id = `upload-${view.name}`;
    input.name = view.name;
    input.addEventListener("change", () => onUpload(view, input));
    label.append(input);
    box.append(label);
  }
}

async function pickSample(sample, button) {
  showError("");
  try {
    const blobs = await Promise.all(
      state.views.map(async (view) => {
        const url = sample.images && sample.images[view.name];
        if (!url) throw new Error(`sample “${sample.name}” has no ${view.name} image`);
        const response = await fetch(url);
        if (!response.ok) throw new Error(await responseError(response));
        return response.blob();
      }),
    );
    state.views.forEach((view, i) => setInput(view.name, blobs[i]));
    for (const view of state.views) $(`upload-${view.name}`).value = "";
    $("instruction").value = sample.instruction || "";
    for (const el of document.querySelectorAll(".sample")) el.classList.remove("selected");
    button.classList.add("selected");
    clearPredicted();
    setProgress("idle", "Ready.", 0, 1);
  } catch (err) {
    showError(`Could not load sample “${sample.name}”: ${err.message}`);
  }
}

function buildSamples(samples) {
  const box = $("samples");
  box.replaceChildren();
  if (!samples.length) {
    box.textContent = "No samples are shipped with this server.";
    return;
  }
  for (const sample of samples) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "sample";
    button.dataset.name = sample.name;
    button.title = sample.instruction || sample.name;
    const thumbs = document.createElement("span");
    thumbs.className = "thumbs";
    for (const view of state.views) {
      const url = sample.images && sample.images[view.name];
      if (!url) continue;
      const img = document.createElement("img");
      img.src = url;
      img.alt = `${sample.name} ${view.name}`;
      thumbs.append(img);
    }
    const text = document.createElement("span");
    text.className = "sample-text";
    text.textContent = sample.instruction || sample.name;
    button.append(thumbs, text);
    button.addEventListener("click", () => pickSample(sample, button));
    box.append(button);
  }
}

// ---- prediction: POST multipart, read the event stream ----

function requestBody() {
  const missing = state.views.filter((v) => !state.inputs[v.name]).map((v) => v.name);
  if (missing.length) {
    throw new Error(`Choose an image for the ${missing.join(" and ")} view${missing.length > 1 ? "s" : ""} (pick a sample or upload one).`);
  }
  const instruction = $("instruction").value;
  if (!instruction.trim()) throw new Error("Write an instruction, e.g. “pick up the red block”.");
  const numFrames = Number($("num-frames").value);
  if (!Number.isInteger(numFrames) || numFrames < 1 || numFrames > 16) {
    throw new Error("Frames must be a whole number from 1 to 16.");
  }
  const body = new FormData();
  for (const view of state.views) {
    const blob = state.inputs[view.name].blob;
    const type = blob.type === "image/jpeg" ? "jpg" : "png";
    body.append("image", blob, `${view.name}.${type}`);
  }
  body.append("instruction", instruction);
  body.append("num_frames", String(numFrames));
  const sampling = $("sampling").value;
  body.append("sampling", sampling);
  if (sampling === "top_k") {
    body.append("top_k", $("top-k").value);
    body.append("temperature", $("temperature").value);
    body.append("seed", $("seed").value);
  }
  return { body, numFrames };
}

// Parse one SSE event block ("event: x\ndata: ...") into {event, data}.
function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return { event, data: data.join("\n") };
}

async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (block.trim()) yield parseEvent(block);
    }
  }
  buffer += decoder.decode();
  if (buffer.trim()) yield parseEvent(buffer);
}

async function predict(event) {
  event.preventDefault();
  showError("");
  let request;
  try {
    request = requestBody();
  } catch (err) {
    showError(err.message);
    return;
  }
  if (state.running) state.running.abort();
  const controller = new AbortController();
  state.running = controller;
  const button = $("predict");
  button.disabled = true;
  clearPredicted();
  const total = request.numFrames;
  setProgress("running", `Imagining… frame 0 / ${total}`, 0, total);
  let received = 0;
  let finished = false;
  try {
    const response = await fetch("/v1/predict-video/stream", {
      method: "POST",
      body: request.body,
      headers: authHeaders({ Accept: "text/event-stream" }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await responseError(response));
    for await (const { event: name, data } of readEvents(response)) {
      const payload = data ? JSON.parse(data) : {};
      if (name === "frame") {
        addFrame(payload);
        received = payload.frame_index + 1;
        const n = payload.num_frames || total;
        setProgress("running", `frame ${received} / ${n}`, received, n);
      } else if (name === "done") {
        const n = payload.frames ?? received;
        setProgress("done", `Done: ${n} / ${n} frames`, n, n);
        finished = true;
      } else if (name === "error") {
        throw new Error(problemMessage(payload, "The prediction failed on the server."));
      }
    }
    if (!finished) throw new Error(`The stream ended after ${received} of ${total} frames.`);
  } catch (err) {
    if (controller.signal.aborted) return;
    const text = received ? `Failed after ${received} / ${total} frames` : "Failed";
    setProgress("error", text, received, total);
    showError(err instanceof TypeError ? `Could not reach the server: ${err.message}` : err.message);
  } finally {
    if (state.running === controller) {
      state.running = null;
      button.disabled = false;
    }
  }
}

// ---- start-up ----

function useKey() {
  saveApiKey($("api-key").value.trim());
  loadServer();
}

async function init() {
  $("predict-form").addEventListener("submit", predict);
  $("sampling").addEventListener("change", () => {
    $("top-k-options").hidden = $("sampling").value !== "top_k";
  });
  $("api-key").value = apiKey();
  $("api-key-use").addEventListener("click", useKey);
  $("api-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      useKey();
    }
  });
  await loadServer();
}

// Model info and samples (again after a new API key): the page is ready when both are in.
async function loadServer() {
  document.body.dataset.ready = "false";
  showError("");
  $("predict").disabled = true;
  try {
    const info = await getJSON("/v1/info");
    state.views = info.views || [];
    const parts = [info.model_name, info.model_version && `version ${info.model_version}`, info.preset && `preset ${info.preset}`];
    $("model-info").textContent = `Model: ${parts.filter(Boolean).join(" · ")} · views: ${state.views.map((v) => `${v.name} ${v.width}×${v.height}`).join(", ")}`;
    buildRows();
    buildUploads();
    for (const view of state.views) {
      const input = state.inputs[view.name]; // chosen before a reload (a new API key)
      if (input) $(`input-${view.name}`).src = input.url;
    }
    $("predict").disabled = false;
  } catch (err) {
    $("model-info").textContent = "Model info unavailable.";
    showError(`Could not load the model info: ${err.message}`);
    return;
  }
  try {
    const { samples } = await getJSON("/v1/samples");
    buildSamples(samples || []);
  } catch (err) {
    $("samples").textContent = `Samples unavailable: ${err.message}`;
  }
  document.body.dataset.ready = "true";
}

init();
