// xllm status page: polls /status and /metrics, keeps a few minutes of samples in memory and
// draws tables and SVG sparklines. No library, no external URL, no build step.
// Every string from the server reaches the DOM through textContent or setAttribute, never as
// markup: instance ids and reasons come from the bus and are not trusted.
"use strict";

const POLL_MS = 1500;
const HISTORY_MS = 5 * 60 * 1000;  // what the sparklines show
const WINDOW_MS = 60 * 1000;       // what the "1 min" figures average over
const KEY_STORE = "xllm.apiKey";

const samples = [];        // {t, gen, finished, ttftSum, ttftCount, tpotSum, tpotCount}
const perInstance = new Map();  // id -> [{t, kvUse, running}]
let polls = 0;

// ---- API key: ?key= is kept in this tab's sessionStorage and removed from the address bar.
(function takeKeyFromUrl() {
  const params = new URLSearchParams(window.location.search);
  const key = params.get("key");
  if (key) {
    sessionStorage.setItem(KEY_STORE, key);
    params.delete("key");
    const rest = params.toString();
    history.replaceState(null, "", window.location.pathname + (rest ? "?" + rest : ""));
  }
})();

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

// ---- Prometheus text format: just enough for the series this page reads.
function parseLabels(text) {
  const labels = {};
  const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  let m;
  while ((m = re.exec(text)) !== null) {
    labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
  }
  return labels;
}

function parsePrometheus(text) {
  const series = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    series.push({ name: m[1], labels: m[2] ? parseLabels(m[2]) : {}, value: Number(m[3]) });
  }
  return series;
}

function metricSum(series, name) {
  let total = 0;
  for (const s of series) if (s.name === name && Number.isFinite(s.value)) total += s.value;
  return total;
}

// ---- small DOM helpers (text only)
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function setText(id, text) {
  document.getElementById(id).textContent = String(text);
}

function fmt(value, digits) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value.toFixed(digits === undefined ? 1 : digits);
}

function fmtMs(seconds) {
  return seconds === null || !Number.isFinite(seconds) ? "–" : fmt(seconds * 1000, 0) + " ms";
}

function fmtBytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

// ---- sparklines: an inline SVG polyline per run of known values
const SVG_NS = "http://www.w3.org/2000/svg";

function sparkline(points, width, height) {
  // points: [{t, v}] with v null where unknown (drawn as a gap)
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  const known = points.filter((p) => p.v !== null && Number.isFinite(p.v));
  if (known.length === 0) return svg;
  // The x axis spans what was sampled, up to HISTORY_MS: a fresh page draws across its width.
  const now = points[points.length - 1].t;
  const t0 = Math.max(now - HISTORY_MS, points[0].t);
  const span = Math.max(now - t0, 1);
  const vmax = Math.max(...known.map((p) => p.v), 1e-9);
  let run = [];
  const flush = () => {
    if (run.length) {
      const line = document.createElementNS(SVG_NS, "polyline");
      line.setAttribute("points", (run.length === 1 ? [run[0], run[0]] : run).join(" "));
      svg.appendChild(line);
    }
    run = [];
  };
  for (const p of points) {
    if (p.v === null || !Number.isFinite(p.v)) { flush(); continue; }
    const x = Math.max(0, ((p.t - t0) / span) * (width - 2) + 1);
    const y = height - 1 - (p.v / vmax) * (height - 3);
    run.push(x.toFixed(1) + "," + y.toFixed(1));
  }
  flush();
  return svg;
}

function drawSpark(id, points) {
  const holder = document.getElementById(id);
  holder.replaceChildren(sparkline(points, 160, 32));
}

// ---- derived figures from the samples
function rate(a, b, key) {
  const dt = (b.t - a.t) / 1000;
  const d = b[key] - a[key];
  return dt > 0 && d >= 0 ? d / dt : null;  // d < 0: the gateway restarted
}

function meanOf(a, b, sumKey, countKey) {
  const dc = b[countKey] - a[countKey];
  const ds = b[sumKey] - a[sumKey];
  return dc > 0 && ds >= 0 ? ds / dc : null;
}

function windowStart(now) {
  for (const s of samples) if (s.t >= now - WINDOW_MS) return s;
  return samples[0];
}

function series(fn) {
  const out = [];
  for (let i = 1; i < samples.length; i++) out.push({ t: samples[i].t, v: fn(samples[i - 1], samples[i]) });
  return out;
}

// ---- rendering
function renderHeader(status) {
  const gw = status.gateway || {};
  setText("model", gw.model || "");
  const health = document.getElementById("health");
  const ok = status.ready === true;
  health.textContent = ok ? "ready" : status.scheduler_reachable ? "no worker ready" : "scheduler unreachable";
  health.className = "pill " + (ok ? "ok" : "bad");
  setText("in-flight", (num(gw.in_flight) ?? "–") + " / " + (num(gw.max_in_flight) ?? "–"));
  const age = num(status.status_age_s);
  setText("updated", "gateway " + (gw.id || "?") + " · scheduler status " +
          (age === null ? "never" : fmt(age, 1) + " s old") + " · updated " + new Date().toLocaleTimeString());
}

