// keyfleet dashboard: the live part of a group page. Reads the server-sent events of
// /groups/<id>/events (JSON built by the service) and updates counters, member rows, the feed
// and the ack-latency chart. Only text nodes and SVG elements are created: no HTML strings.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live || !window.EventSource) { return; }
  const SVG = "http://www.w3.org/2000/svg";
  const chart = document.getElementById("ack-chart");
  const feed = document.getElementById("ack-feed");
  const status = document.getElementById("live-status");
  let acks = [];   // {device, at, at_ms, time, latency_ms}
  let members = 0;
  let epoch = null;

  function setText(id, value) {
    const el = document.getElementById(id);
    if (el) { el.textContent = String(value); }
  }

  function setStatus(text, cls) {
    status.textContent = text;
    status.className = "badge " + cls;
  }

  function duration(seconds) {
    return seconds < 120 ? seconds + " s" : Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
  }

  // a span in milliseconds as the server prints it (app._fmt_ms): "38 ms", "1.2 s", "2 min 5 s"
  function fmtMs(ms) {
    if (ms === null || ms === undefined) { return "—"; }
    const sign = ms < 0 ? "-" : "", size = Math.abs(ms);
    if (size < 1000) { return sign + size + " ms"; }
    if (size < 60000) {
      const tenths = Math.floor((size + 50) / 100);
      return sign + Math.floor(tenths / 10) + "." + (tenths % 10) + " s";
    }
    return sign + duration(Math.floor(size / 1000));
  }

  function setMs(node, ms) {
    node.textContent = fmtMs(ms);
    if (ms === null || ms === undefined) { node.removeAttribute("data-ms"); } else { node.setAttribute("data-ms", String(ms)); }
  }

  function memberRow(device) {
    return document.getElementById("member-" + device);
  }

  function resetRows(newEpoch) {
    document.querySelectorAll("#members-table tbody tr[data-device]").forEach(function (row) {
      row.className = "waiting";
      row.querySelector("td.ack").textContent = "pending";
      setMs(row.querySelector("td.latency"), null);
    });
    document.querySelectorAll(".epoch-label").forEach(function (el) { el.textContent = String(newEpoch); });
    while (feed.firstChild) { feed.removeChild(feed.firstChild); }
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) { node.textContent = String(text); }
    return node;
  }

  function percentile(sorted, p) {
    if (!sorted.length) { return null; }
    return sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)];
  }

  function draw() {
    while (chart.firstChild) { chart.removeChild(chart.firstChild); }
    const W = 400, H = 200, left = 36, right = 10, top = 10, bottom = 30;
    const latencies = acks.map(function (a) { return a.latency_ms; })
      .filter(function (v) { return v !== null; }).sort(function (a, b) { return a - b; });
    // milliseconds: up to the latest ack (1 s wide while there is none)
    const xmax = latencies.length ? Math.max(1, latencies[latencies.length - 1]) : 1000;
    const ymax = Math.max(1, members, acks.length);
    const x = function (v) { return left + (v / xmax) * (W - left - right); };
    const y = function (v) { return H - bottom - (v / ymax) * (H - top - bottom); };
    chart.appendChild(el("line", {x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, "class": "axis"}));
    chart.appendChild(el("line", {x1: left, y1: top, x2: left, y2: H - bottom, "class": "axis"}));
    chart.appendChild(el("line", {x1: left, y1: y(members), x2: W - right, y2: y(members), "class": "grid-line"}));
    chart.appendChild(el("text", {x: left - 4, y: y(members) + 4, "class": "tick end"}, members));
    chart.appendChild(el("text", {x: left - 4, y: H - bottom + 4, "class": "tick end"}, 0));
    chart.appendChild(el("text", {x: left, y: H - 8, "class": "tick"}, "0 ms"));
    chart.appendChild(el("line", {x1: x(xmax / 2), y1: H - bottom, x2: x(xmax / 2), y2: H - bottom + 4, "class": "axis"}));
    chart.appendChild(el("text", {x: x(xmax / 2), y: H - 8, "class": "tick middle"}, fmtMs(Math.round(xmax / 2))));
    chart.appendChild(el("text", {x: W - right, y: H - 8, "class": "tick end"}, fmtMs(xmax) + " after the commit"));
    let points = [x(0) + "," + y(0)];
    latencies.forEach(function (v, i) {
      points.push(x(v) + "," + y(i));
      points.push(x(v) + "," + y(i + 1));
    });
    chart.appendChild(el("polyline", {points: points.join(" "), "class": "line acks"}));
    latencies.forEach(function (v, i) {
      chart.appendChild(el("circle", {cx: x(v), cy: y(i + 1), r: 3, "class": "ack"}));
    });
    chart.setAttribute("data-acks", String(latencies.length));
    const stats = document.getElementById("latency-stats");
    if (latencies.length) {
      stats.textContent = latencies.length + " of " + members + " acked · median " +
        fmtMs(percentile(latencies, 0.5)) + " · p95 " + fmtMs(percentile(latencies, 0.95)) +
        " · max " + fmtMs(latencies[latencies.length - 1]);
    } else {
      stats.textContent = "no ack for epoch " + epoch + " yet (0 of " + members + ")";
    }
  }

  function details(data) {
    if (data.rekey) {
      setText("rekey-by", data.rekey.operator + " at " + data.rekey.started);
      setText("rekey-result", data.rekey.result);
      setMs(document.getElementById("rekey-duration"), data.rekey.duration_ms);
    }
    const c = data.commit;
    if (!c) { return; }
    setText("epoch-since", c.accepted);
    setText("ack-duration", c.all_acked_in === null ? "—" : c.all_acked_in);
    const body = document.querySelector("#commits tbody");
    if (!body) { return; }
    let row = body.querySelector('tr[data-epoch="' + c.epoch + '"]');
    if (!row) {
      const none = body.querySelector("tr.none");
      if (none) { body.removeChild(none); }
      row = document.createElement("tr");
      row.setAttribute("data-epoch", String(c.epoch));
      const cells = [c.epoch + " → " + (c.epoch + 1), null, c.accepted, "", ""];
      cells.forEach(function (text, i) {
        const td = document.createElement("td");
        if (i === 0) { td.className = "num"; }
        if (i === 3) { td.className = "num acks"; }
        if (i === 4) { td.className = "after"; }
        if (text === null) {
          const a = document.createElement("a");
          a.href = "/devices/" + encodeURIComponent(c.committer);
          a.textContent = c.committer;
          td.appendChild(a);
        } else {
          td.textContent = text;
        }
        row.appendChild(td);
      });
      body.insertBefore(row, body.firstChild);
    }
    row.querySelector("td.acks").textContent = String(c.acks);
    row.querySelector("td.after").textContent = c.last_ack_after === null ? "—" : c.last_ack_after;
  }

  function onProgress(event) {
    const data = JSON.parse(event.data);
    if (data.reset || data.epoch !== epoch) {
      acks = [];
      resetRows(data.epoch);
    }
    epoch = data.epoch;
    members = data.members;
    setText("epoch", data.epoch);
    setText("chart-epoch", data.epoch);
    setText("members", data.members);
    setText("acked", data.acked);
    setText("pending", data.pending);
    data.acks.forEach(function (ack) {
      acks.push(ack);
      const row = memberRow(ack.device);
      if (row) {
        row.className = "acked fresh";
        row.querySelector("td.ack").textContent = ack.time;
        setMs(row.querySelector("td.latency"), ack.latency_ms);
      }
      const item = document.createElement("li");
      item.textContent = ack.device + " acked epoch " + data.epoch + " at " + ack.time +
        (ack.latency_ms === null ? "" : " (" + fmtMs(ack.latency_ms) + " after the commit)");
      item.setAttribute("data-device", ack.device);
      feed.insertBefore(item, feed.firstChild);
    });
    details(data);
    draw();
    setStatus("live", "acked");
  }

  const source = new EventSource(live.getAttribute("data-events"));
  source.addEventListener("progress", onProgress);
  source.addEventListener("gone", function () { setStatus("group gone", "pending"); source.close(); });
  source.onerror = function () { setStatus("reconnecting", "waiting"); };
}());
