// scorelab playground: the run list, sampling with streamed x0 predictions, strips, the training view.
// Plain JavaScript against the JSON API of scorelab/serve/app.py; no build step, no framework.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { runs: [], run: null, info: null, stream: null, metrics: { rows: [], next: 0 }, timer: null, tab: "sample" };
const BOOKKEEPING = new Set(["step", "lr", "it_s", "ex_s", "elapsed", "seconds"]);

// --- helpers -------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function fmt(v) {
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toPrecision(4).replace(/\.?0+$/, "");
}
function showError(msg) {
  const box = $("#error");
  box.textContent = msg;
  box.hidden = false;
  clearTimeout(showError.t);
  showError.t = setTimeout(() => { box.hidden = true; }, 8000);
}
async function api(path, options = {}) {
  const r = await fetch(path, options);
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}
function postJSON(path, body, signal) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal });
}
function setStatus(id, text, bad = false) {
  const s = $(id);
  s.textContent = text;
  s.classList.toggle("bad", bad);
}

// --- the run list ----------------------------------------------------------------------
function evalText(run, all = false) {
  const parts = [];
  const ev = run.eval || {};
  const keys = all ? Object.keys(ev) : ["fid", "kid", "sliced_w2", "accuracy"];
  for (const k of keys) if (k in ev) parts.push(`${k} ${fmt(ev[k])}`);
  for (const [m, e] of Object.entries(run.nll || {})) if (e && typeof e === "object") parts.push(`${m} ${fmt(e.mean)} ${e.units || ""}`.trim());
  return parts.join(" · ");
}
function renderRuns() {
  const body = $("#runs tbody");
  body.replaceChildren();
  if (!state.runs.length) {
    body.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "no runs here yet: train one with scorelab train … --runs DIR" })));
    return;
  }
  for (const run of state.runs) {
    const status = run.status || "";
    const badge = el("span", { class: `badge ${status.replace(/\s+/g, "").replace("nocheckpoint", "nockpt")}`, text: status });
    const tr = el("tr", { class: "run" + (run.name === state.run ? " selected" : ""), "data-run": run.name, title: run.error || "" },
      el("td", {}, el("span", { class: "name", text: run.name }), badge),
      el("td", { text: run.family || "?" }),
      el("td", { text: run.dataset || "" }),
      el("td", { class: "step", text: run.step === null || run.step === undefined ? "–" : `${run.step}${run.steps ? " / " + run.steps : ""}` }),
      el("td", { class: "evals", text: evalText(run), title: evalText(run, true) }));
    tr.addEventListener("click", () => selectRun(run.name));
    body.append(tr);
  }
}
async function loadRuns() {
  try {
    const d = await (await api("/api/runs")).json();
    state.runs = d.runs;
    $("#root").textContent = d.root;
    $("#jobs").textContent = d.jobs.running || d.jobs.waiting ? `sampling: ${d.jobs.running} running, ${d.jobs.waiting} waiting` : "";
    renderRuns();
  } catch (e) {
    showError(`run list: ${e.message}`);
  }
}

