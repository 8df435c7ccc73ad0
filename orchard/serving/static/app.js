// The page of `orchard serve`: predictions for dropped photos, browsing the lake, one image's details.
// Plain JS against the service's own API (same origin); no framework, no build step, nothing remote.
"use strict";

const KEY_STORAGE = "orchard-api-key";
const PAGE_SIZE = 24;
const NEIGHBOURS = 8;

const $ = (id) => document.getElementById(id);

const state = { page: 1, total: 0, filters: {}, pendingFiles: null };
const seen = { datasets: new Set(), labels: new Set() };

// ---- helpers ------------------------------------------------------------------------------------

/** An element with attributes and children (strings become text nodes: nothing is parsed as HTML). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showError(box, message) {
  box.textContent = message || "";
  box.hidden = !message;
}

function percent(confidence) {
  return typeof confidence === "number" ? `${(confidence * 100).toFixed(1)}%` : "–";
}

/** A failed API call: its status and the API's {"error": ...} message. */
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The JSON body of a response; ApiError with the API's message (or the status) if it is not a success. */
async function jsonOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : `HTTP ${response.status} ${response.statusText}`;
    const error = new ApiError(response.status, message);
    error.body = body;
    throw error;
  }
  if (body === null) throw new ApiError(response.status, "the service answered something that is not JSON");
  return body;
}

async function getJson(url) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch (exc) {
    throw new ApiError(0, `the service cannot be reached (${exc.message})`);
  }
  return jsonOf(response);
}

function query(params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") q.set(name, value);
  }
  return q.toString();
}

function contentUrl(id) {
  return `/v1/images/${encodeURIComponent(id)}/content`;
}

/** A clickable thumbnail of a lake image (row: id, key, label, predicted, confidence, url?). */
function thumbnail(row, extraCaption) {
  const img = el("img", {
    src: row.url || contentUrl(row.id),
    alt: row.key || row.id,
    title: row.key || row.id,
    decoding: "async",
  });
  img.addEventListener("error", () => img.classList.add("broken"), { once: true });
  const caption = el(
    "figcaption",
    {},
    el("span", { class: "caption-label", text: row.label ?? "?" }),
    " → ",
    el("span", { class: "caption-predicted", text: row.predicted ?? "?" }),
    row.confidence != null ? ` ${percent(row.confidence)}` : "",
    extraCaption ? el("span", { class: "caption-extra", text: extraCaption }) : null,
  );
  const wrong = row.label && row.predicted && row.label !== row.predicted;
  const figure = el(
    "figure",
    {
      class: wrong ? "thumb mismatch" : "thumb",
      tabindex: "0",
      role: "button",
      "data-id": row.id,
      "data-key": row.key,
      "data-testid": "thumb",
    },
    img,
    caption,
  );
  const open = () => showDetails(row.id);
  figure.addEventListener("click", open);
  figure.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      open();
    }
  });
  return figure;
}

function remember(rows) {
  for (const row of rows) {
    if (row.dataset) seen.datasets.add(row.dataset);
    if (row.label) seen.labels.add(row.label);
    if (row.predicted) seen.labels.add(row.predicted);
  }
  const fill = (list, values) => list.replaceChildren(...[...values].sort().map((v) => el("option", { value: v })));
  fill($("datasets-seen"), seen.datasets);
  fill($("labels-seen"), seen.labels);
}

// ---- service status -----------------------------------------------------------------------------

async function showStatus() {
  const status = $("model-status");
  try {
    const health = await getJson("/healthz");
    status.textContent = health.ready ? `model ${health.model}` : `no model yet: ${health.problem || "loading"}`;
    status.classList.toggle("not-ready", !health.ready);
  } catch (exc) {
    status.textContent = exc.message;
    status.classList.add("not-ready");
  }
}

// ---- predictions --------------------------------------------------------------------------------

async function predict(files) {
  if (!files || files.length === 0) return;
  state.pendingFiles = files;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers["X-API-Key"] = key;

  showError($("predict-error"), "");
  $("predict-busy").hidden = false;
  $("prediction").replaceChildren();
  let body;
  try {
    let response;
    try {
      response = await fetch("/v1/predict?top=5&k=8", { method: "POST", body: form, headers });
    } catch (exc) {
      throw new ApiError(0, `the service cannot be reached (${exc.message})`);
    }
    body = await jsonOf(response);
  } catch (exc) {
    if (exc.status === 401) {
      $("key-form").hidden = false;
      $("api-key").focus();
      if (key) sessionStorage.removeItem(KEY_STORAGE);
    }
    showError($("predict-error"), exc.message);
    // every file failed: the API still says why for each of them
    if (exc.body && Array.isArray(exc.body.predictions)) renderPredictions(exc.body, files);
    return;
  } finally {
    $("predict-busy").hidden = true;
  }
  $("key-form").hidden = true;
  state.pendingFiles = null;
  renderPredictions(body, files);
}

function renderPredictions(body, files) {
  const previews = new Map([...files].map((f) => [f.name, f]));
  const results = body.predictions.map((prediction, i) =>
    renderPrediction(prediction, previews.get(prediction.file), body.model, i === 0),
  );
  $("prediction").replaceChildren(...results);
}

