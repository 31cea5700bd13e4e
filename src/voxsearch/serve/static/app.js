// voxsearch web page: text search with filters, drag-and-drop similar-case search, study viewer.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem("voxsearch-key") || "";
const state = { study: null, slices: {}, plane: "axial", sliceTimer: null };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h["X-API-Key"] = apiKey;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(API + path, opts);
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

// Images go through fetch when a key is needed (an <img src> cannot send headers).
async function loadImage(img, url) {
  img.addEventListener("error", () => img.classList.add("missing"), { once: true });
  if (!apiKey) { img.src = url; return; }
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) { img.classList.add("missing"); return; }
  const blob = await response.blob();
  if (img.dataset.blob) URL.revokeObjectURL(img.dataset.blob);
  img.dataset.blob = URL.createObjectURL(blob);
  img.src = img.dataset.blob;
}

function filters() {
  const out = {};
  for (const name of ["modality", "body_part", "split"]) {
    const v = $("f-" + name).value;
    if (v) out[name] = v;
  }
  const abn = $("f-abnormal").value;
  if (abn) out.abnormal = abn === "true";
  return out;
}

function card(hit) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.seriesId = hit.series_id;
  const thumbs = document.createElement("div");
  thumbs.className = "thumbs";
  if (hit.thumbnails) {
    for (const plane of ["axial", "coronal", "sagittal"]) {
      const img = document.createElement("img");
      img.alt = plane;
      loadImage(img, hit.thumbnails[plane]);
      thumbs.appendChild(img);
    }
  } else {
    el.classList.add("no-study");
    const none = document.createElement("div");
    none.className = "no-image";
    none.textContent = "indexed, but not in this server's catalog";
    thumbs.appendChild(none);
  }
  const m = hit.metadata || {};
  const meta = document.createElement("div");
  meta.className = "meta";
  const abnormal = m.abnormal === true ? '<span class="tag abn">abnormal</span>' : (m.abnormal === false ? '<span class="tag">normal</span>' : "");
  meta.innerHTML = `<span class="score">${hit.score.toFixed(3)}</span>` +
    `<span class="tag">${esc(m.modality || "")} ${esc(m.body_part || "")}</span>${abnormal}`;
  const excerpt = document.createElement("p");
  excerpt.className = "excerpt";
  excerpt.textContent = hit.report_excerpt || "(no report)";
  el.append(thumbs, meta, predictedTags(hit.predicted_findings), excerpt);
  if (hit.url) el.addEventListener("click", () => openStudy(hit.series_id));
  return el;
}

// What the model sees in the scan (its finding head), as tags with probabilities.
function predictedTags(found) {
  const box = document.createElement("div");
  box.className = "predicted";
  if (!found) return box;
  if (!found.length) {
    box.innerHTML = '<span class="tag seen" title="no finding reaches its calibrated threshold">no confident finding</span>';
    return box;
  }
  box.innerHTML = found.map((f) => `<span class="tag seen" title="model probability">${esc(f.finding)} ${Math.round(f.probability * 100)}%</span>`).join("");
  return box;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function showResults(target, body, what) {
  target.innerHTML = "";
  for (const hit of body.results) target.appendChild(card(hit));
  if (what) setStatus(`${body.results.length} studies for ${what} (${body.took_ms.toFixed(0)} ms, index ${body.index_version})`);
}

async function searchText(event) {
  if (event) event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  $("search-button").disabled = true;
  setStatus("searching…");
  try {
    const response = await api("/search/text", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query, k: parseInt($("k").value, 10), filters: filters() }),
    });
    showResults($("results"), await response.json(), `"${query}"`);
    document.body.dataset.searched = "1";
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    $("search-button").disabled = false;
  }
}

