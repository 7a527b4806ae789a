// The web page: calls this service's own API (relative URLs, so a proxy prefix keeps working).
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;
const MAX_SEED = 2 ** 32;

// active: our task is the one running (Interrupt/Skip act on the running job, so only then);
// waiting: the request that a queued task's Interrupt aborts (the service then drops the task).
const state = { mode: "txt2img", caps: null, initImage: null, taskId: null, previewId: -1, active: false,
                waiting: null };

// ------------------------------------------------------------------ API helpers
class ApiError extends Error {
  constructor(message, status, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function api(path, body, signal) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  };
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!response.ok) {
    throw new ApiError(errorText(data, response), response.status, response.headers.get("Retry-After"));
  }
  return data;
}

function errorText(data, response) {
  if (data && typeof data === "object") {
    const detail = data.detail ?? data.error ?? data.errors;
    if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    if (detail) return typeof detail === "string" ? detail : JSON.stringify(detail);
  }
  return `${response.status} ${response.statusText}`;
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = !text;
}

// ------------------------------------------------------------------ capabilities and health
async function loadCapabilities() {
  try {
    state.caps = await api("capabilities");
  } catch (err) {
    if (err.status === 503) { setTimeout(loadCapabilities, 1000); return; }  // models still loading
    showMessage(`Could not read /capabilities: ${err.message}`);
    return;
  }
  const caps = state.caps;
  $("steps").max = caps.max_steps;
  $("steps-hint").textContent = `1–${caps.max_steps} on these models; more run ${caps.max_steps}`;
  $("cfg").max = caps.max_cfg_scale;
  $("cfg-hint").textContent = caps.guidance === "on"
    ? `≤ 1: one pass; up to ${caps.max_cfg_scale} with guidance` : "guidance is off on this service";
  $("batch").max = caps.max_images_per_request;
  $("batch-hint").textContent = `up to ${caps.max_images_per_request} images`;
  $("size").textContent = `${caps.image_size.width}×${caps.image_size.height}`;
  $("size").title = "Every image is made at the models' size";
  $("size").hidden = false;
  $("tab-img2img").hidden = !caps.modes.includes("img2img");
  $("interrogate").hidden = !(caps.interrogate && caps.interrogate.available);
}

async function showHealth() {
  const chip = $("health");
  try {
    const health = await api("health");
    chip.textContent = `${health.backend} · ${health.model}`;
    chip.className = "chip ok";
  } catch (err) {
    chip.textContent = err.status === 503 ? "loading models…" : "unreachable";
    chip.className = "chip warn";
    setTimeout(showHealth, 2000);
  }
}

// ------------------------------------------------------------------ form
function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("[data-mode]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  }
  $("img2img-controls").hidden = mode !== "img2img";
}

function intValue(id, fallback) {
  const value = Number.parseInt($(id).value, 10);
  return Number.isFinite(value) ? value : fallback;
}

function requestBody() {
  const cfg = Number.parseFloat($("cfg").value);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: intValue("steps", 4),
    cfg_scale: Number.isFinite(cfg) ? cfg : 1,
    seed: intValue("seed", -1),
    n_iter: Math.max(1, intValue("batch", 1)),
    batch_size: 1,
    force_task_id: state.taskId,
  };
  if (state.mode === "img2img") {
    body.init_images = [state.initImage];
    body.denoising_strength = Number.parseFloat($("denoising").value);
    body.resize_mode = intValue("resize-mode", 0);
  }
  return body;
}

function setInitImage(dataUri) {
  state.initImage = dataUri;
  const preview = $("init-preview");
  preview.src = dataUri;
  preview.hidden = false;
  $("drop-hint").textContent = "Drop or pick another image";
}

function readFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.onerror = () => showMessage(`Could not read ${file.name}`);
  reader.readAsDataURL(file);
}

// ------------------------------------------------------------------ progress
function setRunning(running) {
  $("generate").disabled = running;
  $("interrupt").disabled = !running;
  setActive(false);
  $("progress").hidden = !running;
  if (!running) $("live-preview").hidden = true;
}

function drawProgress(fraction, text, numbers) {
  $("bar-fill").style.width = `${Math.round(Math.min(Math.max(fraction, 0), 1) * 100)}%`;
  $("progress-text").textContent = text;
  const el = $("progress");
  for (const [key, value] of Object.entries(numbers || {})) el.dataset[key] = String(value);
}

