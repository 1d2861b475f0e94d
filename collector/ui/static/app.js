/* flowscope dashboards: the page shell, the URL-held state and every dashboard's panels.
 *
 * No build step and no framework: one script over ECharts (vendored from the npm registry by
 * scripts/setup.sh). The state a user would share -- dashboard, time range, filter, refresh,
 * page -- lives in the query string, so a link reproduces the view. Every number comes from
 * the collector's dashboard API (ui/v1/...), which reads the store's query layer.
 */
"use strict";

const API = "ui/v1/";

// index.html runs this script before ECharts (both deferred), so a page's data is asked for
// while ECharts is still being compiled; drawing waits for it (DOMContentLoaded: every
// deferred script has run).
let documentReady = false;
document.addEventListener("DOMContentLoaded", () => { documentReady = true; }, { once: true });
function chartsLoaded() {
  if (typeof echarts !== "undefined") return Promise.resolve();
  if (documentReady) return Promise.reject(new ApiError("ECharts did not load (static/vendor/echarts.min.js): run scripts/setup.sh"));
  return new Promise((resolve, reject) => document.addEventListener("DOMContentLoaded",
    () => (typeof echarts !== "undefined" ? resolve() : reject(new ApiError("ECharts did not load: run scripts/setup.sh"))), { once: true }));
}

const DASHBOARDS = [
  { id: "overview", title: "Overview" },
  { id: "pod-to-pod", title: "Pod-to-Pod" },
  { id: "pod-to-service", title: "Pod-to-Service" },
  { id: "pod-to-external", title: "Pod-to-External" },
  { id: "flows", title: "Flow Records" },
  { id: "nodes", title: "Node Throughput" },
  { id: "policy", title: "Network Policy" },
  { id: "what-if", title: "What-If" },
];

const RANGES = [
  ["5m", "Last 5 minutes"], ["15m", "Last 15 minutes"], ["1h", "Last hour"], ["6h", "Last 6 hours"],
  ["24h", "Last 24 hours"], ["168h", "Last 7 days"], ["custom", "Custom range\u2026"],
];
const REFRESHES = [["0", "refresh off"], ["5s", "every 5s"], ["10s", "every 10s"], ["30s", "every 30s"], ["1m", "every 1m"]];
// [URL parameter, label, what completes it]
const POLICY_FIELDS = [
  ["egressPolicyNamespace", "egress policy namespace", "egressPolicyNamespace"],
  ["egressPolicyName", "egress policy", "egressPolicyName"],
  ["ingressPolicyNamespace", "ingress policy namespace", "ingressPolicyNamespace"],
  ["ingressPolicyName", "ingress policy", "ingressPolicyName"],
];

const PALETTE = ["#2563eb", "#0d9488", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#ea580c",
  "#4f46e5", "#059669", "#b45309", "#9333ea", "#94a3b8"];
const DENY = "#d92d20";
// Colours that mean something wherever they appear.
const FIXED = { Allow: "#12805c", Drop: DENY, Reject: "#9f1239", "(none)": "#94a3b8", other: "#94a3b8", "(other)": "#94a3b8" };
const WARM = [DENY, "#ea580c", "#b45309", "#9f1239", "#db2777", "#f59e0b", "#7c2d12", "#be123c"];

// ------------------------------------------------------------------ state in the URL

const state = readURL();

function readURL() {
  const q = new URLSearchParams(location.search);
  const d = q.get("d");
  return {
    d: DASHBOARDS.some((x) => x.id === d) ? d : "overview",
    since: q.get("since") || (q.get("from") ? "" : "15m"),
    from: q.get("from") || "",
    to: q.get("to") || "",
    filter: q.get("filter") || "",
    refresh: q.get("refresh") ?? "10s",
    page: Math.max(1, parseInt(q.get("page") || "1", 10) || 1),
    egressPolicyNamespace: q.get("egressPolicyNamespace") || "",
    egressPolicyName: q.get("egressPolicyName") || "",
    ingressPolicyNamespace: q.get("ingressPolicyNamespace") || "",
    ingressPolicyName: q.get("ingressPolicyName") || "",
  };
}

function writeURL(push) {
  const q = new URLSearchParams();
  q.set("d", state.d);
  if (state.from) { q.set("from", state.from); if (state.to) q.set("to", state.to); } else q.set("since", state.since);
  if (state.filter) q.set("filter", state.filter);
  q.set("refresh", state.refresh);
  if (state.d === "flows" && state.page > 1) q.set("page", String(state.page));
  if (state.d === "policy") for (const [key] of POLICY_FIELDS) if (state[key]) q.set(key, state[key]);
  const url = `${location.pathname}?${q}`;
  if (url !== location.pathname + location.search) history[push ? "pushState" : "replaceState"](null, "", url);
}

window.addEventListener("popstate", () => { Object.assign(state, readURL()); syncControls(); render(); });

// ------------------------------------------------------------------ units

const SI = ["", "k", "M", "G", "T", "P"];
function si(n, unit, digits = 3) {
  if (n == null || !isFinite(n)) return "\u2013";
  let i = 0, v = Math.abs(n);
  while (v >= 1000 && i < SI.length - 1) { v /= 1000; i++; }
  const s = v >= 100 || i === 0 && Number.isInteger(v) ? v.toFixed(0) : v.toPrecision(digits);
  return `${n < 0 ? "-" : ""}${s} ${SI[i]}${unit}`;
}
const fmt = {
  bytes: (n) => si(n, "B"),
  rate: (n) => si(n, "B/s"),
  bits: (n) => si(n, "bit/s"),
  mbps: (n) => (n == null ? "\u2013" : `${n >= 100 ? n.toFixed(0) : n.toPrecision(3)} Mbps`),
  count: (n) => (n == null ? "\u2013" : n >= 10000 ? si(n, "") : String(Math.round(n * 100) / 100)),
  perSecond: (n) => (n == null ? "\u2013" : n >= 1000 ? si(n, "/s") : `${n.toPrecision(3).replace(/\.?0+$/, "")} /s`),
};
const UNIT = { "B/s": fmt.rate, "B": fmt.bytes, "1/s": fmt.perSecond, "count": fmt.count, "Mbps": fmt.mbps };

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
// Made once: toLocaleTimeString builds a formatter per call, and an axis asks for hundreds.
const TIME_FORMAT = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
const DATE_FORMAT = new Intl.DateTimeFormat([], { month: "short", day: "numeric" });
function timeLabel(ms, withDate) {
  const d = new Date(ms);
  const t = TIME_FORMAT.format(d);
  return withDate ? `${DATE_FORMAT.format(d)} ${t}` : t;
}

// ------------------------------------------------------------------ API

let token = sessionStorage.getItem("flowscope-token") || "";

