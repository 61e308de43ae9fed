// The admin page: loads /mirror/ui/state, follows /mirror/ui/events (Server-Sent Events), runs the actions.
// Plain JavaScript, no library, nothing fetched from elsewhere; text always goes in as text (never HTML).
"use strict";
(function () {
  const BASE = "/mirror/ui";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  let models = [];
  let sort = { key: "last_used", descending: true };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(n < 10 ? 1 : 0) : String(n)) + " " + units[i];
  }
  const percent = (r) => (r === null || r === undefined ? "–" : (r * 100).toFixed(1) + " %");
  function ago(iso) {
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    for (const [unit, len] of [["d", 86400], ["h", 3600], ["min", 60]]) {
      if (s >= len) return Math.floor(s / len) + " " + unit + " ago";
    }
    return "just now";
  }

  async function call(path, options) {
    const response = await fetch(BASE + path, Object.assign({ credentials: "same-origin" }, options));
    const text = await response.text();
    let body = {};
    try { body = text ? JSON.parse(text) : {}; } catch (e) { body = { error: text }; }
    if (response.status === 401) { window.location.assign(BASE); }
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function act(action, model) {
    return call("/models/" + action, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ model: model }),
    });
  }

  function say(text, isError) {
    const status = $("action-status");
    status.textContent = text;
    status.classList.toggle("error", !!isError);
  }

  // --- the dashboard ---------------------------------------------------------------------------

  function renderDashboard(state) {
    const cache = state.cache;
    $("summary").textContent = cache.models + (cache.models === 1 ? " model" : " models") + " cached · version " + state.version;
    const bar = $("usage-bar");
    bar.max = cache.cap || 1;
    bar.value = Math.min(cache.used, bar.max);
    $("usage-text").textContent = bytes(cache.used) + " used of " + bytes(cache.cap) + " cap ("
      + percent(cache.cap ? cache.used / cache.cap : null) + ")";
    $("disk-text").textContent = bytes(cache.free) + " free on disk" +
      (cache.partial ? " · " + bytes(cache.partial) + " in partial downloads" : "");
    const t = state.traffic;
    $("hit-ratio").textContent = percent(t.hit_ratio);
    $("served").textContent = bytes(t.served);
    $("fetched").textContent = bytes(t.from_upstream);
    $("saved").textContent = bytes(t.saved);
    const health = $("health");
    health.replaceChildren(el("li", { class: "status-" + state.health.status }, "Overall: " + state.health.status));
    for (const [name, check] of Object.entries(state.health.checks || {})) {
      health.append(el("li", { class: "status-" + check.status }, name.replace(/_/g, " ") + ": " + check.status));
    }
    $("upstreams").replaceChildren(...state.upstreams.map((u) => el("li", {}, u.host + " → " + u.url)));
    const nodesBox = $("nodes-box");
    nodesBox.hidden = !state.cluster;
    if (state.cluster) {
      const nodes = state.cluster.nodes || [];
      $("nodes").replaceChildren(...(state.cluster.error ? [el("li", { class: "error" }, state.cluster.error)]
        : nodes.map((n) => el("li", {}, (n.url || n.node || JSON.stringify(n))))));
    }
    $("chart-interval").textContent = state.history.interval + " s";
    drawChart(state.history.points);
  }

  function drawChart(points) {
    const NS = "http://www.w3.org/2000/svg";
    const width = 600, height = 140, pad = 4;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const total = points.reduce((a, p) => a + p.served, 0), fetched = points.reduce((a, p) => a + p.upstream, 0);
    const label = "Last hour: " + bytes(total) + " served, " + bytes(fetched) + " fetched upstream";
    const title = document.createElementNS(NS, "title");
    title.textContent = label;
    svg.append(title);
    const top = Math.max(1, ...points.map((p) => Math.max(p.served, p.upstream)));
    const step = points.length > 1 ? (width - 2 * pad) / (points.length - 1) : 0;
    for (const key of ["served", "upstream"]) {
      const line = document.createElementNS(NS, "polyline");
      line.setAttribute("class", key);
      line.setAttribute("fill", "none");
      line.setAttribute("stroke-width", "2");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      line.setAttribute("points", points.map((p, i) =>
        (pad + i * step).toFixed(1) + "," + (height - pad - (p[key] / top) * (height - 2 * pad)).toFixed(1)).join(" "));
      svg.append(line);
    }
    if (points.length < 2) {
      $("chart").replaceChildren(el("p", {}, "Collecting samples: the chart starts after the first interval."));
      return;
    }
    $("chart").replaceChildren(svg);
  }

  // --- the models table ------------------------------------------------------------------------

  function renderModels() {
    const filter = $("filter").value.trim().toLowerCase();
    const rows = models.filter((m) => !filter || m.name.toLowerCase().includes(filter));
    const k = sort.key;
    rows.sort((a, b) => {
      const x = a[k], y = b[k];
      const order = typeof x === "string" ? x.localeCompare(y) : (x === y ? 0 : x < y ? -1 : 1);
      return sort.descending ? -order : order;
    });
    for (const th of document.querySelectorAll("#models th[aria-sort]")) {
      const key = th.querySelector("button").dataset.sort;
      th.setAttribute("aria-sort", key === k ? (sort.descending ? "descending" : "ascending") : "none");
    }
    $("models-empty").hidden = models.length > 0;
    $("models").querySelector("tbody").replaceChildren(...rows.map((m) => {
      const pin = el("button", { type: "button", "aria-label": (m.pinned ? "Unpin " : "Pin ") + m.name },
        m.pinned ? "Unpin" : "Pin");
      pin.addEventListener("click", () => run(m.pinned ? "unpin" : "pin", m.id, m.name));
      const del = el("button", { type: "button", class: "danger", "aria-label": "Delete " + m.name }, "Delete");
      del.addEventListener("click", () => confirmDelete(m));
      const refresh = el("button", { type: "button", "aria-label": "Refresh " + m.name }, "Refresh");
      refresh.addEventListener("click", () => run("refresh", m.id, m.name));
      return el("tr", { "data-model": m.name },
        el("th", { scope: "row" }, m.name),
        el("td", { class: "num", "data-bytes": String(m.size) }, bytes(m.size)),
        el("td", {}, el("time", { datetime: m.last_used, title: m.last_used }, ago(m.last_used))),
        el("td", { class: "num" }, String(m.pulls)),
        el("td", {}, m.pinned ? "yes" : "no"),
        el("td", {}, m.private ? "yes" : "no"),
        el("td", { class: "actions" }, pin, refresh, del));
    }));
  }

  function confirmDelete(model) {
    const dialog = $("confirm");
    $("confirm-text").textContent = "Delete " + model.name + " from the cache? Blobs other models use stay.";
    dialog.returnValue = "";
    dialog.addEventListener("close", function once() {
      dialog.removeEventListener("close", once);
      if (dialog.returnValue === "ok") run("delete", model.id, model.name);
    });
    dialog.showModal();
  }

  const DONE = { delete: "Deleted", pin: "Pinned", unpin: "Unpinned", pull: "Prefetching", refresh: "Refreshing" };

  async function run(action, id, label) {
    try {
      await act(action, id);
      say(DONE[action] + " " + label + ".");
    } catch (e) {
      say(label + ": " + e.message, true);
    }
    load();
  }

  // --- live downloads --------------------------------------------------------------------------

  function renderFills(data) {
    $("fills-empty").hidden = data.fills.length > 0;
    $("fills").replaceChildren(...data.fills.map((f) => {
      const name = f.repository + " " + f.digest.slice(7, 19);
      const bar = el("progress", { max: String(f.size || 1), value: String(f.completed), "aria-label": "Progress of " + name });
      return el("li", { "data-digest": f.digest },
        el("div", { class: "what" }, el("strong", {}, name),
          el("span", { class: "numbers" }, bytes(f.completed) + " of " + bytes(f.size) + " · "
            + bytes(f.rate_bytes_per_second) + "/s · " + f.clients + (f.clients === 1 ? " client" : " clients")
            + (f.origin && f.origin !== "upstream" ? " · from " + f.origin : ""))),
        bar);
    }));
    $("errors-empty").hidden = data.errors.length > 0;
    $("errors").replaceChildren(...data.errors.map((e) => el("li", {},
      el("time", { datetime: e.at }, e.at.replace("T", " ").replace("+00:00", "Z")),
      e.kind + (e.subject ? " " + e.subject : "") + ": " + e.message)));
  }

  function follow() {
    const source = new EventSource(BASE + "/events");
    source.addEventListener("fills", (event) => renderFills(JSON.parse(event.data)));
    source.addEventListener("changed", () => load());
  }

  // --- loading ---------------------------------------------------------------------------------

  let loading = null;
  async function load() {
    if (loading) return loading;
    loading = (async () => {
      try {
        const state = await call("/state");
        models = state.models;
        renderDashboard(state);
        renderModels();
        renderFills(state);
      } catch (e) {
        say("Could not load the mirror's state: " + e.message, true);
      } finally {
        loading = null;
      }
    })();
    return loading;
  }

  function pullFromForm(action) {
    const input = $("pull-name");
    const name = input.value.trim();
    if (!name) { input.reportValidity(); return; }
    run(action, name, name);
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const button of document.querySelectorAll("#models th button")) {
      button.addEventListener("click", () => {
        const key = button.dataset.sort;
        sort = { key: key, descending: sort.key === key ? !sort.descending : key !== "name" };
        renderModels();
      });
    }
    $("filter").addEventListener("input", renderModels);
    $("pull-form").addEventListener("submit", (event) => { event.preventDefault(); pullFromForm("pull"); });
    $("refresh-button").addEventListener("click", () => pullFromForm("refresh"));
    const signout = $("signout-form");
    if (signout) {
      signout.addEventListener("submit", async (event) => {
        event.preventDefault();
        await fetch(BASE + "/logout", { method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" });
        window.location.assign(BASE);
      });
    }
    load();
    follow();
    setInterval(load, 30000);  // the chart and the totals; downloads come live through the events
  });
})();