function renderCards() {
  const last = samples[samples.length - 1];
  setText("requests-total", fmt(last.finished, 0));
  const first = windowStart(last.t);
  const sparkPoints = (fn) => series(fn);
  if (first !== last) {
    setText("tok-s", fmt(rate(first, last, "gen"), 1));
    setText("req-s", fmt(rate(first, last, "finished"), 2));
    setText("ttft", fmtMs(meanOf(first, last, "ttftSum", "ttftCount")));
    setText("tpot", fmtMs(meanOf(first, last, "tpotSum", "tpotCount")));
  }
  // Since the gateway started: something to read before the page has a minute of samples.
  setText("ttft-all", fmtMs(last.ttftCount > 0 ? last.ttftSum / last.ttftCount : null));
  setText("tpot-all", fmtMs(last.tpotCount > 0 ? last.tpotSum / last.tpotCount : null));
  setText("gen-all", fmt(last.gen, 0));
  drawSpark("spark-tok-s", sparkPoints((a, b) => rate(a, b, "gen")));
  drawSpark("spark-req-s", sparkPoints((a, b) => rate(a, b, "finished")));
  drawSpark("spark-ttft", sparkPoints((a, b) => meanOf(a, b, "ttftSum", "ttftCount")));
  drawSpark("spark-tpot", sparkPoints((a, b) => meanOf(a, b, "tpotSum", "tpotCount")));
}