// --- one run -----------------------------------------------------------------------------
function field(label, input, help) {
  const l = el("label", { title: help || "" }, label, input);
  return l;
}
function numberInput(name, value, { min, max, step, placeholder } = {}) {
  return el("input", { type: "number", name, value: value ?? "", min, max, step: step ?? "any", placeholder });
}
function select(name, choices, value) {
  const s = el("select", { name });
  for (const c of choices) {
    const [v, text] = Array.isArray(c) ? c : [c, c];
    s.append(el("option", { value: v, text, selected: String(v) === String(value) }));
  }
  return s;
}
function classField(info, name = "class") {
  if (info.classes.length) {
    const choices = [["", "none (unconditional)"], ...info.classes.map((c) => [c.index, `${c.index} · ${c.name}`]), ["all", "every class (one row each)"]];
    return field("class", select(name, choices, ""), "the class to generate (names from the data)");
  }
  return null;
}
function buildSampleForm(info) {
  const f = $("#sample-fields");
  f.replaceChildren();
  f.append(field("n", numberInput("n", Math.min(info.defaults.n, info.limits.n), { min: 1, max: info.limits.n, step: 1 }), `samples (at most ${info.limits.n})`));
  f.append(field("seed", numberInput("seed", 0, { min: 0, step: 1 }), "sample i uses seed + i"));
  const cls = classField(info);
  if (cls) f.append(cls);
  else if (info.capabilities.sample_options.includes("classifier"))
    f.append(field("class (classifier guidance)", numberInput("class", "", { min: 0, step: 1, placeholder: "none" })));
  for (const o of info.options) {
    let input;
    if (o.kind === "choice" || o.kind === "run") {
      const choices = o.kind === "run" ? [["", "none"], ...o.choices] : o.choices;
      input = select(o.name, choices, o.default ?? "");
    } else {
      input = numberInput(o.name, o.default, { min: o.min, max: o.max, step: o.kind === "int" ? 1 : "any", placeholder: o.default === null ? "off" : "" });
    }
    input.dataset.kind = o.kind;
    f.append(field(o.label, input, o.help));
  }
  const streams = info.capabilities.sample_options.includes("steps");
  $("#stream").closest("label").hidden = !streams;
}
function readForm(form, info) {
  const body = {};
  for (const input of form.querySelectorAll("input[name], select[name]")) {
    const v = input.value.trim();
    if (v === "") continue;
    if (input.name === "class") {
      body.class = v === "all" ? info.classes.map((c) => c.index) : Number(v);
    } else if (input.type === "number") body[input.name] = Number(v);
    else body[input.name] = v;
  }
  body.run = state.run;
  return body;
}
function tabAvailable(tab, info) {
  if (tab === "sample") return info.capabilities.generate;
  if (tab === "interpolate") return info.capabilities.interpolate.length > 0;
  if (tab === "traverse") return info.capabilities.traverse;
  return true;
}
function showTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== `tab-${tab}`;
  if (tab === "training") refreshTraining(true);
}
function buildInterpForm(info) {
  const f = $("#interp-fields");
  f.replaceChildren();
  const it = info.interpolation;
  if (!it) return;
  f.append(field("seed a", numberInput("seed_a", 0, { min: 0, step: 1 })), field("seed b", numberInput("seed_b", 1, { min: 0, step: 1 })));
  f.append(field("images per strip", numberInput("n", 9, { min: 2, max: info.limits.strip, step: 1 })));
  f.append(field("path", select("mode", it.modes, "both"), "linear, spherical, or one row of each"));
  f.append(field("latent space", select("space", it.spaces, it.spaces[0])));
  if (it.samplers.length) {
    const def = info.options.find((o) => o.name === "sampler");
    const d = def && it.samplers.includes(def.default) ? def.default : it.samplers[0];
    f.append(field("sampler (deterministic)", select("sampler", it.samplers, d)));
    const st = info.options.find((o) => o.name === "steps");
    f.append(field("steps", numberInput("steps", st ? st.default : 20, { min: 1, max: info.limits.steps, step: 1 })));
  }
  if (info.classes.length) f.append(field("class", select("class", [["", "none"], ...info.classes.map((c) => [c.index, `${c.index} · ${c.name}`])], "")));
}
function buildTravForm(info) {
  const f = $("#trav-fields");
  f.replaceChildren();
  f.append(field("latent dims", el("input", { name: "dims", value: "0-7" }), "e.g. 0-7 or 0,3,5"));
  f.append(field("range", numberInput("range", 3, { min: 0.1, max: 20, step: 0.5 })));
  f.append(field("images per row", numberInput("n", 9, { min: 2, max: info.limits.strip, step: 1 })));
  f.append(field("held-out example", numberInput("index", 0, { min: 0, step: 1 })));
}
async function selectRun(name) {
  if (state.stream) state.stream.abort();
  state.run = name;
  renderRuns();
  try {
    const info = await (await api(`/api/run?run=${encodeURIComponent(name)}`)).json();
    if (state.run !== name) return;
    state.info = info;
    const head = $("#run-head");
    head.replaceChildren(
      el("span", { class: "title", text: info.name }),
      el("span", { class: "muted", text: `${info.family} · ${info.data.name} ${JSON.stringify(info.data.shape)}` }),
      el("span", { class: "muted", text: `step ${info.step}${info.steps ? " / " + info.steps : ""} · ${info.status} · ${info.precision}` }));
    buildSampleForm(info);
    buildInterpForm(info);
    buildTravForm(info);
    for (const b of document.querySelectorAll("#tabs button")) b.hidden = !tabAvailable(b.dataset.tab, info);
    for (const img of document.querySelectorAll("#run-panel figure img")) { img.dataset.state = "empty"; img.removeAttribute("src"); }
    for (const s of ["#sample-status", "#interp-status", "#trav-status"]) setStatus(s, "");
    state.metrics = { rows: [], next: 0 };
    $("#run-panel").hidden = false;
    // a run in training opens on its training view; otherwise the tab in use stays when the run has it
    const tab = tabAvailable(state.tab, info) ? state.tab : (info.capabilities.generate ? "sample" : "training");
    showTab(info.status === "training" ? "training" : tab);
  } catch (e) {
    showError(`${name}: ${e.message}`);
  }
}

