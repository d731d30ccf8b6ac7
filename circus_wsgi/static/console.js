// The circus-wsgi console page: renders /api/status and /api/history, follows
// /api/events (server-sent events), draws the plots in plain SVG and sends the
// actions as POSTs carrying the page's CSRF token. No library.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const WINDOW = 15 * 60;  // seconds of history the plots show
  const GAP = 6;  // seconds between two points past which the line breaks
  const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#1098ad"];
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  let points = [];
  let latest = null;

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    return node;
  }

  function age(seconds) {
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    const hours = Math.floor(seconds / 3600);
    return hours + " h " + Math.floor((seconds % 3600) / 60) + " min";
  }

  function megabytes(bytes) {
    return (bytes / 1048576).toFixed(1) + " MiB";
  }

  function number(value, digits) {
    if (value === null || value === undefined) return "–";
    return Number(value).toFixed(digits);
  }

  function millis(seconds) {
    return seconds === null || seconds === undefined ? "–" : number(seconds * 1000, 1) + " ms";
  }

  function tick(value) {
    if (Number.isInteger(value) || value >= 10) return value.toFixed(0);
    return String(Number(value.toFixed(2)));
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // ---------------------------------------------------------------- actions

  async function act(label, path, body) {
    const outcome = document.getElementById("outcome");
    outcome.className = "pending";
    outcome.textContent = label + " …";
    document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      const reply = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
        body: JSON.stringify(body || {}),
      });
      const answer = await reply.json().catch(() => ({error: reply.statusText}));
      if (reply.ok && answer.ok) {
        outcome.className = "done";
        outcome.textContent = label + ": " + answer.done;
      } else {
        outcome.className = "failed";
        outcome.textContent = label + " failed (" + reply.status + "): " + answer.error;
      }
    } catch (error) {
      outcome.className = "failed";
      outcome.textContent = label + " failed: " + error;
    } finally {
      document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    }
  }

  function wireButtons() {
    document.querySelectorAll("#steer button[data-action]").forEach((button) => {
      button.addEventListener("click", () => act(button.textContent, button.dataset.action));
    });
    // The field follows circus's count until the operator types in it, and again once
    // the count typed has been sent.
    const field = document.getElementById("worker-count");
    field.addEventListener("input", () => { field.dataset.edited = "yes"; });
    document.getElementById("set-count").addEventListener("click", async () => {
      const count = Number(field.value);
      await act("Set count to " + count, "/api/workers/count", {count: count});
      delete field.dataset.edited;
    });
    document.querySelector("#workers tbody").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-verb]");
      if (!button) return;
      const pid = button.closest("tr").dataset.pid;
      const verb = button.dataset.verb;
      act((verb === "kill" ? "Kill worker " : "Stop worker ") + pid,
          "/api/workers/" + pid + "/" + verb);
    });
  }

  // ---------------------------------------------------------------- tables

  function slowness(seconds) {
    return seconds >= 10 ? "stuck" : seconds >= 1 ? "slow" : "";
  }

  function renderWorkers(workers) {
    fill(document.querySelector("#workers tbody"), workers.map((worker) => {
      const running = worker.running || [];
      const requests = running.length
        ? el("span", {}, ...running.map((r) => el("span", {class: "request " + slowness(r.seconds)},
            ...(r.method ? [el("b", {}, r.method), " " + r.path + " "]
              : ["(taken before the dispatcher restarted) "]),
            el("span", {class: "seconds"}, number(r.seconds, 1) + " s"))))
        : el("span", {class: "muted"}, worker.state === "busy" ? "(between requests)" : "–");
      return el("tr", {"data-pid": worker.pid, "data-state": worker.state},
        el("td", {}, worker.wid === null ? "–" : worker.wid),
        el("td", {class: "pid"}, worker.pid),
        el("td", {}, el("span", {class: "state " + worker.state}, worker.state)),
        el("td", {class: "running"}, requests),
        el("td", {}, worker.holding),
        el("td", {}, worker.completed),
        el("td", {class: "row-actions"},
          el("button", {type: "button", title: "SIGTERM: finish what it holds, then exit",
                        "data-verb": "stop"}, "Stop"),
          el("button", {type: "button", title: "SIGKILL: what it runs gets 502",
                        class: "danger", "data-verb": "kill"}, "Kill")));
    }));
  }

  function renderWatchers(watchers) {
    fill(document.querySelector("#watchers tbody"), watchers.map((w) =>
      el("tr", {"data-watcher": w.name},
        el("td", {}, w.name), el("td", {}, el("span", {class: "state " + w.status}, w.status)),
        el("td", {class: "processes"}, w.processes), el("td", {}, w.wanted === null ? "–" : w.wanted))));
  }

  function renderProcesses(processes) {
    fill(document.querySelector("#processes tbody"), processes.map((p) =>
      el("tr", {"data-pid": p.pid},
        el("td", {}, p.watcher), el("td", {}, p.wid), el("td", {class: "pid"}, p.pid),
        el("td", {}, age(p.age)), el("td", {}, number(p.cpu, 1)), el("td", {}, megabytes(p.rss)))));
  }

  function renderDecisions(decisions) {
    const list = document.getElementById("decisions");
    if (!decisions.length) {
      list.replaceChildren(el("li", {class: "muted"}, "none yet"));
      return;
    }
    list.replaceChildren(...decisions.slice(0, 12).map((d) =>
      el("li", {"data-by": d.by},
        el("time", {}, new Date(d.at * 1000).toLocaleTimeString()), " ",
        el("b", {}, d.by), " ", el("span", {class: "tag"}, d.action), " ",
        el("span", {class: "muted"}, d.reason), el("div", {class: "detail"}, d.detail))));
  }

  function renderSummary(status) {
    const d = status.dispatcher;
    const set = (id, text) => { document.getElementById(id).textContent = text; };
    if (!d) {
      ["queue", "in-flight", "worker-states", "totals"].forEach((id) => set(id, "–"));
    } else {
      set("queue", d.queue + (d.queue ? " (oldest " + number(d.oldest_wait, 2) + " s)" : ""));
      set("in-flight", d.in_flight);
      set("worker-states", d.busy_workers + " / " + d.idle_workers + " / " + d.leaving_workers);
      const failed = Object.values(d.failures).reduce((a, b) => a + b, 0);
      set("totals", d.completed + " / " + failed);
    }
    const last = points.length ? points[points.length - 1] : null;
    set("rate-now", last && last.rate !== null ? number(last.rate, 1) : "–");
    set("latency-now", last ? millis(last.p50) + " / " + millis(last.p99) : "–");
    const count = document.getElementById("worker-count");
    const wanted = status.watchers.find((w) => w.name === "workers");
    if (!count.dataset.edited && document.activeElement !== count && wanted &&
        wanted.wanted !== null) {
      count.value = wanted.wanted;
    }
  }

  function render(status) {
    latest = status;
    const badge = document.getElementById("connection");
    const dispatched = status.watchers.some((w) => w.name === "dispatcher");
    if (status.dispatcher === null && dispatched) {
      badge.textContent = "dispatcher not answering";
      badge.className = "badge warn";
    } else if (!status.circus) {
      badge.textContent = "circusd busy";
      badge.className = "badge warn";
    } else {
      badge.textContent = "live";
      badge.className = "badge ok";
    }
    document.getElementById("updated").textContent =
      "updated " + new Date(status.at * 1000).toLocaleTimeString();
    renderSummary(status);
    renderWorkers(status.workers);
    renderWatchers(status.watchers);
    renderProcesses(status.processes);
    renderDecisions(status.decisions);
  }

  // ---------------------------------------------------------------- plots

  function niceCeiling(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * power) return step * power;
    }
    return 10 * power;
  }

  // series: [{name, color, values: [[at, value|null], ...]}]
  function drawPlot(container, series) {
    const W = 480, H = 170, L = 44, R = 8, T = 8, B = 22;
    const now = latest ? latest.at : Date.now() / 1000;
    const start = now - WINDOW;
    let top = 0;
    for (const s of series) for (const [, v] of s.values) if (v !== null && v > top) top = v;
    top = niceCeiling(top);
    const x = (at) => L + (at - start) / WINDOW * (W - L - R);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const plot = svg("svg", {viewBox: "0 0 " + W + " " + H, class: "chart", role: "img"});
    for (const fraction of [0, 0.5, 1]) {
      const level = top * fraction;
      plot.append(svg("line", {x1: L, x2: W - R, y1: y(level), y2: y(level), class: "grid"}));
      const label = svg("text", {x: L - 4, y: y(level) + 4, class: "axis", "text-anchor": "end"});
      label.textContent = tick(level);
      plot.append(label);
    }
    for (const minutes of [15, 10, 5, 0]) {
      const label = svg("text", {x: x(now - minutes * 60), y: H - 6, class: "axis",
                                 "text-anchor": minutes === 15 ? "start" : minutes ? "middle" : "end"});
      label.textContent = minutes ? "−" + minutes + " min" : "now";
      plot.append(label);
    }
    let drawn = 0;
    let last = null;
    for (const s of series) {
      let d = "", previous = null;
      for (const [at, value] of s.values) {
        if (at < start || value === null) { previous = null; continue; }
        const command = previous !== null && at - previous <= GAP ? "L" : "M";
        d += command + x(at).toFixed(1) + "," + y(value).toFixed(1);
        previous = at;
        drawn += 1;
        last = value;
      }
      if (d) plot.append(svg("path", {d: d, stroke: s.color, class: "line", "data-series": s.name}));
    }
    plot.setAttribute("data-points", drawn);
    plot.setAttribute("data-latest", last === null ? "" : last);
    const legend = el("div", {class: "legend"}, ...series.map((s) =>
      el("span", {}, el("i", {class: "swatch", "data-color": s.color}), s.name)));
    legend.querySelectorAll("i.swatch").forEach((i) => { i.style.background = i.dataset.color; });
    container.querySelectorAll("svg, .legend, .empty").forEach((n) => n.remove());
    container.append(plot);
    if (series.length > 1 || series.some((s) => s.legend)) container.append(legend);
    if (!drawn) container.append(el("p", {class: "empty muted"}, "no data yet"));
  }

  function drawPlots() {
    const of = (key) => points.map((p) => [p.at, p[key]]);
    drawPlot(document.getElementById("plot-rate"),
      [{name: "requests/s", color: COLORS[0], values: of("rate")}]);
    drawPlot(document.getElementById("plot-latency"), [
      {name: "p50", color: COLORS[0], values: points.map((p) => [p.at, p.p50 === null ? null : p.p50 * 1000])},
      {name: "p99", color: COLORS[1], values: points.map((p) => [p.at, p.p99 === null ? null : p.p99 * 1000])},
    ]);
    const reasons = [...new Set(points.flatMap((p) => Object.keys(p.errors)))].sort();
    const errors = reasons.map((reason, i) => ({
      name: reason, color: COLORS[(i + 1) % COLORS.length], legend: true,
      values: points.map((p) => [p.at, p.rate === null ? null : p.errors[reason] || 0]),
    }));
    drawPlot(document.getElementById("plot-errors"), errors.length ? errors
      : [{name: "5xx/s", color: COLORS[1], values: points.map((p) => [p.at, p.rate === null ? null : 0])}]);
    drawPlot(document.getElementById("plot-queue"),
      [{name: "queued", color: COLORS[2], values: of("queue")}]);
  }

  // ---------------------------------------------------------------- live

  function loggedOut() {
    const badge = document.getElementById("connection");
    badge.textContent = "logged out: open the console's URL (with ?token=) again";
    badge.className = "badge bad";
  }

  function follow() {
    const events = new EventSource("/api/events");
    events.addEventListener("status", (event) => {
      const news = JSON.parse(event.data);
      if (news.point && (!points.length || news.point.at > points[points.length - 1].at)) {
        points.push(news.point);
        while (points.length && points[0].at < news.point.at - WINDOW) points.shift();
      }
      render(news.status);
      drawPlots();
    });
    events.addEventListener("error", () => {
      if (events.readyState === EventSource.CLOSED) {
        fetch("/api/status", {credentials: "same-origin"}).then((reply) => {
          if (reply.status === 401) loggedOut();
          else setTimeout(follow, 2000);
        }, () => setTimeout(follow, 2000));
      } else {
        const badge = document.getElementById("connection");
        badge.textContent = "reconnecting";
        badge.className = "badge warn";
      }
    });
  }

  async function begin() {
    wireButtons();
    const [status, history] = await Promise.all([
      fetch("/api/status", {credentials: "same-origin"}),
      fetch("/api/history", {credentials: "same-origin"}),
    ]);
    if (status.status === 401) { loggedOut(); return; }
    points = (await history.json()).points;
    const view = await status.json();
    if (view.at) render(view);
    drawPlots();
    follow();
  }

  document.addEventListener("DOMContentLoaded", begin);
})();