function renderPools(status, instances) {
  const sched = status.scheduler || {};
  const workers = sched.workers || {};
  const byRole = workers.by_role || sched.pools || {};
  const roles = new Set(Object.keys(byRole));
  for (const inst of instances) if (inst.role) roles.add(String(inst.role));
  const body = document.querySelector("#pools tbody");
  const rows = [];
  for (const role of [...roles].sort()) {
    const members = instances.filter((i) => i.role === role);
    const tr = el("tr");
    tr.append(el("td", role), el("td", num(byRole[role]) ?? members.length),
              el("td", members.filter((i) => i.ready).length));
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const parts = [];
  if (sched.pd_policy) parts.push("P/D policy: " + sched.pd_policy);
  if (num(workers.up) !== null) parts.push("workers up " + workers.up + " / " + (workers.expected ?? "?"));
  if (num(sched.flips_total) !== null) parts.push("flips " + sched.flips_total);
  if (num(sched.requests) !== null) parts.push("requests at the scheduler " + sched.requests);
  const predictor = (sched.policy || {}).ttft_predictor;
  if (predictor && num(predictor.mdape_pct) !== null) parts.push("TTFT predictor MdAPE " + fmt(predictor.mdape_pct, 1) + " %");
  setText("scheduler-line", parts.join(" · "));
}

function kvCell(used, total) {
  const td = el("td", (used ?? "–") + " / " + (total ?? "–"));
  if (used !== null && total) {
    const bar = el("span", null, "bar");
    const fill = el("span");
    fill.style.width = Math.min(100, (100 * used) / total).toFixed(1) + "%";
    bar.appendChild(fill);
    td.appendChild(bar);
  }
  return td;
}

function renderInstances(instances, now) {
  const body = document.querySelector("#instances tbody");
  const rows = [];
  for (const inst of instances) {
    const id = String(inst.id ?? inst.instance_id ?? "?");
    const stats = inst.stats && typeof inst.stats === "object" ? inst.stats : {};
    const total = num(inst.total_pages);
    const used = num(inst.used_pages) ?? (total !== null && num(inst.free_pages) !== null ? total - inst.free_pages : null);
    let history = perInstance.get(id);
    if (!history) perInstance.set(id, (history = []));
    history.push({ t: now, kvUse: total ? used / total : null, running: num(inst.running) });
    while (history.length && history[0].t < now - HISTORY_MS) history.shift();

    const tr = el("tr");
    tr.setAttribute("data-instance", id);
    const role = String(inst.role ?? "?") + (inst.pending_role ? " → " + inst.pending_role : "");
    const hit = num(inst.prefix_hit_rate);
    const hb = num(inst.last_heartbeat_age);
    const spark = el("td", null, "spark");
    spark.appendChild(sparkline(history.map((h) => ({ t: h.t, v: h.kvUse })), 120, 24));
    const tiers = stats.prefix_hit_tokens && typeof stats.prefix_hit_tokens === "object" ? stats.prefix_hit_tokens : null;
    const hitCell = el("td", hit === null ? "–" : fmt(100 * hit, 1) + " %");
    if (tiers) hitCell.title = "hit tokens hbm " + tiers.hbm + ", dram " + tiers.dram + ", ssd " + tiers.ssd;
    tr.append(
      el("td", id), el("td", role), el("td", (inst.state ?? "?") + (inst.ready ? "" : " (not ready)")),
      el("td", num(inst.waiting) ?? "–"), el("td", num(inst.running) ?? "–"),
      el("td", num(inst.queued_prefill_tokens) ?? "–"), kvCell(used, total), spark, hitCell,
      el("td", num(stats.flips_total) ?? 0), el("td", num(stats.requests_total) ?? num(inst.assigned_total) ?? "–"),
      el("td", hb === null ? "–" : fmt(hb, 1) + " s"),
    );
    rows.push(tr);
  }
  for (const id of perInstance.keys()) {
    if (!instances.some((i) => String(i.id ?? i.instance_id ?? "?") === id)) perInstance.delete(id);
  }
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", "no instance registered");
    td.colSpan = 12;
    tr.appendChild(td);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function renderKvstore(status) {
  const store = (status.scheduler || {}).kvstore;
  const section = document.getElementById("kvstore-section");
  if (!store || typeof store !== "object" || !Object.keys(store).length) { section.hidden = true; return; }
  section.hidden = false;
  const rows = [];
  for (const tier of ["dram", "ssd"]) {
    const tr = el("tr");
    const budget = num(store[tier + "_budget_bytes"]);
    tr.append(el("td", tier.toUpperCase()), el("td", num(store[tier + "_blocks"]) ?? "–"),
              el("td", fmtBytes(num(store[tier + "_bytes"]) ?? NaN) + (budget ? " / " + fmtBytes(budget) : "")));
    rows.push(tr);
  }
  document.querySelector("#kvstore tbody").replaceChildren(...rows);
}

function renderFlips(status) {
  const recent = (status.scheduler || {}).recent_flips;
  const items = [];
  if (Array.isArray(recent)) {
    for (const f of recent.slice().reverse()) {
      if (!f || typeof f !== "object") continue;
      const at = num(f.at) ? new Date(f.at * 1000).toLocaleTimeString() + " " : "";
      items.push(el("li", at + (f.instance ?? "?") + ": " + (f.from ?? "?") + " → " + (f.to ?? "?") +
                    (f.reason ? " (" + f.reason + ")" : "")));
    }
  }
  if (!items.length) items.push(el("li", "none yet", "muted"));
  document.getElementById("flips").replaceChildren(...items);
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

// ---- polling
async function poll() {
  let status, metricsText;
  try {
    const [statusResp, metricsResp] = await Promise.all([
      fetch("/status", { headers: authHeaders(), cache: "no-store" }),
      fetch("/metrics", { cache: "no-store" }),
    ]);
    if (statusResp.status === 401) {
      document.getElementById("key-form").hidden = false;
      showError("/status needs the API key: open this page with ?key=… or enter it below");
      return;
    }
    if (!statusResp.ok) throw new Error("/status answered HTTP " + statusResp.status);
    if (!metricsResp.ok) throw new Error("/metrics answered HTTP " + metricsResp.status);
    status = await statusResp.json();
    metricsText = await metricsResp.text();
  } catch (err) {
    showError("cannot reach the gateway: " + (err && err.message ? err.message : err));
    document.getElementById("health").className = "pill bad";
    document.getElementById("health").textContent = "unreachable";
    return;
  }
  showError("");
  document.getElementById("key-form").hidden = true;
  const now = Date.now();
  const m = parsePrometheus(metricsText);
  samples.push({
    t: now,
    gen: metricSum(m, "xllm_generation_tokens_total"),
    finished: metricSum(m, "xllm_requests_finished_total"),
    ttftSum: metricSum(m, "xllm_time_to_first_token_seconds_sum"),
    ttftCount: metricSum(m, "xllm_time_to_first_token_seconds_count"),
    tpotSum: metricSum(m, "xllm_time_per_output_token_seconds_sum"),
    tpotCount: metricSum(m, "xllm_time_per_output_token_seconds_count"),
  });
  while (samples.length > 2 && samples[0].t < now - HISTORY_MS) samples.shift();
  const instances = Array.isArray(status.instances) ? status.instances.filter((i) => i && typeof i === "object") : [];
  renderHeader(status);
  renderCards();
  renderPools(status, instances);
  renderInstances(instances, now);
  renderKvstore(status);
  renderFlips(status);
  polls += 1;
  document.body.setAttribute("data-polls", String(polls));
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = document.getElementById("key-input").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  poll();
});

// One poll at a time: a slow gateway must not pile up requests.
async function loop() {
  await poll();
  setTimeout(loop, POLL_MS);
}
loop();
