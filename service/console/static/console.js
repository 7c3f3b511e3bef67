// The oodserve console: the served models, scoring with per-signal evidence, samples, live traffic.
// Every request goes to this origin's API (the page's Content-Security-Policy allows no other); the API key
// lives in this module's memory only and is sent as `Authorization: Bearer KEY`.

const state = {
  models: [],
  model: null,          // the selected model's /v1/models entry
  histograms: null,     // its /v1/models/{name}/calibration
  lastInputs: null,     // {body, contentType, previews} of the last scored request
  lastBody: null,       // its response: verdicts are redrawn from its p-values when alpha moves
  requestSerial: 0,     // answers to older score requests are dropped
  polling: false,
  alpha: null,
  rateHistory: [],      // [{time, rate}] polled OOD rates of the selected model
};

const $ = (id) => document.getElementById(id);
const SLIDER_STEPS = 1000;
const MAX_ALPHA = 0.5;
const POLL_MS = 3000;
const CONSOLE_STREAM = "console";
// The console's own scoring requests form their own drift stream, so trying inputs here never feeds the
// production stream's exchangeability test.

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

// ---- API calls: the key from the page, errors worded as the API words them ----

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = $("api-key").value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let code = `http_${response.status}`;
    let message = response.statusText;
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error === "object") ({ code, message } = body.error);
      else if (body && typeof body.error === "string") message = body.error;
    } catch (ignored) { /* not JSON: keep the status text */ }
    throw new ApiFailure(response.status, code, message);
  }
  return response;
}

function showError(error) {
  const box = $("error");
  if (error == null) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = error instanceof ApiFailure ? `${error.status} ${error.code}: ${error.message}` : String(error.message || error);
}

// ---- the model ----

async function loadModels() {
  const body = await (await api("/v1/models")).json();
  state.models = body.models;
  const select = $("model-select");
  select.replaceChildren(...body.models.map((m) => element("option", { value: m.name, text: `${m.name} ${m.version}` })));
  select.value = body.default;
  await selectModel(body.default);
}

async function selectModel(name) {
  state.model = state.models.find((m) => m.name === name);
  state.histograms = null;
  releasePreviews(state.lastInputs, null);
  state.lastInputs = null;
  state.lastBody = null;
  state.rateHistory = [];
  $("results").replaceChildren();
  $("batch-test").hidden = true;
  renderModel(state.model);
  setAlpha(state.model.default_alpha, false);
  $("samples-section").hidden = !state.model.sampler;
  state.histograms = await (await api(`/v1/models/${encodeURIComponent(name)}/calibration?bins=40`)).json();
  pollTraffic();
}

function renderModel(model) {
  const spec = model.input;
  const fused = new Set(model.fusion.signals);
  const facts = [
    ["name", `${model.name} ${model.version}`],
    ["description", model.description || ""],
    ["input", `${spec.dtype} ${spec.layout || ""} shape [${spec.shape.join(", ")}], values ${spec.min} to ${spec.max}`],
    ["accepted shapes", model.accepted_instance_shapes.map((s) => `[${s.join(", ")}]`).join(" or ")],
    ["provider", model.provider],
    ["labels", model.labels ? model.labels.join(", ") : "none (label-free bundle)"],
    ["fusion", `${model.fusion.method} over ${model.fusion.signals.join(", ")}; ${model.fusion.calibration_size} calibration scores`],
    ["alpha", `default ${model.default_alpha}; smallest supported ${model.minimum_alpha.toPrecision(3)}`],
    ["sampler", model.sampler ? "yes: the flow generates images" : "no"],
  ];
  if (model.backbone) facts.splice(3, 0, ...backboneFacts(model.backbone));
  const list = element("dl", { class: "facts" });
  for (const [term, text] of facts) list.append(element("dt", { text: term }), element("dd", { text }));
  const chips = element("dd", { class: "chips" },
    ...model.signals.map((s) => element("span", {
      class: fused.has(s.name) ? "fused" : "", text: `${s.name} (${s.calibration_size})`, title: s.description,
    })));
  list.append(element("dt", { text: "signals (calibration size)" }), chips);
  $("model-facts").replaceChildren(list);
  const resized = spec.resize && spec.resize !== "none" ? ` Files of another size are ${spec.resize === "center_crop" ? "centre-cropped and resized" : "resized"}.` : "";
  $("input-hint").textContent = isImageModel(model)
    ? `This model takes ${spec.shape.join("x")} images: PNG or JPEG files are converted by the service.${resized}`
    : `This model takes vectors of shape [${spec.shape.join(", ")}]: a CSV of rows, a .npy array or pasted JSON.`;
}