async function searchFile(file) {
  setStatus(`uploading ${(file.size / 1e6).toFixed(1)} MB and searching for similar cases…`);
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  for (const [name, value] of Object.entries(filters())) form.append(name, String(value));
  try {
    const response = await api("/search/scan", { method: "POST", body: form });
    showResults($("results"), await response.json(), "the uploaded scan");
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function openStudy(seriesId) {
  try {
    const study = await (await api(`/studies/${encodeURIComponent(seriesId)}`)).json();
    state.study = study;
    state.slices = study.slices || {};
    $("study").hidden = false;
    $("study-title").textContent = `${study.metadata.modality || ""} ${study.metadata.body_part || ""} · ${seriesId}`;
    const meta = $("study-meta");
    meta.innerHTML = "";
    for (const [key, value] of Object.entries(study.metadata)) {
      if (value === null || typeof value === "object") continue;
      meta.insertAdjacentHTML("beforeend", `<dt>${esc(key)}</dt><dd>${esc(value)}</dd>`);
    }
    $("study-report").textContent = study.report || "(no report)";
    $("study-predicted").replaceChildren(predictedTags(study.predicted_findings));
    $("draft").hidden = true;
    $("draft").textContent = "";
    setPlane("axial");
    const similar = await api("/search/scan", { method: "POST", body: formOf({ series_id: seriesId, k: "6" }) });
    showResults($("similar"), await similar.json());
  } catch (err) {
    setStatus(err.message, true);
  }
}

function formOf(fields) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  return form;
}

function setPlane(plane) {
  state.plane = plane;
  const n = state.slices[plane] || 1;
  const slider = $("slice-slider");
  slider.max = String(n - 1);
  slider.value = String(Math.floor(n / 2));
  showSlice();
}

function showSlice() {
  clearTimeout(state.sliceTimer);
  // Debounce: dragging the slider fires many events; fetch only the slice the user stops on.
  state.sliceTimer = setTimeout(() => {
    const i = $("slice-slider").value;
    const win = $("window").value;
    const id = encodeURIComponent(state.study.series_id);
    const url = `${API}/studies/${id}/slices/${state.plane}/${i}.png` + (win ? `?window=${win}` : "");
    loadImage($("slice"), url);
    $("slice-label").textContent = `${state.plane} slice ${Number(i) + 1} / ${state.slices[state.plane] || "?"}`;
  }, 40);
}

async function draftReport() {
  const out = $("draft");
  out.hidden = false;
  out.textContent = "";
  $("draft-button").disabled = true;
  try {
    const response = await api("/report", { method: "POST", body: formOf({ series_id: state.study.series_id, stream: "true" }) });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      out.textContent += decoder.decode(value, { stream: true });
    }
  } catch (err) {
    out.textContent = "draft failed: " + err.message;
  } finally {
    $("draft-button").disabled = false;
  }
}

async function loadFilters() {
  try {
    const values = await (await api("/filters")).json();
    for (const name of ["modality", "body_part", "split"]) {
      for (const v of values[name] || []) {
        const option = document.createElement("option");
        option.value = option.textContent = v;
        $("f-" + name).appendChild(option);
      }
    }
  } catch (err) {
    setStatus(err.message, true);
  }
}

function setupDrop() {
  const zone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
  });
  $("file-input").addEventListener("change", (e) => { if (e.target.files.length) searchFile(e.target.files[0]); });
}

function init() {
  $("search-form").addEventListener("submit", searchText);
  $("study-close").addEventListener("click", () => { $("study").hidden = true; });
  $("slice-slider").addEventListener("input", showSlice);
  $("window").addEventListener("change", showSlice);
  for (const radio of document.querySelectorAll('input[name="plane"]')) radio.addEventListener("change", (e) => setPlane(e.target.value));
  $("draft-button").addEventListener("click", draftReport);
  $("key-save").addEventListener("click", () => {
    apiKey = $("api-key").value.trim();
    sessionStorage.setItem("voxsearch-key", apiKey);
    $("key-box").hidden = true;
    loadFilters();
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("study").hidden = true; });
  setupDrop();
  loadFilters();
  const q = new URLSearchParams(location.search).get("q");
  if (q) { $("query").value = q; searchText(); }
}

init();
