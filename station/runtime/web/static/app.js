// The station's page: plain JavaScript, no build step, nothing fetched from outside the station.
// Every poll waits for its previous answer before the next, so a slow station or network never piles
// requests up; the server makes each picture at most a few times a second whatever is asked.
"use strict";

const $ = (id) => document.getElementById(id);
const ROLES = ["viewer", "operator", "integrator"];
let me = null;        // {user, role, open, csrf, station}
let tab = "live";
let frozen = false;
let strip = [];       // the results shown, newest first
let selected = null;  // the selected result's id

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") {
    options.headers["X-CSRF-Token"] = me ? me.csrf : "";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body || {});
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = { error: `answer ${response.status} is not JSON` }; }
  if (response.status === 401 && data && data.login && path !== "/api/login") showLogin();
  return { status: response.status, data };
}

function say(text, ok) {
  const box = $("message");
  box.textContent = text;
  box.className = ok ? "ok" : "error";
  box.hidden = false;
}

function may(role) { return me && ROLES.indexOf(me.role) >= ROLES.indexOf(role); }

function text(value, digits) {
  if (value === null || value === undefined) return "—";
  return typeof value === "number" && digits !== undefined ? value.toFixed(digits) : String(value);
}

// -- log in / out

function showLogin() {
  me = null;
  $("login").hidden = false;
  $("tabs").hidden = $("pages").hidden = true;
  $("logout").hidden = true;
  $("operations").hidden = $("badges").hidden = true;
  $("user").textContent = "";
}

async function boot() {
  const answer = await api("GET", "/api/me");
  if (answer.data && answer.data.station) $("station").textContent = answer.data.station;
  if (answer.status !== 200) return showLogin();
  started(answer.data);
}

function started(who) {
  me = who;
  $("login").hidden = true;
  $("tabs").hidden = $("pages").hidden = false;
  $("station").textContent = who.station;
  $("user").textContent = who.open ? "open page (this PC only)" : `${who.user} (${who.role})`;
  $("logout").hidden = who.open;
  $("operations").hidden = $("badges").hidden = false;
  for (const id of ["pause", "resume", "reload", "change-over", "reset-stats"]) {
    $(id).disabled = !may("operator");
    $(id).title = may("operator") ? "" : "an operator or integrator may";
  }
  loadProducts();
  if (!started.polling) {
    started.polling = true;
    poll(pollState, 1000);
    poll(pollLive, 250);
    poll(pollStrip, 1000);
    poll(pollStats, 2000);
  }
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const answer = await api("POST", "/api/login", { name: $("login-name").value, password: $("login-password").value });
  $("login-password").value = "";
  if (answer.status === 200) { $("login-error").hidden = true; started(answer.data); return; }
  $("login-error").textContent = answer.data.error;
  $("login-error").hidden = false;
});

$("logout").addEventListener("click", async () => { await api("POST", "/api/logout"); showLogin(); });

// -- polling

function poll(step, interval) {
  const again = async () => {
    try { if (me) await step(); } catch (e) { /* the station is away: the next poll tries again */ }
    setTimeout(again, interval);
  };
  again();
}

async function pollState() {
  const answer = await api("GET", "/api/state");
  if (answer.status !== 200) return;
  const state = answer.data;
  $("product").textContent = `product ${state.product} · model ${state.model} · reference v${state.reference}`;
  badge("run-state", state.paused ? "PAUSED" : "running", state.paused ? "warn" : "good");
  badge("camera-state", `camera ${state.camera}`, state.camera === "ok" ? "good" : "bad");
  const problems = $("problems");
  problems.hidden = !state.problems.length;
  problems.textContent = state.problems.join(" · ");
}

function badge(id, label, kind) { const el = $(id); el.textContent = label; el.className = `badge ${kind}`; }

// -- live view: the next picture only once the last one arrived

let liveNumber = null;
function loadImage(img, url) {
  return new Promise((resolve) => { img.onload = img.onerror = () => resolve(); img.src = url; });
}