// A backbone bundle: the user's classifier (by file name and sha256), the tensors the heads read, its preprocessing.
function backboneFacts(backbone) {
  const pre = backbone.preprocess;
  const normalise = pre.mean ? `, mean [${pre.mean.join(", ")}], std [${pre.std.join(", ")}]` : "";
  return [
    ["backbone", `${backbone.source_name} (sha256 ${backbone.source_sha256.slice(0, 12)}…), ${backbone.classes} classes`],
    ["features", `${backbone.features} (${backbone.feature_dimension} values${backbone.pooling !== "none" ? `, ${backbone.pooling}-pooled` : ""}); logits ${backbone.logits}`],
    ["preprocessing", `${pre.layout} ${pre.dtype} ${pre.size.join("x")}, resize ${pre.resize}, scale ${pre.scale.toPrecision(4)}${normalise}`],
  ];
}

function isImageModel(model) {
  return model.input.shape.length === 3;
}

// ---- alpha: a log-scale slider from the smallest supported alpha to 0.5, and a number box ----

function alphaRange() {
  const high = Math.log10(MAX_ALPHA);
  const low = Math.min(Math.log10(state.model.minimum_alpha * 1.0001), high - 1);
  return { low, high };
}

function sliderToAlpha(position) {
  const { low, high } = alphaRange();
  return 10 ** (low + (high - low) * (position / SLIDER_STEPS));
}

function alphaToSlider(alpha) {
  const { low, high } = alphaRange();
  return Math.round(((Math.log10(alpha) - low) / (high - low)) * SLIDER_STEPS);
}

function setAlpha(alpha, rescore) {
  if (!state.model) return;
  state.alpha = Math.min(Math.max(alpha, state.model.minimum_alpha * 1.0001), MAX_ALPHA);
  $("alpha").value = String(alphaToSlider(state.alpha));
  $("alpha-number").value = state.alpha.toPrecision(4);
  $("alpha-hint").textContent = `an input is OOD when its fused p-value is below ${state.alpha.toPrecision(4)}`;
  if (rescore && state.lastBody) renderResults(withAlpha(state.lastBody, state.alpha), state.lastInputs);
}

// The verdict at another alpha, from the p-values the service returned: is_ood = p_value < alpha, the service's
// own rule (p-values do not depend on alpha), so moving the slider sends nothing and records nothing.
function withAlpha(body, alpha) {
  const results = body.results.map((r) => ({ ...r, is_ood: r.p_value < alpha }));
  let batch = body.batch;
  if (batch && batch.p_value != null) {
    const testable = alpha > batch.minimum_alpha;
    batch = { ...batch, alpha, is_ood: testable ? batch.p_value < alpha : null,
              note: testable ? batch.note : `alpha ${alpha.toPrecision(3)} is at or below this batch size's resolution ${batch.minimum_alpha.toPrecision(3)}` };
  }
  return { ...body, alpha, results, batch };
}

// ---- inputs: files, drops, pasted JSON ----

async function inputsFromFiles(files) {
  const list = Array.from(files);
  if (list.length === 0) throw new Error("no file given");
  const images = list.filter((f) => /^image\/(png|jpeg)$/.test(f.type) || /\.(png|jpe?g)$/i.test(f.name));
  if (images.length === list.length) {
    const form = new FormData();
    for (const file of images) form.append("files", file, file.name);
    return { body: form, contentType: null, previews: images.map((f) => ({ label: f.name, url: URL.createObjectURL(f) })) };
  }
  if (list.length > 1) throw new Error("pick either image files, or one .npy or CSV file");
  const file = list[0];
  if (/\.npy$/i.test(file.name)) {
    return { body: await file.arrayBuffer(), contentType: "application/x-npy", previews: null, label: file.name };
  }
  if (/\.csv$/i.test(file.name) || file.type === "text/csv") {
    return jsonInputs(parseCsv(await file.text(), file.name), file.name);
  }
  throw new Error(`${file.name}: expected PNG or JPEG images, a .npy array or a .csv file`);
}