// --- sampling ----------------------------------------------------------------------------
async function sample(ev) {
  ev.preventDefault();
  const info = state.info;
  const body = readForm($("#sample-form"), info);
  const img = $("#sample-image");
  const button = $("#sample-button");
  if (state.stream) state.stream.abort();
  const ctrl = new AbortController();
  state.stream = ctrl;
  button.disabled = true;
  img.dataset.frames = "0";
  const t0 = performance.now();
  try {
    if (!$("#stream").checked || $("#stream").closest("label").hidden) {
      setStatus("#sample-status", "sampling…");
      img.dataset.state = img.dataset.state === "empty" ? "empty" : "waiting";
      const r = await postJSON("/api/sample", body, ctrl.signal);
      const blob = await r.blob();
      img.src = URL.createObjectURL(blob);
      await img.decode().catch(() => {});
      img.dataset.state = "done";
      setStatus("#sample-status", `${body.n} samples in ${r.headers.get("X-Seconds")} s (weights of step ${r.headers.get("X-Run-Step")})`);
      return;
    }
    const r = await postJSON("/api/sample/stream", body, ctrl.signal);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) handleEvent(JSON.parse(line), img, t0);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { setStatus("#sample-status", e.message, true); showError(e.message); }
  } finally {
    if (state.stream === ctrl) { state.stream = null; button.disabled = false; }
    loadRuns(); // the header's job count
  }
}
function handleEvent(e, img, t0) {
  if (e.event === "queued") setStatus("#sample-status", `waiting: ${e.ahead} job(s) ahead on this server…`);
  else if (e.event === "start") setStatus("#sample-status", `sampling ${e.n}${e.steps ? ` with ${e.steps} steps` : ""}…`);
  else if (e.event === "step") {
    if (e.image) {
      img.src = e.image;
      img.dataset.state = "streaming";
      img.dataset.frames = String(Number(img.dataset.frames) + 1);
    }
    const t = e.t !== undefined ? ` · t = ${fmt(e.t)}` : "";
    setStatus("#sample-status", `step ${e.i + 1}${e.steps ? " / " + e.steps : ""}${t} · showing the ${e.kind === "x0" ? "x0 prediction" : "current state"}`);
  } else if (e.event === "done") {
    img.src = e.image;
    img.decode().catch(() => {}).then(() => { img.dataset.state = "done"; });
    const secs = ((performance.now() - t0) / 1000).toFixed(2);
    setStatus("#sample-status", `${e.n} samples in ${secs} s (weights of step ${e.run_step})`);
  } else if (e.event === "error") {
    setStatus("#sample-status", e.error, true);
    showError(e.error);
  }
}

// --- strips ------------------------------------------------------------------------------
function parseDims(text) {
  const out = [];
  for (const part of text.split(/[,\s]+/).filter(Boolean)) {
    const m = part.match(/^(\d+)-(\d+)$/);
    if (m) for (let i = Number(m[1]); i <= Number(m[2]) && out.length < 64; i++) out.push(i);
    else out.push(Number(part));
  }
  return out;
}
async function strip(ev, kind) {
  ev.preventDefault();
  const form = kind === "interpolate" ? $("#interp-form") : $("#trav-form");
  const img = kind === "interpolate" ? $("#interp-image") : $("#trav-image");
  const status = kind === "interpolate" ? "#interp-status" : "#trav-status";
  const raw = {};
  for (const input of form.querySelectorAll("input[name], select[name]")) if (input.value.trim() !== "") raw[input.name] = input.value.trim();
  const body = { run: state.run };
  if (kind === "interpolate") {
    body.seeds = [Number(raw.seed_a ?? 0), Number(raw.seed_b ?? 1)];
    for (const k of ["n", "steps", "class"]) if (k in raw) body[k] = Number(raw[k]);
    for (const k of ["mode", "space", "sampler"]) if (k in raw) body[k] = raw[k];
  } else {
    body.dims = parseDims(raw.dims || "0-7");
    for (const k of ["range", "n", "index"]) if (k in raw) body[k] = Number(raw[k]);
  }
  setStatus(status, "drawing…");
  const t0 = performance.now();
  try {
    const r = await postJSON(`/api/${kind}`, body);
    img.src = URL.createObjectURL(await r.blob());
    await img.decode().catch(() => {});
    img.dataset.state = "done";
    setStatus(status, `done in ${((performance.now() - t0) / 1000).toFixed(2)} s` +
      (kind === "interpolate" ? ` · rows: ${r.headers.get("X-Modes")}` : ` · one row per latent dimension, swept over ±${body.range ?? 3}`));
  } catch (e) {
    setStatus(status, e.message, true);
  }
}