function params(extra) {
  const q = new URLSearchParams();
  if (state.from) { q.set("from", state.from); if (state.to) q.set("to", state.to); } else q.set("since", state.since);
  const f = effectiveFilter();
  if (f) q.set("filter", f);
  if (state.d === "policy") for (const [key] of POLICY_FIELDS) if (state[key]) q.set(key, state[key]);
  for (const [k, v] of Object.entries(extra || {})) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  return q;
}

class ApiError extends Error {
  constructor(message, body) { super(message); this.body = body || {}; }
}

async function api(path, extra) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(`${API}${path}?${params(extra)}`, { headers });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) { askToken(); throw new ApiError("a bearer token is required", body); }
  if (!resp.ok) throw new ApiError((body && body.error) || `${resp.status} ${resp.statusText}`, body);
  return body;
}

function askToken() {
  const dlg = document.getElementById("token-dialog");
  if (!dlg.open) dlg.showModal();
}
document.getElementById("token-form").addEventListener("submit", () => {
  token = document.getElementById("token-input").value.trim();
  sessionStorage.setItem("flowscope-token", token);
  render();
});

// The filter box's text; the Network Policy page's four fields travel as their own
// parameters (exact matches on the policy's namespace and name, ANDed with the filter).
function effectiveFilter() {
  return state.filter.trim();
}
function quote(s) { return `"${String(s).replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"`; }

// ------------------------------------------------------------------ charts

const charts = new Map();

function card(cls, title, hint) {
  const el = document.createElement("section");
  el.className = `card ${cls}`;
  el.innerHTML = `<h2><span>${esc(title)}</span><span class="hint">${esc(hint || "")}</span></h2>`;
  document.getElementById("main").appendChild(el);
  return el;
}

function chartIn(el, id) {
  const div = document.createElement("div");
  div.className = "chart";
  div.dataset.chart = id;
  el.appendChild(div);
  return div;
}

function draw(div, option) {
  let chart = charts.get(div);
  if (!chart) {
    div.innerHTML = "";
    delete div.dataset.empty;
    chart = echarts.init(div, null, { renderer: "canvas" });
    charts.set(div, chart);
  }
  chart.setOption(option, true);
  div.dataset.ready = "1";
  return chart;
}

function empty(div, text) {
  const chart = charts.get(div);
  if (chart) { chart.dispose(); charts.delete(div); }
  div.innerHTML = `<div class="empty">${esc(text || "no flows in this time range and filter")}</div>`;
  div.dataset.ready = "1";
  div.dataset.empty = "1";
}

window.addEventListener("resize", () => { for (const c of charts.values()) c.resize(); });

const GRID = { left: 64, right: 16, top: 34, bottom: 30, containLabel: false };

function lineOption(data, opts = {}) {
  const f = UNIT[data.unit] || fmt.count;
  const withDate = data.times.length > 1 && data.times[data.times.length - 1] - data.times[0] > 86400e3;
  const named = data.series.length > 1 || (data.series.length === 1 && data.series[0].name !== "total");
  return {
    color: opts.palette || (opts.color ? [opts.color] : PALETTE),
    animation: false,
    grid: { ...GRID, top: named ? 44 : 16 },
    legend: named ? { type: "scroll", top: 0, textStyle: { fontSize: 11 } } : undefined,
    tooltip: {
      trigger: "axis", confine: true,
      valueFormatter: f,
      axisPointer: { type: opts.bar ? "shadow" : "line", label: { formatter: (p) => timeLabel(p.value, true) } },
    },
    xAxis: { type: "time", axisLabel: { hideOverlap: true, formatter: (v) => timeLabel(v, withDate) } },
    yAxis: { type: "value", min: 0, minInterval: data.unit === "count" ? 1 : undefined, axisLabel: { formatter: (v) => f(v) },
      splitLine: { lineStyle: { color: "#eef1f5" } } },
    series: data.series.map((s) => ({
      name: s.name, type: opts.bar ? "bar" : "line", showSymbol: false, smooth: false, stack: opts.stack ? "all" : undefined,
      areaStyle: opts.area ? { opacity: 0.12 } : undefined, barMaxWidth: 14,
      itemStyle: FIXED[s.name] ? { color: FIXED[s.name] } : undefined,
      lineStyle: FIXED[s.name] ? { width: 1.6, color: FIXED[s.name] } : { width: 1.6 },
      data: data.times.map((t, i) => [t, s.data[i]]),
    })),
  };
}

function barOption(data, opts = {}) {
  const rows = [...data.rows];
  if (data.other) rows.push({ ...data.other, name: "other", other: true });
  const f = fmt.bytes;
  const names = rows.map((r) => r.name).reverse();
  const value = (r) => (r.octets || 0) + (r.reverseOctets || 0);
  return {
    animation: false,
    grid: { left: 8, right: 70, top: 24, bottom: 8, containLabel: true },
    legend: { top: 0, data: ["sent", "received"], textStyle: { fontSize: 11 } },
    tooltip: {
      trigger: "axis", axisPointer: { type: "shadow" }, confine: true,
      formatter: (ps) => {
        const r = rows[rows.length - 1 - ps[0].dataIndex];
        const lines = [`<b>${esc(r.name)}</b>`, `sent ${f(r.octets)} \u00b7 received ${f(r.reverseOctets)}`,
          `${fmt.count(r.flows)} flows \u00b7 ${fmt.count(r.packets)} packets`];
        if (r.ips && r.ips.length) lines.push(`IP ${r.ips.map(esc).join(", ")}`);
        return lines.join("<br>");
      },
    },
    xAxis: { type: "value", axisLabel: { formatter: f, hideOverlap: true }, splitLine: { lineStyle: { color: "#eef1f5" } } },
    yAxis: { type: "category", data: names, axisLabel: { width: 200, overflow: "truncate", fontSize: 11.5 } },
    series: [
      { name: "sent", type: "bar", stack: "t", data: rows.map((r) => r.octets || 0).reverse(), itemStyle: { color: opts.color || PALETTE[0] }, barMaxWidth: 18 },
      { name: "received", type: "bar", stack: "t", data: rows.map((r) => r.reverseOctets || 0).reverse(), itemStyle: { color: PALETTE[1] }, barMaxWidth: 18,
        label: { show: true, position: "right", fontSize: 11, color: "#5f6b7a", formatter: (p) => f(value(rows[rows.length - 1 - p.dataIndex])) } },
    ],
  };
}

// One of a policy link's Pod pairs (ui/v1/pairs), in the units of the link's own line.
function pairText(p) {
  return `${p.source} \u2192 ${p.destination}: ${fmt.bytes(p.octets)}, ${fmt.count(p.records)} records ` +
    `(egress ${p.egressAction}, ingress ${p.ingressAction})`;
}