function parseCsv(text, name) {
  const lines = text.split(/\r?\n/).filter((line) => line.trim() !== "");
  const rows = [];
  lines.forEach((line, index) => {
    const cells = line.split(",").map((cell) => cell.trim());
    const numbers = cells.map(Number);
    if (numbers.some((value) => Number.isNaN(value) || cells.some((c) => c === ""))) {
      if (index === 0) return;  // a header row
      throw new Error(`${name} row ${index + 1}: every cell must be a number, got ${JSON.stringify(line.slice(0, 80))}`);
    }
    rows.push(numbers);
  });
  if (rows.length === 0) throw new Error(`${name}: no numeric rows`);
  return rows;
}

function jsonInputs(instances, label) {
  return { body: instances, contentType: "application/json", previews: null, label };
}

function inputsFromPaste(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new Error(`pasted text is not JSON: ${error.message}`);
  }
  if (!Array.isArray(value)) throw new Error("paste a JSON array: one instance or a list of instances");
  const depth = (x) => (Array.isArray(x) ? 1 + depth(x[0]) : 0);
  const oneInstance = depth(value) === state.model.input.shape.length;
  return jsonInputs(oneInstance ? [value] : value, "pasted");
}

// ---- scoring ----

async function score(inputs) {
  if (!inputs || !state.model) return;
  const serial = ++state.requestSerial;
  const path = `/v1/models/${encodeURIComponent(state.model.name)}/score?alpha=${state.alpha}`;
  const options = { method: "POST", headers: { "X-OOD-Stream": CONSOLE_STREAM } };
  if (inputs.contentType === "application/json") {
    options.body = JSON.stringify({ instances: inputs.body });
    options.headers["Content-Type"] = "application/json";
  } else {
    options.body = inputs.body;
    if (inputs.contentType) options.headers["Content-Type"] = inputs.contentType;
  }
  try {
    const body = await (await api(path, options)).json();
    if (serial !== state.requestSerial) return;  // a newer request was sent meanwhile
    showError(null);
    releasePreviews(state.lastInputs, inputs);
    state.lastInputs = inputs;
    state.lastBody = body;
    renderResults(body, inputs);
    pollTraffic();
  } catch (error) {
    if (serial === state.requestSerial) showError(error);
  }
}

function releasePreviews(old, current) {
  if (old && old !== current && old.previews) for (const preview of old.previews) URL.revokeObjectURL(preview.url);
}

function renderResults(body, inputs) {
  const fused = new Set(state.model.fusion.signals);
  const cards = body.results.map((result, index) => {
    const preview = inputs.previews ? inputs.previews[index] : null;
    const verdict = result.is_ood ? "ood" : "in_distribution";
    const head = element("div", { class: "result-head" },
      preview ? element("img", { src: preview.url, alt: preview.label }) : null,
      element("span", { class: `verdict ${verdict}`, text: result.is_ood ? "OOD" : "in-distribution" }),
      element("span", { class: "fused-p", text: `fused p-value ${formatP(result.p_value)} ${result.p_value < body.alpha ? "<" : ">="} alpha ${body.alpha.toPrecision(4)}` }),
      result.prediction ? element("span", { text: `predicted ${result.prediction.label ?? result.prediction.class_index} (${(100 * result.prediction.confidence).toFixed(1)}%)` }) : null,
      element("span", { class: "hint", text: preview ? preview.label : `${inputs.label || "input"} #${index + 1}` }));
    const grid = element("div", { class: "signal-grid" },
      signalView("fused", result.score, result.p_value, body.alpha, state.histograms && state.histograms.fused, true, "fused statistic"),
      ...Object.keys(result.p_values).map((name) => signalView(
        name, result.signals[name], result.p_values[name], body.alpha,
        state.histograms && state.histograms.signals[name], fused.has(name), null)));
    return element("div", { class: "result", "data-verdict": verdict, "data-p-value": String(result.p_value) }, head, grid);
  });
  $("results").replaceChildren(...cards);
  const batch = $("batch-test");
  if (body.batch) {
    batch.hidden = false;
    const b = body.batch;
    batch.textContent = `batch typicality test over ${b.size} inputs: p-value ${b.p_value == null ? "n/a" : formatP(b.p_value)}`
      + (b.is_ood == null ? ` (${b.note || "not testable at this alpha"})` : b.is_ood ? ": the batch as a whole looks shifted" : ": the batch looks typical");
  } else {
    batch.hidden = true;
  }
}

function formatP(p) {
  return p < 0.001 ? p.toExponential(2) : p.toFixed(4);
}