async function pollLive() {
  if (tab !== "live") return;
  const answer = await api("GET", "/api/live");
  if (answer.status !== 200 || answer.data.number === null) return;
  const live = answer.data;
  if (live.number === liveNumber) return;
  liveNumber = live.number;
  await Promise.all([loadImage($("live-frame"), `/api/live/frame.jpg?n=${live.number}`),
                     loadImage($("live-crop"), `/api/live/crop.png?n=${live.number}`)]);
  $("live-waiting").hidden = true;
  const v = live.verdict;
  $("live-verdict").textContent = v.verdict === "no_verdict" ? "no verdict" : v.verdict;
  $("live-verdict").className = `verdict ${v.verdict}`;
  $("live-frame").dataset.number = live.number;
  $("live-score").textContent = text(v.score, 4);
  $("live-threshold").textContent = text(v.threshold, 4);
  $("live-latency").textContent = v.latency_ms === null ? "—" : `${v.latency_ms.toFixed(1)} ms`;
  $("live-part").textContent = v.part_id || v.source || "—";
  $("live-seq").textContent = text(v.seq);
}

// -- filmstrip

async function pollStrip() {
  if (tab !== "filmstrip" || frozen) return;
  // The whole strip once, then only what is newer than its newest: a few results a second, not 300.
  const query = [$("ng-only").checked ? "ng=1" : "", strip.length ? `after=${strip[0].seq}` : ""].filter(Boolean);
  const ngOnly = $("ng-only").checked;
  const answer = await api("GET", `/api/results${query.length ? "?" + query.join("&") : ""}`);
  // Frozen, or the filter changed, while the answer was on its way: it is not shown.
  if (answer.status !== 200 || frozen || ngOnly !== $("ng-only").checked) return;
  // Two polls may overlap (the filter's change starts one): only what is newer than the strip is added.
  const newer = answer.data.results.filter((r) => !strip.length || r.seq > strip[0].seq);
  if (!newer.length) return;
  strip = newer.concat(strip).slice(0, answer.data.kept);
  renderStrip();
}

function renderStrip() {
  const box = $("strip");
  const known = new Map([...box.children].map((card) => [card.dataset.id, card]));
  const cards = strip.map((r) => known.get(r.id) || card(r));
  box.replaceChildren(...cards);
  $("strip-count").textContent = `${strip.length} results${frozen ? " (frozen)" : ""}`;
  for (const c of cards) c.classList.toggle("selected", c.dataset.id === selected);
  stepButtons();
}

function card(r) {
  const el = document.createElement("div");
  el.className = `card ${r.verdict}`;
  el.dataset.id = r.id;
  el.dataset.verdict = r.verdict;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  if (r.thumbnail) {
    const img = document.createElement("img");
    img.alt = `crop of part ${r.seq}`;
    img.loading = "lazy";
    img.onerror = () => {  // not written yet (the crop writer is a thread) or not kept: one retry
      if (img.dataset.retried) { thumb.textContent = "no crop"; return; }
      img.dataset.retried = "1";
      setTimeout(() => { img.src = `${r.thumbnail}?retry=1`; }, 1500);
    };
    img.src = r.thumbnail;
    thumb.append(img);
  } else {
    thumb.textContent = r.reason || "no crop";
  }
  const line = (label, value) => { const p = document.createElement("div"); p.textContent = `${label} ${value}`; return p; };
  const verdict = document.createElement("b");
  verdict.className = r.verdict;
  verdict.textContent = r.verdict === "no_verdict" ? "no verdict" : r.verdict;
  el.append(thumb, verdict, line("#", r.seq), line("score", `${text(r.score, 3)} / ${text(r.threshold, 3)}`),
            line("", r.latency_ms === null ? "" : `${r.latency_ms.toFixed(1)} ms`), line("", r.part_id || r.source || ""));
  el.addEventListener("click", () => select(r.id));
  return el;
}

async function select(id) {
  selected = id;
  for (const c of $("strip").children) c.classList.toggle("selected", c.dataset.id === id);
  stepButtons();
  const answer = await api("GET", `/api/results/${encodeURIComponent(id)}`);
  $("detail").hidden = false;
  $("detail-json").textContent = JSON.stringify(answer.data, null, 2);
  const img = $("detail-crop");
  img.hidden = false;
  $("detail-nocrop").hidden = true;
  img.onerror = () => { img.hidden = true; $("detail-nocrop").hidden = false; };
  img.src = `/api/crops/${encodeURIComponent(id)}.png`;
}

function stepButtons() {
  const at = strip.findIndex((r) => r.id === selected);
  $("step-newer").disabled = !frozen || at <= 0;
  $("step-older").disabled = !frozen || at < 0 || at >= strip.length - 1;
  if (frozen && at < 0 && strip.length) $("step-older").disabled = false;
}