// --- the training view -------------------------------------------------------------------
function metricNames(rows) {
  const seen = new Map();
  for (const r of rows) for (const [k, v] of Object.entries(r)) if (typeof v === "number" && !BOOKKEEPING.has(k)) seen.set(k, (seen.get(k) || 0) + 1);
  return [...seen.keys()].sort((a, b) => (b.startsWith("loss") - a.startsWith("loss")) || a.localeCompare(b));
}
function drawLoss() {
  const canvas = $("#loss");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 58, R = 12, T = 14, B = 34;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  const key = $("#metric").value;
  const pts = state.metrics.rows.filter((r) => typeof r[key] === "number" && Number.isFinite(r[key]) && typeof r.step === "number").map((r) => [r.step, r[key]]);
  if (!pts.length) { ctx.fillStyle = "#6b7480"; ctx.fillText("no metrics yet", L, H / 2); return; }
  const log = $("#logscale").checked && pts.every((p) => p[1] > 0);
  const f = (v) => (log ? Math.log10(v) : v);
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => f(p[1]))), Math.max(...pts.map((p) => f(p[1])))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (f(y) - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#dde1e6"; ctx.fillStyle = "#6b7480"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4, py = T + (1 - i / 4) * (H - T - B);
    ctx.beginPath(); ctx.moveTo(L, py); ctx.lineTo(W - R, py); ctx.stroke();
    ctx.fillText(fmt(log ? 10 ** yv : yv), 4, py + 4);
  }
  ctx.fillText(`step ${x0}`, L, H - 10);
  const right = `step ${x1}`;
  ctx.fillText(right, W - R - ctx.measureText(right).width, H - 10);
  ctx.strokeStyle = "#2b6cb0"; ctx.lineWidth = 1.6; ctx.beginPath();
  pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
  ctx.stroke();
  if (pts.length < 3) { ctx.fillStyle = "#2b6cb0"; for (const [x, y] of pts) { ctx.beginPath(); ctx.arc(X(x), Y(y), 3, 0, 7); ctx.fill(); } }
  const last = pts[pts.length - 1];
  ctx.fillStyle = "#1d232b";
  ctx.fillText(`${key} = ${fmt(last[1])} at step ${last[0]}`, L + 6, T + 12);
}
async function refreshTraining(first = false) {
  if (!state.run || state.tab !== "training") return;
  const name = state.run;
  try {
    const d = await (await api(`/api/metrics?run=${encodeURIComponent(name)}&after=${state.metrics.next}`)).json();
    if (name !== state.run) return;
    if (d.reset) state.metrics.rows = [];
    state.metrics.rows.push(...d.rows);
    state.metrics.next = d.next;
    const sel = $("#metric");
    const names = metricNames(state.metrics.rows);
    if (names.join() !== [...sel.options].map((o) => o.value).join()) {
      const keep = sel.value;
      sel.replaceChildren(...names.map((n) => el("option", { value: n, text: n, selected: n === keep })));
      if (first && names.length) { sel.value = names[0]; $("#logscale").checked = names[0].startsWith("loss"); }
    }
    drawLoss();
    const live = d.status === "training";
    const rows = state.metrics.rows.filter((r) => typeof r.step === "number");
    const logged = rows.length ? ` · logged to step ${rows[rows.length - 1].step}` : "";
    setStatus("#train-status", `${d.status} · checkpoint at step ${d.step ?? "–"}${d.steps ? " / " + d.steps : ""}${logged}` +
      (live ? " · following live" : ""));
    const img = $("#latest");
    if (d.latest_picture) {
      const stamp = `${d.latest_picture}:${d.updated}`;
      if (img.dataset.stamp !== stamp) {
        img.src = `/api/picture?run=${encodeURIComponent(name)}&t=${encodeURIComponent(stamp)}`;
        img.dataset.stamp = stamp;
        $("#latest-caption").textContent = `latest sample grid: ${d.latest_picture}`;
      }
    } else {
      img.removeAttribute("src");
      $("#latest-caption").textContent = "no sample grid yet (the trainer writes one every train.sample_every steps)";
    }
  } catch (e) {
    setStatus("#train-status", e.message, true);
  }
}

// Pictures are shown enlarged (pixelated) to fit: at most 520 px wide and 62% of the window high.
function fit(img) {
  if (!img.naturalWidth) return;
  const k = Math.max(1, Math.min(520 / img.naturalWidth, (0.62 * window.innerHeight) / img.naturalHeight));
  img.style.width = `${Math.round(img.naturalWidth * k)}px`;
  img.classList.add("fit");
}

// --- wiring ------------------------------------------------------------------------------
for (const id of ["#sample-image", "#interp-image", "#trav-image"]) $(id).addEventListener("load", (e) => fit(e.target));
$("#sample-form").addEventListener("submit", sample);
$("#interp-form").addEventListener("submit", (e) => strip(e, "interpolate"));
$("#trav-form").addEventListener("submit", (e) => strip(e, "traverse"));
for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
$("#metric").addEventListener("change", drawLoss);
$("#logscale").addEventListener("change", drawLoss);
loadRuns();
setInterval(loadRuns, 5000);
setInterval(() => refreshTraining(false), 2000);
