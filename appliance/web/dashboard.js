// rackboot's web dashboard: reads the REST API (/api/v1) and its live stream (/api/v1/live, server-sent events)
// with the user's API token. The token lives in this tab's sessionStorage and goes out only in an Authorization
// header (never in a URL, so never in an access log). Everything the API returns is put in the page as text
// (textContent), never as HTML; the timeline SVG is the appliance's own (appliance/timeline.py, escaped there).
"use strict";

const TOKEN_KEY = "rackboot.token";
const STATES = ["pending", "SetDeploymentEnv", "BroadcastEnv", "BootNewEnv", "Reboot", "done", "failed"];
const STEPS = ["SetDeploymentEnv", "BroadcastEnv", "BootNewEnv", "Reboot"];
const LATEST = 5;  // finished deployments whose node results the grid shows after a (re)load

const $ = (id) => document.getElementById(id);
const state = { token: null, me: null, nodes: new Map(), deployments: new Map(), selected: null, stream: null,
                reload: null, detailTimer: null, detailSeq: 0 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function when(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : ""; }
function duration(a, b) {
  if (!a) return "";
  const s = Math.max(0, ((b || Date.now() / 1000) - a));
  return s < 120 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}
function natural(a, b) { return a.localeCompare(b, undefined, { numeric: true }); }

// -- the API ------------------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, accept) {
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${state.token}`, Accept: accept || "application/json" },
                                   cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
  if (resp.status === 401) throw new Unauthorized("the token was refused");
  if (!resp.ok) {
    let message = `${resp.status}`;
    try { message = (await resp.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return accept && accept !== "application/json" ? resp.text() : resp.json();
}

// -- login --------------------------------------------------------------------------------------------

async function login(token) {
  state.token = token;
  try {
    state.me = await api("/api/v1/whoami");
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(e instanceof Unauthorized ? "This token is not valid." : `Cannot reach the appliance: ${e.message}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("conn").hidden = false;
  $("who").textContent = `${state.me.name}${state.me.admin ? " (admin)" : ""}`;
  follow();
}

function showLogin(message) {
  if (state.stream) state.stream.abort();
  state.stream = null;
  state.token = null;
  state.me = null;
  state.nodes.clear();
  state.deployments.clear();
  state.selected = null;
  // nothing of the last user's stays in the page
  for (const id of ["racks", "steps", "timeline", "legend"]) $(id).replaceChildren();
  for (const id of ["deployments", "detail-nodes", "environments"]) $(id).tBodies[0].replaceChildren();
  $("detail").hidden = true;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("conn").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").value = "";
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("");
}

// -- the live stream ----------------------------------------------------------------------------------

function connected(on) {
  const c = $("conn");
  c.textContent = on ? "live" : "reconnecting";
  c.className = `conn ${on ? "on" : "off"}`;
}