function sankeyOption(data, opts = {}) {
  const f = opts.unit === "count" ? fmt.count : fmt.bytes;
  const byName = new Map(data.nodes.map((n) => [n.name, n]));
  const pairs = new Map(); // a link's Pod pairs: the request once asked, its answer once come
  return {
    animation: false,
    tooltip: {
      trigger: "item", confine: true,
      formatter: (p, ticket, callback) => {
        if (p.dataType === "edge") {
          const l = p.data;
          const text = (detail) => {
            // a link's own bytes (its drawn width may be floored so that a small denied one shows)
            const head = `<b>${esc(byName.get(l.source)?.label)}</b> \u2192 <b>${esc(byName.get(l.target)?.label)}</b>: ${f(l.bytes ?? l.value)}`;
            const lines = [head];
            if (l.denied) lines.push(`<span style="color:${DENY}">&#9888; denied: ${fmt.count(l.denied)} connection(s)</span>`);
            for (const d of detail.slice(0, 8)) lines.push(esc(d));
            if (detail.length > 8) lines.push(`\u2026 ${detail.length - 8} more`);
            return lines.join("<br>");
          };
          if (!l.pairs) return text(l.detail || []);
          // A policy link's Pod pairs are asked for when its tooltip first opens, not with the page.
          const key = `${l.pairs.egress}\u0000${l.pairs.ingress}`;
          if (pairs.get(key)?.detail) return text(pairs.get(key).detail);
          if (!pairs.has(key)) {
            const entry = { asked: api("pairs", l.pairs).then((r) => r.pairs.map(pairText)) };
            pairs.set(key, entry);
            entry.asked.then((detail) => { entry.detail = detail; }, () => pairs.delete(key));
          }
          pairs.get(key).asked.then((detail) => callback(ticket, text(detail)),
            (e) => callback(ticket, text([`Pod pairs not loaded: ${e.message}`])));
          return text(["Pod pairs\u2026"]);
        }
        const n = byName.get(p.name) || {};
        const lines = [`<b>${esc(n.label)}</b>: ${f(p.value)}`];
        for (const d of n.detail || []) lines.push(esc(d));
        return lines.join("<br>");
      },
    },
    series: [{
      type: "sankey", left: 8, right: 200, top: 8, bottom: 8, nodeGap: 10, nodeWidth: 12, draggable: false,
      layoutIterations: 32, emphasis: { focus: "adjacency" },
      label: { fontSize: 11.5, width: 190, overflow: "truncate", formatter: (p) => byName.get(p.name)?.label ?? p.name },
      lineStyle: { color: "gradient", curveness: 0.5, opacity: 0.35 },
      data: data.nodes.map((n, i) => ({
        name: n.name,
        itemStyle: { color: n.other ? "#94a3b8" : PALETTE[i % (PALETTE.length - 1)] },
      })),
      links: data.links.map((l) => ({
        ...l,
        lineStyle: l.denied ? { color: DENY, opacity: 0.8 } : undefined,
        emphasis: l.denied ? { lineStyle: { color: DENY, opacity: 0.95 } } : undefined,
      })),
    }],
  };
}

function heatmapOption(data) {
  const withDate = data.times.length > 1 && data.times[data.times.length - 1] - data.times[0] > 86400e3;
  return {
    animation: false,
    grid: { left: 8, right: 16, top: 8, bottom: 56, containLabel: true },
    tooltip: {
      confine: true,
      formatter: (p) => `<b>${esc(data.nodes[p.value[1]])}</b><br>${timeLabel(data.times[p.value[0]], true)}<br>${fmt.mbps(p.value[2])}`,
    },
    xAxis: { type: "category", data: data.times.map((t) => timeLabel(t, withDate)), splitArea: { show: false }, axisLabel: { hideOverlap: true } },
    yAxis: { type: "category", data: data.nodes, splitArea: { show: true } },
    visualMap: {
      min: 0, max: Math.max(data.max || 0, 0.001), calculable: false, orient: "horizontal", left: "center", bottom: 0,
      itemHeight: 180, itemWidth: 12, text: [fmt.mbps(data.max || 0), "0"], textStyle: { fontSize: 11 },
      inRange: { color: ["#f1f5f9", "#93c5fd", "#2563eb", "#1e3a8a"] },
    },
    // progressive: 0 draws every cell in the first frame (not in chunks after the page says it is loaded)
    series: [{ type: "heatmap", data: data.cells, progressive: 0, emphasis: { itemStyle: { borderColor: "#111", borderWidth: 1 } } }],
  };
}

// ------------------------------------------------------------------ panels

// A panel is what it asks (its panel and parameters, as the server's PAGES lists them) and
// how it shows the answer; update() asks for all of a page's panels in one request.
function panelLine(el, path, extra, opts) {
  const div = chartIn(el, extra.metric + ":" + (extra.group || ""));
  return { panel: path, extra, show: (data) => {
    div.dataset.series = JSON.stringify(data.series.map((s) => s.name));
    if (!data.series.length || data.series.every((s) => s.data.every((v) => !v))) return empty(div);
    draw(div, lineOption(data, opts));
  } };
}

function panelBar(el, extra, opts) {
  const div = chartIn(el, "top:" + extra.group);
  return { panel: "top", extra, show: (data) => {
    div.dataset.rows = JSON.stringify(data.rows.map((r) => r.name));
    if (!data.rows.length) return empty(div);
    draw(div, barOption(data, opts));
  } };
}

function panelSankey(el, extra, opts = {}) {
  const div = chartIn(el, `sankey:${extra.scope}:${extra.dir || ""}`);
  return { panel: "sankey", extra, show: (data) => {
    div.dataset.nodes = JSON.stringify(data.nodes.map((n) => n.label));
    div.dataset.denied = String(data.links.filter((l) => l.denied).length);
    if (!data.links.length) return empty(div);
    const chart = draw(div, sankeyOption(data, opts));
    chart.off("click");
    chart.on("click", (p) => {
      const drill = p.dataType === "edge" ? p.data.filter : data.nodes.find((n) => n.name === p.name)?.filter;
      if (drill) go({ d: "flows", filter: [state.filter.trim() && `(${state.filter.trim()})`, drill].filter(Boolean).join(" and "), page: 1 });
    });
  } };
}

function panelHeatmap(el, extra) {
  const div = chartIn(el, "heatmap:" + extra.dir);
  return { panel: "heatmap", extra, show: (data) => {
    div.dataset.nodes = JSON.stringify(data.nodes);
    if (!data.cells.length) return empty(div);
    draw(div, heatmapOption(data));
  } };
}

function stat(label, cls) {
  const el = card(`stat w2 ${cls || ""}`, "");
  el.querySelector("h2").remove();
  el.innerHTML = `<div class="label">${esc(label)}</div><div class="value">\u2013</div><div class="sub"></div>`;
  return el;
}

