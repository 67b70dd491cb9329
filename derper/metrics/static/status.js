// The derper status page: draws /status.json, then asks every 2 s only for the chart points
// it does not have yet (?since=). No dependencies but uPlot, served next to this file.
"use strict";

const REFRESH_MS = 2000;
const RECENT_S = 300;
const COLORS = { in: "#4fc3f7", out: "#ffb74d", clients: "#a5d6a7", conns: "#7e8c9a",
                 stun: "#ce93d8", drops: "#f85149", grid: "#263140", axis: "#8b98a5" };

const $ = (id) => document.getElementById(id);
const history = { fine: null, coarse: null };
let windowName = "fine";
let charts = null;

// ---- formatting --------------------------------------------------------------------------------

const int = (n) => Math.round(n).toLocaleString("en-US");

function units(n, base, names, digits) {
  let i = 0;
  while (Math.abs(n) >= base && i < names.length - 1) { n /= base; i++; }
  return (i === 0 ? Math.round(n) : n.toFixed(n < 10 ? digits : digits - 1)) + " " + names[i];
}
const bits = (bytesPerS) => units(bytesPerS * 8, 1000, ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"], 2);
const bitsShort = (b) => units(b, 1000, ["", "k", "M", "G"], 1).trim();
const bytes = (n) => units(n, 1000, ["B", "kB", "MB", "GB", "TB"], 2);
const rate = (n) => (n >= 100 ? int(n) : n >= 10 ? n.toFixed(1) : n.toFixed(2).replace(/\.?0+$/, "") || "0");

function duration(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s % 60} s`;
  return `${s} s`;
}

function ago(t, now) {
  if (t == null) return "never";
  return duration(now - t) + " ago";
}

const when = (t) => new Date(t * 1000).toLocaleString("en-GB", { hour12: false });

// ---- DOM helpers (text only: nothing from the server becomes markup) --------------------------

function text(id, value) { $(id).textContent = value; }

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement(c.head ? "th" : "td");
    td.textContent = c.text;
    if (c.cls) td.className = c.cls;
    if (c.title) td.title = c.title;
    tr.appendChild(td);
  }
  return tr;
}

function fill(id, rows) { $(id).replaceChildren(...rows.map(row)); }

function kv(id, pairs) {
  fill(id, pairs.map(([k, v, cls]) => [{ text: k, head: true }, { text: v, cls }]));
}

// ---- charts -------------------------------------------------------------------------------------

function chart(el, series, fmt) {
  const opts = {
    width: el.clientWidth || 400, height: 170,
    legend: { live: true },
    cursor: { points: { size: 6 } },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max * 1.1, 1)] } },
    axes: [
      { stroke: COLORS.axis, grid: { stroke: COLORS.grid, width: 1 }, ticks: { show: false } },
      { stroke: COLORS.axis, grid: { stroke: COLORS.grid, width: 1 }, ticks: { show: false },
        size: 50, values: (u, vals) => vals.map(fmt) },
    ],
    series: [{}, ...series.map((s) => ({
      label: s.label, stroke: s.color, width: 1.5, fill: s.fill ? s.color + "26" : undefined,
      points: { show: false }, value: (u, v) => (v == null ? "–" : fmt(v)),
    }))],
  };
  return new uPlot(opts, [[], ...series.map(() => [])], el);
}

function makeCharts() {
  const count = (v) => (Number.isInteger(v) ? int(v) : rate(v));
  return {
    traffic: { u: chart($("chart-traffic"), [
      { label: "in", color: COLORS.in, fill: true }, { label: "out", color: COLORS.out, fill: true },
    ], bitsShort), cols: (h) => [h.bytes_in_per_second.map((v) => v * 8),
                                 h.bytes_out_per_second.map((v) => v * 8)] },
    packets: { u: chart($("chart-packets"), [
      { label: "in", color: COLORS.in }, { label: "out", color: COLORS.out },
    ], count), cols: (h) => [h.packets_in_per_second, h.packets_out_per_second] },
    clients: { u: chart($("chart-clients"), [
      { label: "clients", color: COLORS.clients, fill: true },
      { label: "connections", color: COLORS.conns },
    ], count), cols: (h) => [h.clients, h.connections] },
    stun: { u: chart($("chart-stun"), [
      { label: "STUN", color: COLORS.stun, fill: true }, { label: "drops", color: COLORS.drops },
    ], count), cols: (h) => [h.stun_per_second, h.drops_per_second] },
  };
}

function drawCharts() {
  const h = history[windowName];
  if (!h) return;
  charts = charts || makeCharts();
  for (const c of Object.values(charts)) c.u.setData([h.t, ...c.cols(h)]);
}

new ResizeObserver(() => {
  if (!charts) return;
  for (const c of Object.values(charts)) {
    const w = c.u.root.parentElement.clientWidth;
    if (w && w !== c.u.width) c.u.setSize({ width: w, height: 170 });
  }
}).observe(document.body);

function pickWindow(name) {
  windowName = name;
  $("window-fine").classList.toggle("on", name === "fine");
  $("window-coarse").classList.toggle("on", name === "coarse");
  text("window-name", name === "fine" ? "10 minutes" : "hour");
  drawCharts();
}
$("window-fine").addEventListener("click", () => pickWindow("fine"));
$("window-coarse").addEventListener("click", () => pickWindow("coarse"));

// New points go after the ones we have; the ring's size bounds what we keep.
function merge(name, part) {
  const have = history[name];
  if (!have) { history[name] = part; return; }
  const lastT = have.t.length ? have.t[have.t.length - 1] : -Infinity;
  const from = part.t.findIndex((t) => t > lastT);
  if (from < 0) return;
  for (const key of Object.keys(part)) {
    if (!Array.isArray(part[key])) continue;
    have[key].push(...part[key].slice(from));
    have[key].splice(0, Math.max(0, have[key].length - part.points));
  }
}

// ---- the numbers --------------------------------------------------------------------------------

function render(d) {
  const now = d.generated_at;
  const health = $("health");
  health.textContent = { ok: "healthy", warning: "warning", error: "error" }[d.health.state];
  health.className = "pill pill-" + d.health.state;
  $("notes").replaceChildren(...d.health.notes.map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    if (d.health.state === "error") li.className = "error";
    return li;
  }));
  const s = d.server;
  text("version", "v" + s.version);
  text("server-key", s.server_key.slice(0, 20) + "…");
  text("updated", new Date(now * 1000).toLocaleTimeString("en-GB", { hour12: false }));
  document.title = `derper ${d.health.state === "ok" ? "✓" : "!"} ${d.clients.local} clients`;

  const c = d.clients, t = d.traffic;
  text("clients-local", int(c.local));
  text("connections", int(c.connections));
  text("remote", c.remote ? ` · ${int(c.remote)} via mesh` : "");
  text("connects-per-minute", int(c.connects_per_minute));
  text("disconnects-per-minute", int(c.disconnects_per_minute));
  text("rate-in", bits(t.bytes_in_per_second));
  text("rate-out", bits(t.bytes_out_per_second));
  text("pps-in", int(t.packets_in_per_second));
  text("pps-out", int(t.packets_out_per_second));
  text("stun-rate", d.stun.enabled ? rate(d.stun.per_second) : "off");
  text("stun-total", int(d.stun.requests_total));
  text("uptime", duration(s.uptime_seconds));
  text("started", when(s.started_at));

  text("packets-in-total", int(t.packets_in_total));
  text("packets-out-total", int(t.packets_out_total));
  text("bytes-in-total", int(t.bytes_in_total));
  $("bytes-in-total").title = bytes(t.bytes_in_total);
  text("bytes-out-total", int(t.bytes_out_total));
  $("bytes-out-total").title = bytes(t.bytes_out_total);
  text("connects-total", int(c.connects_total));
  text("disconnects-total", int(c.disconnects_total));

  renderCert(d.certificate, now);
  renderTables(d, now);
}

function renderCert(cert, now) {
  const days = $("cert-days");
  if (!cert) {
    days.textContent = "no TLS";
    days.className = "big";
    text("cert-brief", "plain HTTP (-dev or behind your own TLS)");
    kv("certificate", [["TLS", "off"]]);
    return;
  }
  if (!cert.installed) {
    days.textContent = "none";
    days.className = "big error";
    text("cert-brief", "no certificate yet");
  } else {
    days.textContent = cert.days_left > 730 ? `${Math.floor(cert.days_left / 365)} years`
      : `${Math.floor(cert.days_left)} days`;
    days.className = "big " + (cert.days_left < 0 ? "error"
      : cert.days_left < 14 && !cert.self_signed ? "warning" : "ok");
    text("cert-brief", cert.self_signed ? "self-signed (pinned)" : "by " + commonName(cert.issuer));
  }
  const pairs = [
    ["subject", cert.subject || "–"], ["issuer", cert.issuer || "–"],
    ["expires", cert.not_after ? when(cert.not_after) : "–"],
    ["renewal", cert.renewal === "acme" ? "built-in ACME" : "files in -certdir, reloaded on change"],
  ];
  if (cert.renewal === "acme") {
    pairs.push(["next attempt", cert.next_renewal_at <= now + 1 ? "now"
      : "in " + duration(cert.next_renewal_at - now)]);
    pairs.push(["last error", cert.last_error ? `${cert.last_error} (${ago(cert.last_error_at, now)})`
      : "none", cert.last_error ? "recent" : ""]);
  }
  kv("certificate", pairs);
}

// "CN=R11,O=Let's Encrypt,C=US" → "R11"; without a CN, the organisation.
function commonName(dn) {
  const m = /(?:^|,)CN=((?:\\.|[^,])+)/.exec(dn) || /(?:^|,)O=((?:\\.|[^,])+)/.exec(dn);
  return m ? m[1].replace(/\\(.)/g, "$1") : dn;
}

function lastCell(t, now) {
  return { text: ago(t, now), cls: t != null && now - t < RECENT_S ? "recent" : t == null ? "zero" : "" };
}

function renderTables(d, now) {
  const showAddrs = d.heaviest_senders.some((x) => "addr" in x);
  $("senders-addr-head").hidden = !showAddrs;
  const senders = d.heaviest_senders.map((x) => [
    { text: x.key, cls: "key" }, ...(showAddrs ? [{ text: x.addr || "–", cls: "key" }] : []),
    { text: bits(x.bytes_per_second), cls: "num" }]);
  fill("senders", senders.length ? senders
    : [[{ text: "nobody is sending", cls: "zero" }, { text: "" }]]);

  fill("drops", d.drops.map((x) => [
    { text: x.reason.replace(/_/g, " ") }, { text: int(x.packets), cls: "num" + (x.packets ? "" : " zero") },
    { text: bytes(x.bytes), cls: "num" + (x.bytes ? "" : " zero") }, lastCell(x.last_at, now)]));

  const a = d.admission;
  const limits = d.limits.map((x) => [
    { text: "-" + x.limit.replace(/_/g, "-") }, { text: x.setting == null ? "off" : String(x.setting),
      cls: x.setting == null ? "zero" : "" },
    { text: int(x.hits), cls: "num" + (x.hits ? "" : " zero") }, lastCell(x.last_at, now)]);
  limits.push([{ text: "admission" + (a.by.length ? ` (-${a.by.join(", -")})` : "") },
    { text: a.enabled ? `${int(a.allowed)} allowed` : "off", cls: a.enabled ? "" : "zero" },
    { text: int(a.rejected), cls: "num" + (a.rejected ? "" : " zero"), title: "rejected" },
    lastCell(a.last_rejected_at, now)]);
  fill("limits", limits);

  fill("stun-kinds", Object.entries(d.stun.by_kind).map(([k, v]) => [
    { text: k.replace(/_/g, " ") }, { text: rate(v.per_second), cls: "num" + (v.per_second ? "" : " zero") },
    { text: int(v.total), cls: "num" + (v.total ? "" : " zero") }]));

  const mesh = $("mesh");
  if (!d.mesh.configured) {
    mesh.className = "muted";
    mesh.textContent = "no mesh configured";
  } else {
    const table = document.createElement("table");
    table.className = "list";
    table.replaceChildren(...d.mesh.links.map((l) => row([
      { text: l.peer }, { text: l.state, cls: l.state === "connected" ? "" : "recent" },
      { text: int(l.remote_clients) + " clients", cls: "num" }, { text: "since " + when(l.since) }])));
    mesh.className = "";
    mesh.replaceChildren(table);
  }

  const s = d.server, listen = s.listen;
  kv("server", [
    ["version", s.version], ["server key", s.server_key],
    ["DERP", s.derp ? (listen.derp || "–") : "off (-derp=false)"],
    ["TLS", s.tls], ["HTTP helper", listen.http || "off"], ["STUN", listen.stun || "off"],
    ["status & metrics", listen.metrics || "–"],
  ]);
}

// ---- the loop -----------------------------------------------------------------------------------

async function refresh() {
  const since = history.fine && history.coarse
    ? Math.min(...["fine", "coarse"].map((n) => history[n].t.at(-1) ?? 0)) : null;
  try {
    const resp = await fetch("/status.json" + (since == null ? "" : "?since=" + since),
                             { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const d = await resp.json();
    merge("fine", d.history.fine);
    merge("coarse", d.history.coarse);
    render(d);
    drawCharts();
  } catch (e) {
    const health = $("health");
    health.textContent = "unreachable";
    health.className = "pill pill-unknown";
    health.title = String(e);
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