function renderPrediction(prediction, file, model, first) {
  const preview = file ? el("img", { class: "preview", alt: prediction.file }) : null;
  if (preview) {
    const url = URL.createObjectURL(file);
    preview.src = url;
    preview.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
    preview.addEventListener("error", () => URL.revokeObjectURL(url), { once: true });
  }
  const header = el("h3", {}, el("span", { class: "file-name", text: prediction.file }));
  if (prediction.error) {
    return el(
      "article",
      { class: "result failed", "data-testid": "result" },
      header,
      el("p", { class: "error", role: "alert", text: prediction.error }),
    );
  }
  const top = el(
    "ol",
    { class: "top5", "data-testid": "top5" },
    prediction.top5.map((entry, rank) => {
      const fill = el("div", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(1, entry.confidence)) * 100}%`;
      return el(
        "li",
        { class: rank === 0 ? "top" : "" },
        el("span", { class: rank === 0 ? "label top-label" : "label", "data-testid": rank === 0 ? "top-label" : "label", text: entry.label }),
        el("div", { class: "bar", role: "presentation" }, fill),
        el("span", { class: "confidence", text: percent(entry.confidence) }),
      );
    }),
  );
  let similar;
  if (prediction.similar === null || prediction.similar === undefined) {
    similar = el("p", { class: "note", text: "similar images are unavailable right now (search index unreachable)" });
  } else if (prediction.similar.length === 0) {
    similar = el("p", { class: "note", text: `no lake image has an embedding by ${model} yet (run orchard features)` });
  } else {
    similar = el(
      "div",
      { class: "grid similar", id: first ? "similar" : null, "data-testid": "similar" },
      prediction.similar.map((row) => thumbnail(row, row.score != null ? `score ${row.score.toFixed(3)}` : "")),
    );
  }
  return el(
    "article",
    { class: "result", "data-testid": "result", "data-id": prediction.id },
    header,
    el("div", { class: "result-body" }, preview, el("div", {}, el("p", { class: "model", text: `model ${model}` }), top)),
    el("h4", { text: "Similar images of the lake" }),
    similar,
  );
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const input = $("drop-input");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = ""; // picking the same file again still fires `change`
    predict(files);
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragover");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragover"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = [...(event.dataTransfer ? event.dataTransfer.files : [])];
    if (files.length === 0) showError($("predict-error"), "nothing to predict: drop image files");
    else predict(files);
  });
  // a photo dropped beside the zone must not make the browser navigate away to it
  for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    if (state.pendingFiles) predict(state.pendingFiles);
    else $("key-form").hidden = true;
  });
}

// ---- browsing -----------------------------------------------------------------------------------

async function browse(page) {
  state.page = page;
  showError($("browse-error"), "");
  const grid = $("browse");
  grid.setAttribute("aria-busy", "true");
  try {
    const listing = await getJson(`/v1/images?${query({ ...state.filters, page, size: PAGE_SIZE })}`);
    state.total = listing.total;
    remember(listing.images);
    grid.replaceChildren(...listing.images.map((row) => thumbnail(row)));
    if (listing.images.length === 0) grid.append(el("p", { class: "note", text: "no image matches these filters" }));
    const pages = Math.max(1, Math.ceil(listing.total / PAGE_SIZE));
    $("page-info").textContent = `page ${page} of ${pages} · ${listing.total} images`;
    $("prev-page").disabled = page <= 1;
    $("next-page").disabled = page >= pages;
  } catch (exc) {
    grid.replaceChildren();
    $("page-info").textContent = "";
    showError($("browse-error"), exc.message);
  } finally {
    grid.removeAttribute("aria-busy");
  }
}

function setUpBrowse() {
  $("browse-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.filters = {
      dataset: $("filter-dataset").value.trim(),
      split: $("filter-split").value,
      label: $("filter-label").value.trim(),
      predicted: $("filter-predicted").value.trim(),
    };
    browse(1);
  });
  $("prev-page").addEventListener("click", () => browse(state.page - 1));
  $("next-page").addEventListener("click", () => browse(state.page + 1));
}

// ---- one image ----------------------------------------------------------------------------------

function shown(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") {
    const text = JSON.stringify(value);
    return text.length > 300 ? `${text.slice(0, 300)}…` : text;
  }
  return String(value);
}

/** The document as (name, value) rows, nested objects one level deep as "parent.child". */
function metadataRows(doc) {
  const rows = [];
  for (const [name, value] of Object.entries(doc)) {
    if (name === "content_url") continue;
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [inner, innerValue] of Object.entries(value)) rows.push([`${name}.${inner}`, innerValue]);
    } else {
      rows.push([name, value]);
    }
  }
  return rows;
}

async function showDetails(id) {
  const section = $("details-section");
  section.hidden = false;
  showError($("details-error"), "");
  $("details").replaceChildren(el("p", { class: "busy", text: "loading…" }));
  $("neighbours").replaceChildren();
  section.scrollIntoView({ behavior: "smooth", block: "start" });
  let doc;
  try {
    doc = await getJson(`/v1/images/${encodeURIComponent(id)}`);
  } catch (exc) {
    $("details").replaceChildren();
    showError($("details-error"), exc.message);
    return;
  }
  const img = el("img", { class: "large", src: doc.content_url || contentUrl(id), alt: doc.key || id });
  img.addEventListener("error", () => img.classList.add("broken"), { once: true });
  const table = el(
    "dl",
    { class: "metadata" },
    metadataRows(doc).flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: shown(value) })]),
  );
  $("details").replaceChildren(
    el("h3", { class: "details-key", "data-testid": "details-key", text: doc.key || id }),
    el("div", { class: "details-body" }, img, table),
  );
  try {
    const near = await getJson(`/v1/images/${encodeURIComponent(id)}/similar?k=${NEIGHBOURS}`);
    const grid = $("neighbours");
    grid.replaceChildren(...near.similar.map((row) => thumbnail(row, row.score != null ? `score ${row.score.toFixed(3)}` : "")));
    if (near.similar.length === 0) grid.append(el("p", { class: "note", text: "no neighbours (no embedding yet)" }));
  } catch (exc) {
    $("neighbours").replaceChildren(el("p", { class: "error", role: "alert", text: exc.message }));
  }
}

// ---- start --------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setUpDropZone();
  setUpBrowse();
  showStatus();
  browse(1);
});