async function pollProgress(taskId) {
  while (state.taskId === taskId) {
    try {
      const p = await api("internal/progress", { id_task: taskId, id_live_preview: state.previewId, live_preview: true });
      if (state.taskId !== taskId) return;
      setActive(p.active);
      if (p.active) {
        const s = (await api("sdapi/v1/progress?skip_current_image=true")).state;
        const eta = p.eta ? ` · ${Math.ceil(p.eta)} s left` : "";
        drawProgress(p.progress, `Image ${s.job_no + 1}/${s.job_count} · step ${s.sampling_step}/${s.sampling_steps}${eta}`,
          { step: s.sampling_step, steps: s.sampling_steps, image: s.job_no + 1, images: s.job_count, queue: "" });
        if (p.live_preview) {
          state.previewId = p.id_live_preview;
          $("live-preview").src = p.live_preview;
          $("live-preview").hidden = false;
        }
      } else if (p.queued) {
        const eta = p.eta ? ` · about ${Math.ceil(p.eta)} s` : "";
        drawProgress(0, `Waiting in queue: position ${p.queue_position + 1}${eta}`, { queue: p.queue_position + 1 });
      }
    } catch { /* a missed poll is harmless; the next one retries */ }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function setActive(active) {
  state.active = active;
  $("skip").disabled = !active;
  $("interrupt").title = active ? "Stop this job (finished images are kept)" : "Cancel the waiting request";
}

// ------------------------------------------------------------------ results
function pngBlobUrl(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
}

function showResult(response) {
  const info = typeof response.info === "string" ? JSON.parse(response.info) : response.info;
  const gallery = $("gallery");
  for (const old of gallery.querySelectorAll("img")) URL.revokeObjectURL(old.src);
  gallery.replaceChildren();
  gallery.classList.toggle("single", response.images.length === 1);
  response.images.forEach((base64, i) => {
    const seed = info.all_seeds[i] ?? info.seed;
    const url = pngBlobUrl(base64);
    const card = document.createElement("figure");
    card.className = "card";
    const img = document.createElement("img");
    img.src = url;
    img.alt = `result ${i + 1}, seed ${seed}`;
    img.addEventListener("click", () => openLightbox(url));
    const caption = document.createElement("figcaption");
    const seedLabel = document.createElement("span");
    seedLabel.className = "seed";
    seedLabel.textContent = `seed ${seed}`;
    seedLabel.title = "Use this seed";
    seedLabel.addEventListener("click", () => { $("seed").value = seed; });
    const download = document.createElement("a");
    download.href = url;
    download.download = `${info.job_timestamp}-${seed}.png`;
    download.textContent = "PNG";
    download.title = "Download (the PNG carries its parameters)";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Use this result";
    reuse.addEventListener("click", () => { setInitImage(`data:image/png;base64,${base64}`); setMode("img2img"); });
    caption.append(seedLabel, download, reuse);
    card.append(img, caption);
    card.addEventListener("mouseenter", () => { $("infotext").textContent = info.infotexts[i] || ""; });
    gallery.append(card);
  });
  const notes = [...(info.warnings || [])];
  if (info.interrupted) notes.unshift(`Interrupted: ${response.images.length} image(s) finished.`);
  const list = $("warnings");
  list.replaceChildren(...notes.map((text) => Object.assign(document.createElement("li"), { textContent: text })));
  list.hidden = notes.length === 0;
  $("infotext").textContent = info.infotexts[0] || "";
  $("infotext").hidden = !info.infotexts.length;
}

function openLightbox(url) {
  $("lightbox-img").src = url;
  $("lightbox").showModal();
}

// ------------------------------------------------------------------ generate
async function generate(event) {
  event.preventDefault();
  if (state.mode === "img2img" && !state.initImage) { showMessage("Pick an init image first."); return; }
  showMessage("");
  state.taskId = `task(ui-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)})`;
  state.previewId = -1;
  const taskId = state.taskId;
  drawProgress(0, "Starting…", { step: 0, steps: 0, image: 0, images: 0, queue: "" });
  for (const empty of $("gallery").querySelectorAll(".empty")) empty.remove();
  setRunning(true);
  state.waiting = new AbortController();
  const poller = pollProgress(taskId);
  try {
    showResult(await api(`sdapi/v1/${state.mode}`, requestBody(), state.waiting.signal));
  } catch (err) {
    if (err.name === "AbortError") {
      showMessage("Cancelled while waiting in the queue.", "busy");
    } else if (err.status === 503) {
      const wait = err.retryAfter ? `retry in ${err.retryAfter} s` : "retry shortly";
      showMessage(`The service is busy: ${wait}. (${err.message})`, "busy");
    } else {
      showMessage(err.message || String(err));
    }
  } finally {
    state.taskId = null;
    state.waiting = null;
    await poller;
    setRunning(false);
  }
}

function interrupt() {
  if (state.active) control("sdapi/v1/interrupt");
  else if (state.waiting) state.waiting.abort();  // not running yet: leave the queue
}

async function control(path) {
  try { await api(path, {}); } catch (err) { showMessage(err.message); }
}

async function interrogate() {
  if (!state.initImage) { showMessage("Pick an image to interrogate first."); return; }
  try {
    showMessage("");
    const result = await api("sdapi/v1/interrogate", { image: state.initImage, model: "clip" });
    $("prompt").value = result.caption;
    if (result.tags_complete === false) {
      showMessage(`Tags are still being prepared (${result.tags_prepared}); the caption uses those ready.`, "busy");
    }
  } catch (err) { showMessage(err.message); }
}

// ------------------------------------------------------------------ wiring
function wire() {
  $("form").addEventListener("submit", generate);
  for (const tab of document.querySelectorAll("[data-mode]")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("seed-random").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * MAX_SEED); });
  $("seed-reset").addEventListener("click", () => { $("seed").value = -1; });
  $("interrupt").addEventListener("click", interrupt);
  $("skip").addEventListener("click", () => control("sdapi/v1/skip"));
  $("interrogate").addEventListener("click", interrogate);
  $("denoising").addEventListener("input", () => { $("denoising-out").textContent = $("denoising").value; });
  $("init-file").addEventListener("change", () => readFile($("init-file").files[0]));
  const drop = $("drop");
  drop.addEventListener("click", (e) => { if (e.target !== $("init-file")) $("init-file").click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("init-file").click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    readFile(e.dataTransfer.files[0]);
  });
  $("lightbox").addEventListener("click", (e) => { if (e.target === $("lightbox")) $("lightbox").close(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
}

wire();
showHealth();
loadCapabilities();