function step(by) {
  const at = strip.findIndex((r) => r.id === selected);
  const next = Math.max(0, Math.min(strip.length - 1, at < 0 ? 0 : at + by));
  if (strip[next]) { select(strip[next].id); $("strip").children[next].scrollIntoView({ block: "nearest", inline: "nearest" }); }
}

$("freeze").addEventListener("click", () => {
  frozen = !frozen;
  $("freeze").textContent = frozen ? "Unfreeze" : "Freeze";
  $("freeze").classList.toggle("on", frozen);
  renderStrip();
});
$("step-newer").addEventListener("click", () => step(-1));
$("step-older").addEventListener("click", () => step(1));
$("ng-only").addEventListener("change", () => { strip = []; if (!frozen) pollStrip(); });

// -- statistics

const ROWS = [["parts", "parts"], ["OK", "ok"], ["NG", "ng"], ["no verdict", "no_verdicts"], ["yield", "yield"],
              ["processing min", "min"], ["processing avg", "avg"], ["processing max", "max"], ["dropped frames", "dropped_frames"]];

function figure(span, key) {
  if (["min", "avg", "max"].includes(key)) {
    const ms = span.processing_ms[key];
    return ms === null ? "—" : `${ms.toFixed(2)} ms`;
  }
  if (key === "yield") return span.yield === null ? "—" : `${(100 * span.yield).toFixed(2)} %`;
  return text(span[key]);
}

async function pollStats() {  // on every tab: the header's broker badge comes from it
  const answer = await api("GET", "/api/stats");
  if (answer.status !== 200) return;
  const s = answer.data;
  const body = $("stats-table").tBodies[0];
  body.replaceChildren(...ROWS.map(([label, key]) => {
    const row = document.createElement("tr");
    row.dataset.key = key;
    for (const value of [label, figure(s.since_start, key), figure(s.since_reset, key)]) {
      const cell = document.createElement("td"); cell.textContent = value; row.append(cell);
    }
    return row;
  }));
  $("reset-since").textContent = `since reset: ${new Date(s.since_reset.since * 1000).toLocaleString()}`;
  const now = [["outbox depth", text(s.outbox_depth)], ["broker", s.broker], ["camera", s.camera],
               ["paused", s.paused ? "yes" : "no"], ["problems", s.problems.length ? s.problems.join("; ") : "none"],
               ["started", new Date(s.started * 1000).toLocaleString()], ["up", `${Math.round(s.uptime_s)} s`]];
  $("stats-now").replaceChildren(...now.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v; dd.dataset.key = k;
    return [dt, dd];
  }));
  badge("broker-state", `broker ${s.broker}`, s.broker === "connected" ? "good" : "bad");
}

$("reset-stats").addEventListener("click", async () => {
  const answer = await api("POST", "/api/stats/reset");
  if (answer.status === 200) { say("statistics reset", true); pollStats(); } else say(answer.data.error, false);
});

// -- operations: answered as the MQTT command is

async function loadProducts() {  // a changeover's choices: the products station.yaml configures
  const answer = await api("GET", "/api/products");
  if (answer.status !== 200) return;
  const choice = $("product-choice");
  choice.replaceChildren(...answer.data.products.map((name) => {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    option.selected = name === answer.data.current;
    return option;
  }));
  $("changeover").hidden = !answer.data.products.length;
}

for (const id of ["pause", "resume", "reload", "change-over"]) {
  $(id).addEventListener("click", async () => {
    $(id).disabled = true;
    const command = { cmd: $(id).dataset.cmd };
    if (id === "change-over") command.product = $("product-choice").value;
    try {
      const answer = await api("POST", "/api/command", command);
      const result = answer.data;
      const label = id === "change-over" ? `changeover to ${command.product}` : id;
      if (result.ok) say(`${label}: done`, true);
      else say(`${label}: ${result.error}`, false);
      pollState();
    } finally { $(id).disabled = !may("operator"); }
  });
}

// -- tabs

for (const button of document.querySelectorAll("nav button")) {
  button.addEventListener("click", () => {
    tab = button.dataset.tab;
    for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b === button);
    for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== tab;
    if (tab === "stats") pollStats();
    if (tab === "filmstrip") pollStrip();
  });
}

boot();
