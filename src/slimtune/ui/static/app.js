// slimtune ui: plain JS over the JSON API in slimtune/ui/app.py.
"use strict";

const $ = id => document.getElementById(id);
const state = { info: null, selected: null, runs: [], chat: [] };

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Slimtune-UI": "1" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || data.detail?.[0]?.msg || response.statusText);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

const fmtBytes = b => (b / 2 ** 30).toFixed(b < 2 ** 30 ? 2 : 1) + " GB";
const fmtNum = (v, digits = 4) => (typeof v === "number" ? v.toFixed(digits) : "–");
function fmtTime(s) {
  if (s == null) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + r + "s";
}

// ------------------------------------------------------------------ tabs
function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.classList.toggle("hidden", panel.id !== "panel-" + name);
  if (name === "runs") refreshRuns();
  if (name === "play" || name === "export") refreshRuns().then(fillRunPickers);
}

// ------------------------------------------------------------------ new run
function settings() {
  const out = {};
  for (const input of document.querySelectorAll("#settings [data-key]")) {
    const key = input.dataset.key;
    if (input.type === "checkbox") out[key] = input.checked;
    else if (input.value === "") out[key] = null;
    else if (input.type === "number") out[key] = Number(input.value);
    else out[key] = input.value;
  }
  out.model = $("model-path").value.trim() || $("model-select").value || null;
  out.data = dataPath();
  out.eval_data = $("eval-path").value.trim() || null;
  return out;
}
const dataPath = () => $("data-path").value.trim() || $("data-select").value || null;

function fillDefaults(defaults) {
  for (const input of document.querySelectorAll("#settings [data-key]")) {
    const value = defaults[input.dataset.key];
    if (input.type === "checkbox") input.checked = !!value;
    else input.value = value == null ? "" : Array.isArray(value) ? value.join(",") : value;
  }
  // Checkpoints let a stopped run resume; the UI saves one every 10 steps unless told otherwise.
  document.querySelector('[data-key="save_every"]').value = 10;
}

async function showPreview() {
  const path = dataPath(), box = $("preview");
  if (!path) { box.textContent = "Choose a data file to see its rows."; return; }
  box.textContent = "reading…";
  try {
    const p = await api("/api/preview", { path });
    box.replaceChildren();
    if (p.error && !p.rows.length && !p.bad.length) { box.append(el("div", { class: "error" }, p.error)); return; }
    box.append(el("div", {}, el("b", {}, `${p.count} rows`), `, format `, el("b", { id: "preview-format" }, p.format || "?"),
      p.other_formats.length ? ` (also: ${p.other_formats.join(", ")})` : ""));
    const table = el("table");
    for (const r of p.rows) table.append(el("tr", {}, el("td", { class: "where" }, r.where.split(", ").pop()), el("td", {}, JSON.stringify(r.row))));
    box.append(table);
    if (p.bad.length) {
      const list = el("div", { class: "error", id: "preview-bad" }, `${p.bad_count} bad row(s):`);
      for (const b of p.bad) list.append(el("div", {}, b.error));
      box.append(list);
    }
  } catch (e) { box.replaceChildren(el("div", { class: "error" }, e.message)); }
}

let planTimer = null;
function schedulePlan() { clearTimeout(planTimer); planTimer = setTimeout(updatePlan, 250); }
async function updatePlan() {
  const box = $("memory");
  try {
    const p = await api("/api/plan", settings());
    box.className = "memory " + (p.fits ? "fits" : "nofit");
    box.textContent = (p.fits ? "fits in " : "does not fit: needs ") + fmtBytes(p.total_bytes) +
      " of " + fmtBytes(p.available_bytes) + " free (" + fmtBytes(p.memory_bytes) + " total) — " + p.model;
    $("memory-parts").textContent = Object.entries(p.parts).filter(([, v]) => v > 0)
      .map(([k, v]) => `${k.replace(/_/g, " ")} ${fmtBytes(v)}`).join(" · ");
  } catch (e) { box.className = "memory nofit"; box.textContent = "memory: " + e.message; $("memory-parts").textContent = ""; }
}