// EventSource cannot send an Authorization header, so the stream is read with fetch and parsed here.
async function follow() {
  let delay = 1000;
  while (state.token) {
    const abort = new AbortController();
    state.stream = abort;
    try {
      const resp = await fetch("/api/v1/live", { headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" },
                                                 cache: "no-store", credentials: "omit", signal: abort.signal });
      if (resp.status === 401) { logout(); $("login-error").textContent = "The session ended: log in again."; return; }
      if (!resp.ok || !resp.body) throw new Error(`${resp.status}`);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
        delay = 1000;
      }
    } catch (e) {
      if (abort.signal.aborted) return;
    }
    if (!state.token) return;
    connected(false);
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function dispatch(block) {
  let name = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  const payload = JSON.parse(data);
  if (name === "hello") { connected(true); snapshot(); }
  else if (name === "resync") scheduleReload();  // records were dropped: reload, at most every 300 ms
  else if (name === "node") onNodeRecord(payload);
  else if (name === "deployment") onDeploymentEntry(payload);
}

// -- the snapshot (REST) ------------------------------------------------------------------------------

async function snapshot() {
  try {
    const [nodes, deps, envs] = await Promise.all([api("/api/v1/nodes?events=1"), api("/api/v1/deployments?limit=20"),
                                                   api("/api/v1/environments")]);
    state.nodes.clear();
    for (const n of nodes.nodes) {
      state.nodes.set(n.name, { ...n, last: n.events[n.events.length - 1] || null, dep: null });
    }
    state.deployments.clear();
    for (const d of deps.deployments) state.deployments.set(d.id, d);
    // Node states: those of the running deployments, else the result of the node's latest deployment among the
    // last LATEST listed (as the live feed leaves them when a deployment ends); applied oldest first.
    const wanted = deps.deployments.filter((d, i) => d.status === "running" || i < LATEST).reverse();
    const reports = await Promise.all(wanted.map((d) => api(`/api/v1/deployments/${encodeURIComponent(d.id)}`)));
    for (const r of reports) {
      for (const n of r.nodes) setNodeState(n.node, r.id, n.state, n.step, n.reason);
    }
    for (const r of reports.filter((r) => r.status === "running")) {
      for (const n of r.nodes) setNodeState(n.node, r.id, n.state, n.step, n.reason);
    }
    renderNodes();
    renderDeployments();
    renderEnvironments(envs.environments);
    if (!state.selected && deps.deployments.length) state.selected = deps.deployments[0].id;
    if (state.selected) showDetail(state.selected);
  } catch (e) {
    if (e instanceof Unauthorized) { logout(); return; }
    $("node-count").textContent = `(cannot load: ${e.message})`;
  }
}

function setNodeState(name, depId, nodeState, step, reason) {
  const n = state.nodes.get(name);
  if (!n) return;
  n.dep = { id: depId, state: nodeState, step: step || "", reason: reason || "" };
}

// -- live updates -------------------------------------------------------------------------------------

function onNodeRecord({ node, event }) {
  const n = state.nodes.get(node);
  if (!n) { scheduleReload(); return; }  // a node the inventory gained since the snapshot
  n.last = event;
  renderNode(n);
}

function onDeploymentEntry({ id, entry }) {
  const d = state.deployments.get(id);
  if (!d) scheduleReload();  // a deployment started since the snapshot: its row comes with the next one
  if (entry.node && STATES.includes(entry.what)) {
    setNodeState(entry.node, id, entry.what, entry.step, entry.reason);
    const n = state.nodes.get(entry.node);
    if (n) renderNode(n);
  } else if (entry.node && entry.what === "boot") {
    const n = state.nodes.get(entry.node);
    if (n && n.dep) { n.dep.stage = entry.stage; renderNode(n); }
  } else if (entry.what === "finished" && d) {
    d.status = entry.status;
    d.finished = entry.ts;
    renderDeployments();
  }
  if (state.selected === id) scheduleDetail(id);
}

function scheduleReload() {
  if (state.reload) return;
  state.reload = setTimeout(() => { state.reload = null; snapshot(); }, 300);
}

function scheduleDetail(id) {
  if (state.detailTimer) return;
  state.detailTimer = setTimeout(() => { state.detailTimer = null; if (state.selected === id) showDetail(id); }, 500);
}

// -- rendering ----------------------------------------------------------------------------------------

function nodeClass(n) { return n.dep ? `st-${n.dep.state}` : "st-idle"; }

function nodeLabel(n) {
  if (!n.dep) return n.profile.kind === "none" ? "idle" : `profile ${n.profile.kind}`;
  const stage = n.dep.stage && !["done", "failed"].includes(n.dep.state) ? ` · ${n.dep.stage}` : "";
  return `${n.dep.state}${stage}`;
}

function renderNode(n) {
  const cell = document.querySelector(`.node[data-node="${CSS.escape(n.name)}"]`);
  if (!cell) { scheduleReload(); return; }
  cell.className = `node ${nodeClass(n)}`;
  cell.dataset.state = n.dep ? n.dep.state : "idle";
  cell.querySelector(".state").textContent = nodeLabel(n);
  cell.querySelector(".last").textContent = n.last ? `${n.last.kind} ${when(n.last.ts)}` : "no record yet";
  const reason = n.dep && n.dep.reason ? `\n${n.dep.state}: ${n.dep.reason}` : "";
  cell.title = `${n.name} ${n.ip} ${n.mac}\nprofile: ${n.profile.kind}${n.profile.env ? " " + n.profile.env : ""}${reason}`;
  cell.classList.add("changed");
  setTimeout(() => cell.classList.remove("changed"), 800);
}

function renderNodes() {
  const racks = new Map();
  for (const n of [...state.nodes.values()].sort((a, b) => natural(a.name, b.name))) {
    const rack = n.rack || "(no rack)";
    if (!racks.has(rack)) racks.set(rack, []);
    racks.get(rack).push(n);
  }
  const root = $("racks");
  root.replaceChildren();
  for (const rack of [...racks.keys()].sort(natural)) {
    const grid = el("div", { class: "grid" });
    for (const n of racks.get(rack)) {
      const cell = el("div", { class: "node", "data-node": n.name }, el("b", {}, n.name), el("span", { class: "state" }),
                      el("span", { class: "last" }));
      grid.append(cell);
    }
    root.append(el("div", { class: "rack", "data-rack": rack }, el("h3", {}, `rack ${rack} `, el("small", {}, `${racks.get(rack).length} nodes`)), grid));
  }
  for (const n of state.nodes.values()) renderNode(n);
  $("node-count").textContent = `(${state.nodes.size} in ${racks.size} racks)`;
  const legend = $("legend");
  legend.replaceChildren(...["idle", ...STATES].map((s) => el("span", { class: `st-${s}` }, el("i"), s)));
}

function renderDeployments() {
  const body = $("deployments").tBodies[0];
  body.replaceChildren();
  for (const d of state.deployments.values()) {
    const row = el("tr", { "data-id": d.id }, el("td", {}, d.id), el("td", {}, d.user), el("td", {}, d.env),
                   el("td", {}, d.node_count), el("td", { class: `status-${d.status}` }, d.status), el("td", {}, when(d.created)),
                   el("td", {}, duration(d.created, d.finished)));
    if (d.id === state.selected) row.classList.add("selected");
    row.addEventListener("click", () => { state.selected = d.id; renderDeployments(); showDetail(d.id); });
    body.append(row);
  }
  if (!state.deployments.size) body.append(el("tr", {}, el("td", { colspan: "7" }, "no deployment yet")));
}

function renderEnvironments(envs) {
  const body = $("environments").tBodies[0];
  body.replaceChildren();
  for (const e of envs) {
    body.append(el("tr", {}, el("td", {}, e.name), el("td", {}, e.version), el("td", {}, e.owner), el("td", {}, e.visibility),
                   el("td", {}, `${e.image_kind}${e.compression ? "/" + e.compression : ""}`),
                   el("td", {}, e.size ? `${(e.size / 1048576).toFixed(1)} MiB` : ""), el("td", {}, e.boot_kind),
                   el("td", {}, e.description)));
  }
  if (!envs.length) body.append(el("tr", {}, el("td", { colspan: "8" }, "no environment yet (rackboot env add FILE)")));
}

async function showDetail(id) {
  const seq = ++state.detailSeq;  // an older request answered late must not overwrite a newer one's answer
  let report, svg;
  try {
    [report, svg] = await Promise.all([api(`/api/v1/deployments/${encodeURIComponent(id)}`),
                                       api(`/api/v1/deployments/${encodeURIComponent(id)}/timeline`, "image/svg+xml")]);
  } catch (e) {
    if (e instanceof Unauthorized) logout();
    return;
  }
  if (state.selected !== id || seq !== state.detailSeq) return;
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  $("detail-status").textContent = `${report.status} · ${report.env} · ${report.user}`;
  renderSteps(report.nodes);
  const body = $("detail-nodes").tBodies[0];
  body.replaceChildren(...report.nodes.map((n) => el("tr", { class: `st-${n.state}` }, el("td", {}, n.node), el("td", {}, n.state),
    el("td", {}, n.step), el("td", {}, n.impl), el("td", {}, n.boot_stage || ""), el("td", {}, n.reason))));
  // The appliance's own SVG (escaped by appliance/timeline.py): parsed as XML and imported, so its tooltips work;
  // the page's Content-Security-Policy would refuse any script in it all the same.
  const doc = new DOMParser().parseFromString(svg, "image/svg+xml");
  const root = doc.documentElement;
  const holder = $("timeline");
  holder.replaceChildren();
  if (root && root.nodeName === "svg") holder.append(document.importNode(root, true));
  const link = $("timeline-download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
  link.download = `${id}-timeline.svg`;
}

// Per macro-step: the nodes through it out of those that entered it, and those that failed in it. A node in a later
// step (or done) went through the earlier ones; a failed node entered the steps up to the one it failed in.
function renderSteps(nodes) {
  const reboot = nodes.some((n) => n.state === "Reboot" || n.step === "Reboot");
  const where = (n) => STEPS.indexOf(n.state === "done" || n.state === "failed" ? n.step : n.state);
  const furthest = Math.max(-1, ...nodes.map(where));
  const steps = reboot ? ["Reboot"] : STEPS.slice(0, Math.min(furthest + 1, 3));
  const holder = $("steps");
  holder.replaceChildren();
  for (const step of steps) {
    const i = STEPS.indexOf(step);
    const entered = nodes.filter((n) => n.state === "done" || where(n) >= i);
    const through = entered.filter((n) => n.state === "done" || where(n) > i).length;
    const failed = entered.filter((n) => n.state === "failed" && n.step === step).length;
    const bar = el("div", { class: "bar" }, el("i"));
    bar.firstChild.style.width = `${(100 * through) / Math.max(entered.length, 1)}%`;
    bar.firstChild.style.background = `var(--${step})`;
    holder.append(el("div", { class: "step", "data-step": step }, el("span", {}, step), bar,
                     el("span", {}, `${through}/${entered.length}${failed ? ` · ${failed} failed` : ""}`)));
  }
}

// -- start --------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (token) login(token);
  });
  $("logout").addEventListener("click", logout);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) login(saved); else showLogin("");
});