// One signal: its p-value as a bar on a log scale (full = 1, empty = the smallest supported alpha) with alpha
// marked, and the calibration histogram with this input's score marked.
function signalView(name, scoreValue, pValue, alpha, histogram, isFused, label) {
  const fraction = (p) => {
    const low = Math.log10(state.model.minimum_alpha);
    return Math.min(Math.max((Math.log10(Math.max(p, 1e-300)) - low) / -low, 0), 1);
  };
  const fill = element("div", { class: `fill${pValue < alpha ? " low" : ""}` });
  fill.style.width = `${(100 * fraction(pValue)).toFixed(1)}%`;
  const mark = element("div", { class: "alpha-mark", title: `alpha ${alpha}` });
  mark.style.left = `${(100 * fraction(alpha)).toFixed(1)}%`;
  const canvas = element("canvas", { class: "histogram", width: 260, height: 46 });
  if (histogram) drawHistogram(canvas, histogram, scoreValue);
  return element("div", { class: `signal${isFused ? " fused" : ""}`, "data-signal": name },
    element("div", { class: "signal-head" },
      element("span", { class: "signal-name", text: label || name }),
      element("span", { text: `p ${formatP(pValue)}  score ${Number.isFinite(scoreValue) ? scoreValue.toPrecision(4) : String(scoreValue)}` })),
    element("div", { class: "bar" }, fill, mark),
    canvas);
}

function drawHistogram(canvas, histogram, value) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  const edges = histogram.edges;
  const counts = histogram.counts;
  const low = edges[0];
  const high = edges[edges.length - 1];
  const peak = Math.max(1, ...counts);
  const x = (v) => ((v - low) / (high - low)) * (width - 8) + 4;
  context.clearRect(0, 0, width, height);
  context.fillStyle = "#9fb3d1";
  counts.forEach((count, i) => {
    const left = x(edges[i]);
    const barHeight = (count / peak) * (height - 10);
    context.fillRect(left, height - barHeight, Math.max(1, x(edges[i + 1]) - left - 1), barHeight);
  });
  if (value == null || Number.isNaN(value)) return;
  const beyond = value > high || value === Infinity;
  const position = Math.min(Math.max(x(value), 2), width - 2);
  context.strokeStyle = "#c93c37";
  context.lineWidth = 2;
  context.beginPath();
  context.moveTo(position, 0);
  context.lineTo(position, height);
  context.stroke();
  if (beyond || value < low) {
    context.fillStyle = "#c93c37";
    context.font = "10px sans-serif";
    context.textAlign = beyond ? "right" : "left";
    context.fillText(beyond ? "beyond calibration \u2192" : "\u2190 below", beyond ? width - 5 : 5, 10);
  }
}

// ---- samples ----

async function drawSamples() {
  const temperature = Number($("temperature").value) || 0.7;
  try {
    const response = await api(`/v1/models/${encodeURIComponent(state.model.name)}/sample`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "image/png" },
      body: JSON.stringify({ n: 16, temperature }),
    });
    const url = URL.createObjectURL(await response.blob());
    $("samples").replaceChildren(element("img", { src: url, alt: `16 samples at temperature ${temperature}` }));
    showError(null);
  } catch (error) {
    showError(error);
  }
}

// ---- live traffic: the OOD rate against alpha, and the drift tests per stream ----