async function upload(file) {
  const response = await fetch("/api/upload?name=" + encodeURIComponent(file.name), {
    method: "POST", headers: { "X-Slimtune-UI": "1" }, body: file,
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error);
  $("data-path").value = data.path;
  await showPreview();
}

async function startRun() {
  $("start-error").textContent = "";
  try {
    const r = await api("/api/runs", { name: $("run-name").value.trim(), settings: settings() });
    state.selected = r.path;
    $("run-name").value = defaultName();
    showTab("runs");
  } catch (e) { $("start-error").textContent = e.message; }
}

function defaultName() {
  const d = new Date(), p = n => String(n).padStart(2, "0");
  return `run-${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

// ------------------------------------------------------------------ runs
async function refreshRuns() {
  try { state.runs = await api("/api/runs"); } catch (e) { return; }
  const list = $("run-list");
  list.replaceChildren();
  for (const r of state.runs) {
    const progress = r.total_steps ? `${r.step}/${r.total_steps}` : r.step ? String(r.step) : "";
    const item = el("li", { "data-path": r.path }, el("span", { class: "name", title: r.path }, r.name),
      el("span", {}, el("span", { class: "muted small" }, progress + " "), el("span", { class: "badge " + r.state }, r.state)));
    if (r.path === state.selected) item.classList.add("selected");
    item.onclick = () => { state.selected = r.path; refreshRuns(); refreshRun(); };
    list.append(item);
  }
  if (!state.selected && state.runs.length) state.selected = state.runs[0].path;
  return state.runs;
}

async function refreshRun() {
  if (!state.selected) return;
  let r;
  try { r = await api("/api/run?path=" + encodeURIComponent(state.selected)); } catch (e) { return; }
  $("run-title").textContent = r.name;
  $("run-state").replaceChildren(el("span", { class: "badge " + r.state, id: "run-state-badge" }, r.state),
    el("span", { class: "muted small" }, `  ${r.method || ""} · ${r.model || "default model"} · ${r.data || ""}`));
  $("run-step").textContent = r.total_steps ? `${r.step} / ${r.total_steps}` : String(r.step);
  $("run-loss").textContent = fmtNum(r.loss);
  $("run-tps").textContent = r.tokens_per_s == null ? "–" : Math.round(r.tokens_per_s).toString();
  $("run-eta").textContent = r.state === "running" ? fmtTime(r.eta_s) : "–";
  $("run-bar").style.width = (r.total_steps ? Math.min(100, 100 * r.step / r.total_steps) : 0) + "%";
  drawLossChart($("loss-chart"), r.losses, r.evals.map(e => [e.step, e.eval_loss]).filter(p => typeof p[1] === "number"), r.total_steps);
  const table = $("eval-table");
  table.replaceChildren();
  if (r.evals.length) {
    table.append(el("tr", {}, el("th", {}, "step"), el("th", {}, "eval loss"), el("th", {}, "perplexity"), el("th", {}, "exact match")));
    for (const e of r.evals) table.append(el("tr", {}, el("td", {}, String(e.step)), el("td", {}, fmtNum(e.eval_loss)),
      el("td", {}, fmtNum(e.eval_perplexity, 2)), el("td", {}, e.eval_accuracy == null ? "–" : (100 * e.eval_accuracy).toFixed(1) + "%")));
  }
  $("run-error").textContent = r.error || "";
  $("run-stop").disabled = r.state !== "running";
  $("run-resume").disabled = !r.can_resume;
}

async function runAction(what) {
  try { await api("/api/run/" + what, { path: state.selected }); } catch (e) { $("run-error").textContent = e.message; }
  refreshRun(); refreshRuns();
}

// ------------------------------------------------------------------ playground and export pickers
function fillRunPickers() {
  const withAdapter = state.runs.filter(r => r.has_adapter);
  const box = $("play-adapters");
  const checked = new Set([...box.querySelectorAll("input:checked")].map(i => i.value));
  box.replaceChildren();
  for (const r of withAdapter) {
    const input = el("input", { type: "checkbox", value: r.path, "data-name": r.name });
    input.checked = checked.has(r.path);
    box.append(el("label", { class: "check" }, input, " " + r.name));
  }
  if (!withAdapter.length) box.append(el("span", { class: "muted" }, "no finished runs with an adapter yet"));
  const select = $("export-run"), current = select.value;
  select.replaceChildren(...withAdapter.map(r => el("option", { value: r.path }, r.name)));
  if (current) select.value = current;
  refreshExport();
}

function chosenAdapters() { return [...$("play-adapters").querySelectorAll("input:checked")].map(i => i.value); }

async function playSend() {
  const prompt = $("play-prompt").value.trim();
  if (!prompt) return;
  $("play-error").textContent = ""; $("play-status").textContent = "generating…"; $("play-send").disabled = true;
  const chat = $("play-mode").value === "chat";
  const system = $("play-system").value.trim();
  const turns = (chat ? state.chat : []).map(({ role, content }) => ({ role, content })).concat([{ role: "user", content: prompt }]);
  const messages = (system ? [{ role: "system", content: system }] : []).concat(turns);
  const adapters = chosenAdapters();
  try {
    const r = await api("/api/playground", {
      runs: chat && adapters.length ? adapters.slice(0, 1) : adapters, messages,
      include_base: chat ? !adapters.length : $("play-base").checked, max_tokens: Number($("play-max").value) || 48,
    });
    if (chat) {
      state.chat = state.chat.concat([{ role: "user", content: prompt }, { role: "assistant", content: r.answers[0].text, label: r.answers[0].label }]);
      $("play-prompt").value = "";
      drawChat();
    } else {
      $("play-answers").replaceChildren(...r.answers.map(a => el("div", { class: "answer" },
        el("h3", {}, a.label), el("pre", { class: "answer-text" }, a.text || "(empty)"),
        el("div", { class: "muted small" }, `${a.tokens} tokens, ${a.finish}`))));
    }
    $("play-status").textContent = `${r.model}${r.qlora ? " (NF4)" : ""}`;
  } catch (e) { $("play-error").textContent = e.message; $("play-status").textContent = ""; }
  $("play-send").disabled = false;
}

function drawChat() {
  $("play-chat-log").replaceChildren(...state.chat.map(m => el("div", { class: "msg " + m.role },
    el("div", { class: "muted small" }, m.role === "user" ? "you" : m.label), el("pre", {}, m.content))));
}

function setMode() {
  const chat = $("play-mode").value === "chat";
  $("play-chat-log").classList.toggle("hidden", !chat);
  $("play-answers").classList.toggle("hidden", chat);
  $("play-clear").classList.toggle("hidden", !chat);
  $("play-send").textContent = chat ? "Send" : "Answer";
}

async function refreshExport() {
  const path = $("export-run").value, box = $("export-status");
  if (!path) { box.replaceChildren(el("div", { class: "muted" }, "no finished runs yet")); return; }
  let s;
  try { s = await api("/api/export?path=" + encodeURIComponent(path)); } catch (e) { return; }
  const titles = Object.assign({ survival: "share of the gain kept" }, state.info.exports.kinds);
  const table = el("table");
  for (const [kind, item] of Object.entries(s)) {
    let detail = item.output ? el("span", {}, item.output) : "";
    if (item.result) detail = survivalTable(item.result);
    else if (item.log && item.state === "failed") detail = el("pre", { class: "error" }, item.log);
    else if (item.log && item.state === "done") detail = el("pre", {}, item.log.split("\n").slice(-3).join("\n"));
    table.append(el("tr", {}, el("td", {}, titles[kind] || kind), el("td", {}, el("span", { class: "badge " + (item.state === "done" ? "finished" : item.state) }, item.state)), el("td", {}, detail)));
  }
  box.replaceChildren(table);
}

function survivalTable(result) {
  const t = el("table");
  for (const [name, acc] of Object.entries(result.accuracy)) {
    if (name.includes("error")) continue;
    const kept = result.gain_kept[name];
    t.append(el("tr", {}, el("td", {}, name), el("td", {}, (100 * acc).toFixed(1) + "%"),
      el("td", { class: "muted" }, !(name in result.gain_kept) ? "" : typeof kept === "number" ? `keeps ${(100 * kept).toFixed(0)}% of the gain` : "no gain to measure")));
  }
  return el("div", {}, t, el("div", { class: "muted small" }, `exact match on ${result.n} eval rows`));
}

async function startExport(kind) {
  $("export-error").textContent = "";
  try { await api("/api/export", { path: $("export-run").value, kind }); } catch (e) { $("export-error").textContent = e.message; }
  refreshExport();
}

// ------------------------------------------------------------------ start
async function init() {
  state.info = await api("/api/info");
  $("allowed").textContent = "folders: " + state.info.allowed.join(", ");
  for (const m of state.info.models) $("model-select").append(el("option", { value: m }, m));
  for (const f of state.info.data_files) $("data-select").append(el("option", { value: f }, f));
  fillDefaults(state.info.defaults);
  $("run-name").value = defaultName();
  const gguf = $("export-gguf");
  gguf.disabled = !state.info.exports.gguf;
  gguf.title = state.info.exports.gguf ? "" : "GGUF export is not part of this slimtune version yet";
  gguf.textContent = state.info.exports.gguf ? "GGUF (f16)" : "GGUF (not available yet)";

  for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => showTab(tab.dataset.tab);
  for (const input of document.querySelectorAll("#settings [data-key], #model-select, #model-path")) input.addEventListener("input", schedulePlan);
  $("data-select").onchange = () => { $("data-path").value = ""; showPreview(); };
  $("data-path").onchange = showPreview;
  $("data-upload").onchange = e => e.target.files[0] && upload(e.target.files[0]).catch(err => { $("preview").textContent = err.message; });
  $("start").onclick = startRun;
  $("run-stop").onclick = () => runAction("stop");
  $("run-resume").onclick = () => runAction("resume");
  $("play-send").onclick = playSend;
  $("play-clear").onclick = () => { state.chat = []; drawChat(); };
  $("play-mode").onchange = setMode;
  $("export-run").onchange = refreshExport;
  for (const b of $("export-buttons").querySelectorAll("button")) b.onclick = () => startExport(b.dataset.kind);
  setMode();
  updatePlan();

  setInterval(() => {
    const tab = document.querySelector(".tab.active").dataset.tab;
    if (tab === "runs") { refreshRun(); refreshRuns(); }
    if (tab === "export") refreshExport();
  }, 1000);
}

init().catch(e => { document.body.prepend(el("div", { class: "error" }, "cannot reach slimtune ui: " + e.message)); });