function panelStats() {
  const cards = {
    fps: stat("Flows per second"), thr: stat("Throughput"), vol: stat("Traffic"),
    active: stat("Active connections"), ended: stat("Ended connections"), denied: stat("Denied connections", "deny"),
  };
  const set = (el, value, sub) => { el.querySelector(".value").textContent = value; el.querySelector(".sub").textContent = sub || ""; };
  return { panel: "summary", extra: {}, show: (s) => {
    set(cards.fps, fmt.perSecond(s.flowsPerSecond), `${fmt.count(s.flows)} flow records`);
    set(cards.thr, fmt.rate(s.octetsPerSecond), fmt.bits(s.octetsPerSecond * 8));
    set(cards.vol, fmt.bytes(s.octets), `${fmt.count(s.packets)} packets`);
    set(cards.active, fmt.count(s.active), "still open at the window's end");
    set(cards.ended, fmt.count(s.ended), "closed or timed out");
    set(cards.denied, fmt.count(s.denied), "dropped or rejected by policy");
    cards.denied.classList.toggle("deny", s.denied > 0);
  } };
}

// ------------------------------------------------------------------ Flow Records

const COLUMNS = [
  ["time", "Last seen", (r) => timeLabel(r.flowEndSeconds * 1000, true)],
  ["source", "Source", (r) => endpoint(r.sourcePodNamespace, r.sourcePodName, r.sourceIP, r.sourceTransportPort)],
  ["destination", "Destination", (r) => endpoint(r.destinationPodNamespace, r.destinationPodName, r.destinationIP, r.destinationTransportPort)],
  ["service", "Service", (r) => r.destinationServicePortName || ""],
  ["proto", "Proto", (r) => PROTOCOLS[r.protocolIdentifier] || r.protocolIdentifier],
  ["type", "Type", (r) => `<span class="badge type">${esc(FLOW_TYPES[r.flowType] || r.flowType)}</span>`, true],
  ["bytes", "Bytes \u2192", (r) => fmt.bytes(r.octetTotalCount), false, "num"],
  ["rbytes", "Bytes \u2190", (r) => fmt.bytes(r.reverseOctetTotalCount), false, "num"],
  ["packets", "Packets", (r) => fmt.count((r.packetTotalCount || 0) + (r.reversePacketTotalCount || 0)), false, "num"],
  ["policy", "Policy", (r) => policyCell(r), true, "policy"],
];
const PROTOCOLS = { 1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP" };
const FLOW_TYPES = { 0: "host", 1: "intra-node", 2: "inter-node", 3: "to-external", 4: "from-external" };
const ACTIONS = { 0: "", 1: "allow", 2: "drop", 3: "reject" };
const END_REASONS = { 1: "idle timeout", 2: "active timeout", 3: "end of flow", 4: "forced end", 5: "lack of resources" };

function endpoint(ns, pod, ip, port) {
  const where = pod ? `${ns}/${pod}` : ip || "";
  return port ? `${where}:${port}` : where;
}
function isDenied(r) { return [2, 3].includes(r.ingressNetworkPolicyRuleAction) || [2, 3].includes(r.egressNetworkPolicyRuleAction); }
function policyCell(r) {
  const out = [];
  for (const side of ["egress", "ingress"]) {
    const act = ACTIONS[r[`${side}NetworkPolicyRuleAction`]] || "";
    const name = r[`${side}NetworkPolicyName`];
    const ns = r[`${side}NetworkPolicyNamespace`];
    if (act || name) {
      out.push(`<span class="badge ${esc(act)}" title="${esc(side)} ${esc(act)}">${side === "egress" ? "E" : "I"} ${esc(act)}</span> ${esc(name ? (ns ? `${ns}/${name}` : name) : "")}`);
    }
  }
  return out.join("<br>");
}

function panelFlows(el, opts = {}) {
  const wrap = document.createElement("div");
  wrap.className = "scroll";
  el.appendChild(wrap);
  const pager = document.createElement("div");
  pager.className = "pager";
  el.appendChild(pager);
  const limit = opts.limit || 50;
  const extra = opts.paged ? { page: "1", limit: String(limit) } : { scope: opts.scope, limit: String(limit) };
  return { panel: "flows", extra, show: (data) => {
    const page = opts.paged ? state.page : 1;
    const head = COLUMNS.map(([, t, , , cls]) => `<th class="${cls || ""}">${esc(t)}</th>`).join("");
    const rows = data.rows.map((r, i) => `<tr data-i="${i}" class="${isDenied(r) ? "denied" : ""}">` +
      COLUMNS.map(([, , f, html, cls]) => `<td class="${cls || ""}">${html ? f(r) : esc(f(r))}</td>`).join("") + "</tr>").join("");
    wrap.innerHTML = data.rows.length
      ? `<table class="flows"><thead><tr>${head}</tr></thead><tbody>${rows}</tbody></table>`
      : `<div class="empty">no flow records in this time range and filter</div>`;
    wrap.dataset.ready = "1";
    wrap.dataset.rows = String(data.rows.length);
    wrap.querySelectorAll("tbody tr").forEach((tr) => tr.addEventListener("click", () => showFlow(data.rows[+tr.dataset.i])));
    const pages = Math.max(1, Math.ceil(data.total / limit));
    const first = data.total ? (page - 1) * limit + 1 : 0;
    pager.innerHTML = `<span>${first}\u2013${Math.min(page * limit, data.total)} of ${data.total} records</span>`;
    if (opts.paged) {
      const actions = document.createElement("span");
      actions.className = "actions";
      const exportQ = params({ scope: opts.scope, format: "csv" });
      const exportJ = params({ scope: opts.scope, format: "json" });
      actions.innerHTML = `<button data-p="prev" ${page <= 1 ? "disabled" : ""}>&lsaquo; newer</button>` +
        `<span>page ${page} of ${pages}</span>` +
        `<button data-p="next" ${page >= pages ? "disabled" : ""}>older &rsaquo;</button>` +
        `<a id="export-csv" href="${API}flows?${exportQ}" download="flows.csv">Export CSV</a>` +
        `<a id="export-json" href="${API}flows?${exportJ}" download="flows.json">Export JSON</a>`;
      actions.querySelector('[data-p="prev"]').onclick = () => go({ page: page - 1 });
      actions.querySelector('[data-p="next"]').onclick = () => go({ page: page + 1 });
      if (token) actions.querySelectorAll("a").forEach((a) => a.addEventListener("click", (e) => { e.preventDefault(); download(a); }));
      pager.appendChild(actions);
    }
  } };
}

async function download(a) {
  const resp = await fetch(a.href, { headers: { Authorization: `Bearer ${token}` } });
  const blob = await resp.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = a.getAttribute("download");
  link.click();
  URL.revokeObjectURL(link.href);
}

async function showFlow(row) {
  const dlg = document.getElementById("details");
  const body = document.getElementById("details-body");
  body.innerHTML = "loading\u2026";
  dlg.showModal();
  let r = row;
  try {
    if (row.id) r = (await api("flow", { id: row.id })).flow;
  } catch (e) { /* the row itself has every field; the detail call only refreshes it */ }
  const dl = (pairs) => `<dl>${pairs.filter(([, v]) => v !== undefined && v !== "" && v !== null).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("")}</dl>`;
  const n = (v) => (v == null ? "\u2013" : Number(v).toLocaleString());
  const counters = `<table><tr><th></th><th>packets \u2192</th><th>bytes \u2192</th><th>packets \u2190</th><th>bytes \u2190</th></tr>` +
    [["total", ""], ["from the source Node", "FromSourceNode"], ["from the destination Node", "FromDestinationNode"]].map(([label, sfx]) =>
      `<tr><td>${label}</td><td>${n(r[`packetTotalCount${sfx}`])}</td><td>${n(r[`octetTotalCount${sfx}`])}</td>` +
      `<td>${n(r[`reversePacketTotalCount${sfx}`])}</td><td>${n(r[`reverseOctetTotalCount${sfx}`])}</td></tr>`).join("") + "</table>";
  const t = (s) => (s ? new Date(s * 1000).toISOString().replace(".000", "") : "");
  body.innerHTML = `<div class="details">
    <h3>Connection</h3>${dl([
      ["source", endpoint(r.sourcePodNamespace, r.sourcePodName, r.sourceIP, r.sourceTransportPort)],
      ["source IP", r.sourceIP], ["source Node", r.sourceNodeName],
      ["destination", endpoint(r.destinationPodNamespace, r.destinationPodName, r.destinationIP, r.destinationTransportPort)],
      ["destination IP", r.destinationIP], ["destination Node", r.destinationNodeName],
      ["Service", r.destinationServicePortName], ["ClusterIP", r.destinationClusterIP && `${r.destinationClusterIP}:${r.destinationServicePort || ""}`],
      ["protocol", PROTOCOLS[r.protocolIdentifier] || r.protocolIdentifier], ["flow type", FLOW_TYPES[r.flowType] ?? r.flowType],
      ["TCP state", r.tcpState], ["start", t(r.flowStartSeconds)], ["last seen", t(r.flowEndSeconds)],
      ["end reason", r.flowEndReason ? `${END_REASONS[r.flowEndReason] || "?"} (${r.flowEndReason})` : ""], ["correlation", r.correlation], ["final record", r.final === undefined ? "" : String(!!r.final)],
    ])}
    <h3>Counters (both Nodes)</h3>${counters}
    <h3>Network policies</h3>${dl([
      ["egress policy", r.egressNetworkPolicyName && `${r.egressNetworkPolicyNamespace}/${r.egressNetworkPolicyName}`],
      ["egress rule", r.egressNetworkPolicyRuleName], ["egress action", ACTIONS[r.egressNetworkPolicyRuleAction] || "none"],
      ["ingress policy", r.ingressNetworkPolicyName && `${r.ingressNetworkPolicyNamespace}/${r.ingressNetworkPolicyName}`],
      ["ingress rule", r.ingressNetworkPolicyRuleName], ["ingress action", ACTIONS[r.ingressNetworkPolicyRuleAction] || "none"],
    ])}
    <h3>All fields</h3>${dl(Object.entries(r).sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v]))}
  </div>`;
}

// ------------------------------------------------------------------ dashboards

const VIEWS = {
  async overview() {
    const ups = [panelStats()];
    ups.push(panelLine(card("w8", "Throughput by flow type", "bytes/s, both directions"), "series", { metric: "throughput", group: "flowType" }, { area: true }));
    ups.push(panelLine(card("w4", "Flow records per second"), "series", { metric: "flows" }, { area: true }));
    ups.push(panelBar(card("w4 tall", "Top Pods", "by bytes, sent + received"), { group: "pod", n: 10 }));
    ups.push(panelBar(card("w4 tall", "Top Services", "by bytes"), { group: "service", n: 10 }, { color: PALETTE[3] }));
    ups.push(panelLine(card("w4 tall", "Denied connections", "dropped or rejected, per interval"), "series", { metric: "denied" }, { bar: true, color: DENY }));
    return ups;
  },
  async "pod-to-pod"() {
    return [
      panelSankey(card("w6 tall", "Cumulative Tx: source Pod \u2192 destination Pod", "bytes sent"), { scope: "pod-to-pod", dir: "tx", n: 15 }),
      panelSankey(card("w6 tall", "Cumulative Rx: source Pod \u2192 destination Pod", "bytes received back"), { scope: "pod-to-pod", dir: "rx", n: 15 }),
      panelLine(card("w6", "Throughput per source Pod"), "series", { metric: "throughput", group: "srcPod", scope: "pod-to-pod", top: 8 }),
      panelLine(card("w6", "Throughput per destination Pod"), "series", { metric: "throughput", group: "dstPod", scope: "pod-to-pod", top: 8 }),
    ];
  },
  async "pod-to-service"() {
    return [
      panelSankey(card("w6 tall", "Cumulative Tx: Pod \u2192 Service", "bytes sent"), { scope: "pod-to-service", dir: "tx", n: 15 }),
      panelSankey(card("w6 tall", "Cumulative Rx: Pod \u2192 Service", "bytes received back"), { scope: "pod-to-service", dir: "rx", n: 15 }),
      panelLine(card("w6", "Throughput per Service"), "series", { metric: "throughput", group: "service", scope: "pod-to-service", top: 8 }),
      panelLine(card("w6", "Throughput per source Pod"), "series", { metric: "throughput", group: "srcPod", scope: "pod-to-service", top: 8 }),
    ];
  },
  async "pod-to-external"() {
    return [
      panelSankey(card("w6 tall", "Cumulative Tx: Pod \u2192 external address", "bytes sent"), { scope: "pod-to-external", dir: "tx", n: 15 }),
      panelSankey(card("w6 tall", "Cumulative Rx: Pod \u2192 external address", "bytes received back"), { scope: "pod-to-external", dir: "rx", n: 15 }),
      panelLine(card("w6", "Throughput per external address"), "series", { metric: "throughput", group: "dstIP", scope: "pod-to-external", top: 8 }),
      panelLine(card("w6", "Throughput per source Pod"), "series", { metric: "throughput", group: "srcPod", scope: "pod-to-external", top: 8 }),
    ];
  },
  async flows() {
    return [
      panelLine(card("w12", "Flow records over time"), "series", { metric: "flows", group: "flowType" }, { bar: true, stack: true }),
      panelFlows(card("w12", "Flow records", "newest first; click a record for its details"), { paged: true, limit: 50 }),
    ];
  },
  async nodes() {
    return [
      panelLine(card("w6", "Inter-Node traffic per Node", "bytes/s to and from other Nodes, both directions"), "series", { metric: "throughput", group: "node", scope: "inter-node", top: 10 }),
      panelLine(card("w6", "Intra-Node traffic per Node", "bytes/s between Pods of one Node"), "series", { metric: "throughput", group: "node", scope: "intra-node", top: 10 }),
      panelHeatmap(card("w6", "Tx Mbps per Node"), { dir: "tx" }),
      panelHeatmap(card("w6", "Rx Mbps per Node"), { dir: "rx" }),
    ];
  },
  async policy() {
    return [
      panelSankey(card("w8 tall", "Egress policy \u2192 ingress policy", "bytes; denied traffic in red; click to see the flows"), { scope: "policy", dir: "tx", n: 20 }),
      panelBar(card("w4 tall", "Top ingress policies", "by bytes"), { group: "ingressPolicy", n: 10 }, { color: PALETTE[3] }),
      panelLine(card("w6", "Denied connections over time"), "series", { metric: "denied", group: "dstPod", top: 8 }, { bar: true, stack: true, palette: WARM }),
      panelLine(card("w6", "Flow records per ingress rule action", "records/s"), "series", { metric: "flows", group: "ingressAction" }, { bar: true, stack: true }),
      panelFlows(card("w12", "Denied connections", "newest first"), { scope: "denied", limit: 10 }),
    ];
  },
  async "what-if"() {
    const form = card("w12", "What would these policies change?", "evaluated with the agent's own policy evaluator");
    const result = card("w12", "Flows whose verdict would change", "grouped by source and destination workload");
    result.id = "whatif-result";
    const body = document.createElement("div");
    body.className = "whatif-result";
    body.innerHTML = `<div class="empty">paste or upload policies, then Evaluate</div>`;
    result.appendChild(body);
    whatIfForm(form, result);
    return []; // evaluated on demand, not on every refresh
  },
};

// ------------------------------------------------------------------ the what-if page

// What the user pasted survives switching dashboards and ranges (not a reload: it may be long).
const whatIf = { policies: "", inventory: "", namespace: "", replace: false };
const WHATIF_MAX = 1 << 20; // the server's bound on the body (collector/ui/whatif.py)

function sinceEpoch() {
  if (state.from) return /^\d+$/.test(state.from) ? Number(state.from) : Math.floor(Date.parse(state.from) / 1000);
  const ms = durationMs(state.since);
  return ms ? Math.floor((Date.now() - ms) / 1000) : null;
}

async function postWhatIf(body) {
  const headers = { Accept: "application/json", "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const text = JSON.stringify(body);
  if (new Blob([text]).size > WHATIF_MAX) throw new ApiError(`the policies and inventory are more than ${si(WHATIF_MAX, "B")}`, { field: "body" });
  const resp = await fetch(`${API}whatif`, { method: "POST", headers, body: text });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401) { askToken(); throw new ApiError("a bearer token is required", data); }
  if (!resp.ok) throw new ApiError((data && data.error) || `${resp.status} ${resp.statusText}`, data);
  return data;
}

function verdictText(v) {
  if (!v) return "no policy applies";
  const name = v.namespace ? `${v.namespace}/${v.name}` : v.name;
  return `${v.action} by ${v.kind} ${name}${v.rule ? ` (${v.rule})` : ""}`;
}

function whatIfForm(el, result) {
  const form = document.createElement("form");
  form.className = "whatif";
  form.id = "whatif-form";
  form.innerHTML = `
    <label class="full">Proposed policies <span class="hint">NetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy; several documents or a List</span>
      <textarea id="whatif-policies" rows="14" spellcheck="false" placeholder="apiVersion: networking.k8s.io/v1&#10;kind: NetworkPolicy&#10;metadata: {name: default-deny, namespace: shop}&#10;spec: {podSelector: {}, policyTypes: [Ingress]}"></textarea></label>
    <details class="full"><summary>Inventory (optional): Pods, Namespaces and the current policies</summary>
      <textarea id="whatif-inventory" rows="8" spellcheck="false" placeholder="kubectl get pods,namespaces,networkpolicies -A -o yaml"></textarea></details>
    <div class="row">
      <label>Upload <input id="whatif-file" type="file" accept=".yaml,.yml,.json,text/yaml,application/json"></label>
      <label>Namespace <input id="whatif-namespace" size="18" placeholder="any" list="dl-whatif-ns"><datalist id="dl-whatif-ns"></datalist></label>
      <label><input id="whatif-replace" type="checkbox"> replace the current policies</label>
      <button type="submit" id="whatif-run">Evaluate</button>
      <span class="hint">over the flows stored since the start of the time range above</span>
    </div>
    <div id="whatif-error" class="filter-error" role="alert" hidden></div>`;
  el.appendChild(form);
  const f = (id) => form.querySelector(`#${id}`);
  f("whatif-policies").value = whatIf.policies;
  f("whatif-inventory").value = whatIf.inventory;
  if (whatIf.inventory) form.querySelector("details").open = true;
  f("whatif-namespace").value = whatIf.namespace;
  f("whatif-replace").checked = whatIf.replace;
  fillDatalist(f("dl-whatif-ns"), "namespace");
  f("whatif-file").addEventListener("change", async () => {
    const file = f("whatif-file").files[0];
    if (!file) return;
    if (file.size > WHATIF_MAX) { showWhatIfError(form, `${file.name}: ${si(file.size, "B")} is more than ${si(WHATIF_MAX, "B")}`); return; }
    f("whatif-policies").value = await file.text();
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    Object.assign(whatIf, { policies: f("whatif-policies").value, inventory: f("whatif-inventory").value,
      namespace: f("whatif-namespace").value.trim(), replace: f("whatif-replace").checked });
    showWhatIfError(form, "");
    const body = { policies: whatIf.policies, since: sinceEpoch(), replace: whatIf.replace };
    if (whatIf.inventory.trim()) body.inventory = whatIf.inventory;
    if (whatIf.namespace) body.namespace = whatIf.namespace;
    if (body.since === null) delete body.since;
    f("whatif-run").disabled = true;
    $("status").textContent = "evaluating…";
    $("status").className = "";
    try {
      showWhatIf(result, await postWhatIf(body));
      $("status").textContent = `What-If · ${rangeText()}`;
    } catch (err) {
      showWhatIfError(form, err.message);
      $("status").textContent = "the what-if was not evaluated";
      $("status").className = "err";
    } finally {
      f("whatif-run").disabled = false;
    }
  });
}

function showWhatIfError(form, message) {
  const box = form.querySelector("#whatif-error");
  box.hidden = !message;
  box.textContent = message;
}

const WHATIF_GROUPS = 200; // groups drawn; the rest are counted

function showWhatIf(el, r) {
  const body = el.querySelector(".whatif-result");
  const groups = r.groups.slice(0, WHATIF_GROUPS);
  const rows = [];
  for (const g of groups) {
    rows.push(`<tr class="group"><td colspan="4">${esc(g.source)} → ${esc(g.destination)}</td>` +
      `<td class="num">${esc(fmt.count(g.records))}</td><td class="num">${esc(fmt.bytes(g.octets))}</td>` +
      `<td>${esc(timeLabel(g.lastSeen * 1000, true))}</td></tr>`);
    for (const c of g.changes) {
      const denied = c.change === "allowed->denied";
      rows.push(`<tr class="${denied ? "denied" : "opened"}"><td><span class="badge ${denied ? "drop" : "allow"}">${esc(c.change)}</span></td>` +
        `<td class="mono">${esc(endpoint(c.source.namespace, c.source.pod, c.source.ip))}</td>` +
        `<td class="mono">${esc(endpoint(c.destination.namespace, c.destination.pod, c.destination.ip, c.port))}/${esc(c.protocol)}</td>` +
        `<td>${esc(verdictText(c.after))}</td><td class="num">${esc(fmt.count(c.records))}</td>` +
        `<td class="num">${esc(fmt.bytes(c.octets))}</td><td>${esc(timeLabel(c.lastSeen * 1000, true))}</td></tr>`);
    }
  }
  const more = r.groups.length > groups.length ? `<p class="hint">${r.groups.length - groups.length} more groups not drawn; <code>flowscope policy what-if -o json</code> lists all</p>` : "";
  const unresolved = r.unresolved.length ? `<p class="hint" id="whatif-unresolved">${r.unresolved.length} flows left out: a Pod end has no known labels (give an inventory)</p>` : "";
  body.innerHTML = `
    <div class="whatif-summary" id="whatif-summary">
      <span><b>${esc(r.evaluated)}</b> distinct flows evaluated</span>
      <span class="deny"><b>${esc(r.newlyDenied)}</b> would be denied (<b>${esc(r.breaks)}</b> of them flowed)</span>
      <span class="allow"><b>${esc(r.newlyAllowed)}</b> would be allowed</span>
    </div>
    ${r.groups.length ? `<div class="scroll"><table class="flows whatif-table"><thead><tr><th>change</th><th>source</th><th>destination</th><th>after</th><th class="num">records</th><th class="num">bytes</th><th>last seen</th></tr></thead><tbody>${rows.join("")}</tbody></table></div>` : `<div class="empty">no stored flow would change verdict</div>`}
    ${more}${unresolved}`;
  el.dataset.ready = "1";
}

// ------------------------------------------------------------------ controls

const $ = (id) => document.getElementById(id);
let updaters = [];
let generation = 0;
let timer = null;

function syncControls() {
  $("tabs").innerHTML = DASHBOARDS.map((d) => `<a href="?${new URLSearchParams({ ...linkState(), d: d.id })}" data-d="${d.id}" class="${d.id === state.d ? "active" : ""}">${esc(d.title)}</a>`).join("");
  $("tabs").querySelectorAll("a").forEach((a) => a.addEventListener("click", (e) => { e.preventDefault(); go({ d: a.dataset.d, page: 1 }); }));
  $("range").value = state.from ? "custom" : (RANGES.some(([v]) => v === state.since) ? state.since : "custom");
  $("custom").hidden = $("range").value !== "custom";
  $("from").value = state.from ? localInput(state.from) : "";
  $("to").value = state.to ? localInput(state.to) : "";
  $("refresh").value = REFRESHES.some(([v]) => v === state.refresh) ? state.refresh : "0";
  $("filter").value = state.filter;
  document.querySelector(".filterbar").hidden = state.d === "what-if"; // the what-if takes policies, not a filter
  const extra = $("extra");
  extra.innerHTML = "";
  if (state.d === "policy") {
    for (const [key, label, field] of POLICY_FIELDS) {
      const l = document.createElement("label");
      l.innerHTML = `${esc(label)} <input data-key="${key}" list="dl-${key}" value="${esc(state[key])}" size="16"><datalist id="dl-${key}"></datalist>`;
      extra.appendChild(l);
      const input = l.querySelector("input");
      input.addEventListener("change", () => go({ [key]: input.value.trim() }));
      // the known values are asked for when the field is first used, not on every page load
      input.addEventListener("focus", () => fillDatalist(l.querySelector("datalist"), field), { once: true });
    }
  }
}

function linkState() {
  const o = { refresh: state.refresh };
  if (state.from) { o.from = state.from; if (state.to) o.to = state.to; } else o.since = state.since;
  if (state.filter) o.filter = state.filter;
  return o;
}

async function fillDatalist(dl, field) {
  try {
    const r = await api("values", { field });
    dl.innerHTML = r.values.map((v) => `<option value="${esc(v)}">`).join("");
  } catch (e) { /* completion is a convenience */ }
}

function localInput(iso) {
  const d = new Date(iso);
  if (isNaN(d)) return "";
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function go(changes) {
  Object.assign(state, changes);
  writeURL(true);
  syncControls();
  render();
}

$("range").innerHTML = RANGES.map(([v, t]) => `<option value="${v}">${t}</option>`).join("");
$("refresh").innerHTML = REFRESHES.map(([v, t]) => `<option value="${v}">${t}</option>`).join("");
$("range").addEventListener("change", () => {
  const v = $("range").value;
  if (v === "custom") {
    const now = Date.now();
    const span = (durationMs(state.since) || 900e3);
    go({ from: new Date(now - span).toISOString(), to: new Date(now).toISOString(), since: "" });
  } else go({ since: v, from: "", to: "" });
});
for (const id of ["from", "to"]) {
  $(id).addEventListener("change", () => {
    const v = $(id).value;
    if (v) go({ [id]: new Date(v).toISOString(), since: "" });
  });
}
$("refresh").addEventListener("change", () => go({ refresh: $("refresh").value }));
$("reload").addEventListener("click", () => update());
$("filter-form").addEventListener("submit", (e) => { e.preventDefault(); hideComplete(); go({ filter: $("filter").value.trim(), page: 1 }); });
$("filter-clear").addEventListener("click", () => go({ filter: "", page: 1 }));

function durationMs(s) {
  const m = /^(\d+)(s|m|h|d)$/.exec(s || "");
  return m ? +m[1] * { s: 1e3, m: 60e3, h: 3600e3, d: 86400e3 }[m[2]] : 0;
}

// ------------------------------------------------------------------ filter completion

let completion = { items: [], sel: -1, from: 0, to: 0 };
let completeTimer = null;

$("filter").addEventListener("input", () => { clearTimeout(completeTimer); completeTimer = setTimeout(complete, 120); });
$("filter").addEventListener("focus", () => { clearTimeout(completeTimer); completeTimer = setTimeout(complete, 50); });
$("filter").addEventListener("blur", () => setTimeout(hideComplete, 150));
$("filter").addEventListener("keydown", (e) => {
  const open = !$("complete").hidden && completion.items.length;
  if (e.key === "Tab" && open) { e.preventDefault(); choose(completion.sel >= 0 ? completion.sel : 0); }
  else if (e.key === "ArrowDown" && open) { e.preventDefault(); select(Math.min(completion.sel + 1, completion.items.length - 1)); }
  else if (e.key === "ArrowUp" && open) { e.preventDefault(); select(Math.max(completion.sel - 1, 0)); }
  else if (e.key === "Enter" && open && completion.sel >= 0) { e.preventDefault(); choose(completion.sel); }
  else if (e.key === "Escape") hideComplete();
});

async function complete() {
  const input = $("filter");
  const pos = input.selectionStart ?? input.value.length;
  let r;
  try {
    const q = new URLSearchParams({ q: input.value, pos: String(pos) });
    if (state.from) { q.set("from", state.from); if (state.to) q.set("to", state.to); } else q.set("since", state.since);
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const resp = await fetch(`${API}complete?${q}`, { headers });
    if (!resp.ok) return hideComplete();
    r = await resp.json();
  } catch (e) { return hideComplete(); }
  if (document.activeElement !== input) return;
  completion = { items: r.suggestions, sel: -1, from: r.from, to: r.to };
  const ul = $("complete");
  ul.innerHTML = r.suggestions.map((s, i) => `<li role="option" data-i="${i}"><span>${esc(s.value)}</span><span class="kind">${esc(s.kind)}</span></li>`).join("");
  ul.hidden = !r.suggestions.length;
  ul.querySelectorAll("li").forEach((li) => li.addEventListener("mousedown", (e) => { e.preventDefault(); choose(+li.dataset.i); }));
}

function select(i) {
  completion.sel = i;
  $("complete").querySelectorAll("li").forEach((li, j) => li.classList.toggle("sel", j === i));
}

function choose(i) {
  const s = completion.items[i];
  if (!s) return;
  const input = $("filter");
  const v = input.value;
  const insert = s.value + (s.kind === "operator" || s.kind === "field" ? " " : " ");
  input.value = v.slice(0, completion.from) + insert + v.slice(completion.to).replace(/^\s+/, "");
  const caret = completion.from + insert.length;
  input.setSelectionRange(caret, caret);
  input.focus();
  hideComplete();
  completeTimer = setTimeout(complete, 30);
}

function hideComplete() { $("complete").hidden = true; completion.items = []; }

// ------------------------------------------------------------------ render and refresh

async function render() {
  const gen = ++generation;
  for (const c of charts.values()) c.dispose();
  charts.clear();
  $("main").innerHTML = "";
  $("main").dataset.dashboard = state.d;
  document.title = `${DASHBOARDS.find((d) => d.id === state.d).title} \u00b7 flowscope`;
  updaters = await VIEWS[state.d]();
  if (gen !== generation) return;
  await update();
  schedule();
}

async function update() {
  const gen = generation;
  $("status").textContent = "loading\u2026";
  $("status").className = "";
  const failed = [];
  if (updaters.length) {
    try { await loadPage(gen, failed); } catch (e) { failed.push(e); }
  }
  if (gen !== generation) return;
  const input = $("filter");
  const filterError = failed.find((e) => e.body && e.body.field === "filter");
  input.classList.toggle("bad", !!filterError);
  $("filter-error").hidden = !filterError;
  $("filter-error").textContent = filterError ? filterError.message : "";
  if (failed.length) {
    $("status").textContent = filterError ? "the filter was not understood" : `error: ${failed[0].message}`;
    $("status").className = "err";
  } else {
    $("status").textContent = `${DASHBOARDS.find((d) => d.id === state.d).title} \u00b7 ${rangeText()}`;
  }
  $("updated").textContent = `updated ${timeLabel(Date.now())}`;
  const drawn = performance.now();
  await painted();
  if (gen !== generation) return;
  performance.measure("flowscope:painted", { start: drawn, end: performance.now() });
  $("main").dataset.loaded = String(Number($("main").dataset.loaded || 0) + 1);
}

// One request for the whole page (ui/v1/page): the server computes the panels concurrently
// and sends each as a JSON line when it is ready; each is drawn as it arrives.
async function loadPage(gen, failed) {
  const headers = { Accept: "application/x-ndjson" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const q = params({ d: state.d, page: state.d === "flows" && state.page > 1 ? String(state.page) : undefined });
  performance.clearMeasures(); // a page's last load only: refreshing for hours must not grow them
  const asked = performance.now();
  const resp = await fetch(`${API}page?${q}`, { headers });
  if (!resp.ok) {
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (resp.status === 401) { askToken(); throw new ApiError("a bearer token is required", body); }
    throw new ApiError((body && body.error) || `${resp.status} ${resp.statusText}`, body);
  }
  await chartsLoaded();
  // The charts' instances are made while the server still computes (the page is idle then),
  // so that drawing an answer is only setOption.
  for (const div of document.querySelectorAll("#main [data-chart]")) {
    if (!charts.has(div) && !div.dataset.empty) charts.set(div, echarts.init(div, null, { renderer: "canvas" }));
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const answered = new Set();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (gen !== generation) { reader.cancel(); return; }
    buf += decoder.decode(value || new Uint8Array(), { stream: !done });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = JSON.parse(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
      const u = updaters[line.i];
      if (!u || u.panel !== line.panel) throw new ApiError(`panel ${line.i} of the page is ${line.panel} here but ${u ? u.panel : "nothing"} on the server`);
      answered.add(line.i);
      if (line.error) failed.push(new ApiError(line.error, line));
      else {
        const t = performance.now();
        try { u.show(line.data); } catch (e) { failed.push(e); }
        // where a page's time goes, for benchmarks/ui_dashboards.py and the browser's profiler
        performance.measure(`flowscope:show:${line.i}:${line.panel}`, { start: t, end: performance.now() });
        performance.measure(`flowscope:arrived:${line.i}:${line.panel}`, { start: asked, end: t });
      }
    }
    if (done) break;
  }
  performance.measure("flowscope:data", { start: asked, end: performance.now() });
  if (answered.size !== updaters.length) failed.push(new ApiError(`the page answered ${answered.size} of ${updaters.length} panels`));
}

// ECharts draws on the next animation frame after setOption; a page is loaded once it has.
function painted() {
  return new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
}

function rangeText() {
  if (state.from) return `${new Date(state.from).toLocaleString()} \u2013 ${state.to ? new Date(state.to).toLocaleString() : "now"}`;
  return (RANGES.find(([v]) => v === state.since) || [, `last ${state.since}`])[1].toLowerCase();
}

function schedule() {
  clearInterval(timer);
  const ms = durationMs(state.refresh);
  if (ms > 0) timer = setInterval(() => { if (!document.hidden) update(); }, ms);
}

writeURL(false);
syncControls();
render();