async function pollTraffic() {
  if (!state.model || state.polling) return;
  state.polling = true;
  const model = state.model;
  const name = encodeURIComponent(model.name);
  try {
    const traffic = await (await api(`/v1/models/${name}/traffic`)).json();
    if (model !== state.model) return;  // the model was switched meanwhile
    if (traffic.ood_rate != null) state.rateHistory.push({ time: Date.now(), rate: traffic.ood_rate });
    state.rateHistory = state.rateHistory.slice(-120);
    renderTraffic(traffic);
    let drift = null;
    try {
      drift = await (await api(`/v1/models/${name}/drift`)).json();
    } catch (error) {
      if (!(error instanceof ApiFailure && error.code === "drift_disabled")) throw error;
    }
    renderDrift(drift);
    $("traffic-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("traffic-updated").textContent = `not updated: ${error instanceof ApiFailure ? `${error.code}: ${error.message}` : error}`;
  } finally {
    state.polling = false;
  }
}

function renderTraffic(traffic) {
  const list = element("dl", { class: "facts" });
  const rows = [
    ["OOD rate", traffic.ood_rate == null ? "no input scored yet" : `${(100 * traffic.ood_rate).toFixed(2)}% of the last ${traffic.instances}`],
    ["expected in distribution", `at most alpha = ${traffic.default_alpha}`],
    ["window", `${traffic.window} inputs`],
  ];
  for (const [term, text] of rows) list.append(element("dt", { text: term }), element("dd", { text }));
  $("traffic-facts").replaceChildren(list);
  drawRateChart($("ood-rate-chart"), state.rateHistory, traffic.default_alpha);
}

function drawRateChart(canvas, history, alpha) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  const top = Math.max(alpha * 3, ...history.map((h) => h.rate), 0.01);
  const y = (rate) => height - 16 - (rate / top) * (height - 26);
  context.clearRect(0, 0, width, height);
  context.font = "10px sans-serif";
  context.fillStyle = "#5b6474";
  context.fillText(`OOD rate (top ${(100 * top).toFixed(1)}%)`, 6, 12);
  context.strokeStyle = "#1d2330";
  context.setLineDash([4, 3]);
  context.beginPath();
  context.moveTo(0, y(alpha));
  context.lineTo(width, y(alpha));
  context.stroke();
  context.setLineDash([]);
  context.fillText(`alpha ${alpha}`, width - 70, y(alpha) - 3);
  if (history.length === 0) return;
  context.strokeStyle = "#c93c37";
  context.lineWidth = 2;
  context.beginPath();
  history.forEach((point, i) => {
    const px = history.length === 1 ? width / 2 : (i / (history.length - 1)) * (width - 10) + 5;
    if (i === 0) context.moveTo(px, y(point.rate));
    else context.lineTo(px, y(point.rate));
  });
  context.stroke();
  context.fillStyle = "#c93c37";
  history.forEach((point, i) => {
    const px = history.length === 1 ? width / 2 : (i / (history.length - 1)) * (width - 10) + 5;
    context.beginPath();
    context.arc(px, y(point.rate), 2.5, 0, 2 * Math.PI);
    context.fill();
  });
  context.lineWidth = 1;
}

function renderDrift(drift) {
  if (drift == null) {
    $("drift").replaceChildren(element("p", { class: "hint", text: "drift tests are off on this service (OODSERVE_DRIFT=false)" }));
    return;
  }
  if (drift.streams.length === 0) {
    $("drift").replaceChildren(element("p", { class: "hint", text: "no stream yet: score some inputs" }));
    return;
  }
  const header = element("tr", {}, ...["stream", "inputs", "log10 martingale", "max", "log10 change statistic", "alarm", "change alarm"]
    .map((text) => element("th", { text })));
  const rows = drift.streams.map((s) => element("tr", { "data-stream": s.stream },
    element("td", { text: s.stream }),
    element("td", { text: String(s.inputs_since_reset) }),
    element("td", { text: s.log10_martingale.toFixed(2) }),
    element("td", { text: s.log10_martingale_max.toFixed(2) }),
    element("td", { text: s.log10_change_statistic == null ? "-" : s.log10_change_statistic.toFixed(2) }),
    element("td", { class: s.alarm ? "alarm" : "", text: s.alarm ? "ALARM" : "no" }),
    element("td", { class: s.change_alarm ? "alarm" : "", text: s.change_alarm ? "ALARM" : "no" })));
  $("drift").replaceChildren(element("table", {}, header, ...rows));
}

// ---- wiring ----

function wire() {
  $("model-select").addEventListener("change", (event) => selectModel(event.target.value).catch(showError));
  $("alpha").addEventListener("input", (event) => setAlpha(sliderToAlpha(Number(event.target.value)), true));
  $("alpha-number").addEventListener("change", (event) => {
    const value = Number(event.target.value);
    if (value > 0 && value <= MAX_ALPHA) setAlpha(value, true);
    else if (value > MAX_ALPHA && value < 1) showError(new Error(`the console's slider goes up to alpha ${MAX_ALPHA}; the API takes any alpha in (0, 1)`));
    else showError(new Error(`alpha must be a number in (0, 1), got ${event.target.value}`));
  });
  $("file-input").addEventListener("change", async (event) => {
    try {
      await score(await inputsFromFiles(event.target.files));
    } catch (error) {
      showError(error);
    }
    event.target.value = "";
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    try {
      await score(await inputsFromFiles(event.dataTransfer.files));
    } catch (error) {
      showError(error);
    }
  });
  $("paste-button").addEventListener("click", async () => {
    try {
      await score(inputsFromPaste($("paste-input").value));
    } catch (error) {
      showError(error);
    }
  });
  $("samples-button").addEventListener("click", drawSamples);
  $("api-key").addEventListener("change", () => loadModels().then(() => showError(null)).catch(showError));
  setInterval(pollTraffic, POLL_MS);
}

wire();
loadModels().catch(showError);
