// The dashboard's script: fetches the summary every refresh and redraws the page's numbers,
// tables and charts from it. The page is whole without it; it never writes anything.
"use strict";

(function () {
  const body = document.body;
  const summaryUrl = body.dataset.summary;
  const base = body.dataset.base;
  const refreshMs = Math.max(250, Number(body.dataset.refreshMs) || 2000);
  const charts = {};

  // The same text the server renders.
  const time = (ms) => new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
  const clock = (ms) => new Date(ms).toISOString().slice(11, 19);
  const opt = (v) => (v === null || v === undefined ? "-" : String(v));
  const percent = (share) => (share * 100).toFixed(1) + " %";

  function setText(id, text) {
    const el = document.getElementById(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function fill(tableId, items, build) {
    const tbody = document.querySelector("#" + tableId + " tbody");
    if (!tbody) return;
    const rows = items.map((item) => {
      const tr = document.createElement("tr");
      build(tr, item);
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  function counters(s) {
    const c = s.counters;
    setText("applied", c ? String(c.applied) : "-");
    setText("duplicates", c ? String(c.duplicates) : "-");
    setText("duplicate-rate", c ? percent(c.duplicate_rate) : "-");
    setText("conflicts", c ? String(c.conflicts) : "-");
    setText("conflict-rate", c ? percent(c.conflict_rate) : "-");
    setText("dead-letters-total", String(s.dead_letters.total));
    setText("total-lag", opt(s.total_lag));
  }

  function partitions(s) {
    fill("partitions", s.partitions, (tr, p) => {
      const id = p.topic + "-" + p.partition;
      tr.id = "partition-" + id;
      cell(tr, p.topic);
      cell(tr, String(p.partition), "num");
      for (const field of ["next_offset", "epoch", "committed_offset", "high_watermark", "lag"]) {
        cell(tr, opt(p[field]), "num").id = id + "-" + field;
      }
    });
    setText(
      "no-partitions",
      s.partitions.length === 0
        ? "The store has no partition of group " + s.group +
            " yet: its consumer has not been assigned one, or the group is another."
        : ""
    );
    const b = s.broker;
    setText(
      "broker",
      b.state === "not_configured"
        ? "No broker configured: the Kafka columns stay empty."
        : b.state === "failed"
          ? "The broker: " + b.message
          : ""
    );
  }

  function deadLetters(s) {
    for (const r of s.dead_letters.by_reason) setText("reason-" + r.reason, String(r.count));
    fill("letters", s.dead_letters.latest, (tr, d) => {
      const td = document.createElement("td");
      const a = document.createElement("a");
      const id = d.topic + "/" + d.partition + "/" + d.offset;
      a.href = base + "dead-letters/" + encodeURIComponent(d.topic) + "/" + d.partition + "/" + d.offset;
      a.textContent = id;
      td.appendChild(a);
      tr.appendChild(td);
      cell(tr, d.key === null ? "-" : d.key);
      cell(tr, d.reason);
      cell(tr, d.message, "message");
      cell(tr, time(d.failed_at_ms));
    });
  }

  function audit(s) {
    fill("audit", s.audit, (tr, r) => {
      tr.id = "audit-" + r.id;
      cell(tr, time(r.at_ms));
      cell(tr, r.who);
      cell(tr, r.command);
      cell(tr, JSON.stringify(r.counts), "message");
    });
  }

  const palette = {
    applied: "#2e7d32",
    duplicates: "#1565c0",
    conflicts: "#ef6c00",
    dead_lettered: "#c62828",
  };

  function drawRates(s) {
    const canvas = document.getElementById("rates-chart");
    if (!canvas || typeof Chart === "undefined") return;
    const labels = s.rates.map((p) => clock(p.at_ms));
    const series = ["applied", "duplicates", "conflicts", "dead_lettered"];
    if (!charts.rates) {
      charts.rates = new Chart(canvas, {
        type: "line",
        data: {
          labels,
          datasets: series.map((name) => ({
            label: name.replace("_", " ") + " / s",
            data: s.rates.map((p) => p[name]),
            borderColor: palette[name],
            backgroundColor: palette[name],
            pointRadius: 0,
            tension: 0.2,
          })),
        },
        options: {
          animation: false,
          maintainAspectRatio: false,
          interaction: { mode: "index", intersect: false },
          scales: { y: { beginAtZero: true } },
        },
      });
    } else {
      charts.rates.data.labels = labels;
      series.forEach((name, i) => {
        charts.rates.data.datasets[i].data = s.rates.map((p) => p[name]);
      });
      charts.rates.update("none");
    }
  }

  function drawReasons(s) {
    const canvas = document.getElementById("reasons-chart");
    if (!canvas || typeof Chart === "undefined") return;
    const labels = s.dead_letters.by_reason.map((r) => r.reason.replace("_", " "));
    const counts = s.dead_letters.by_reason.map((r) => r.count);
    if (!charts.reasons) {
      charts.reasons = new Chart(canvas, {
        type: "bar",
        data: {
          labels,
          datasets: [{ label: "dead letters", data: counts, backgroundColor: "#c62828" }],
        },
        options: {
          animation: false,
          maintainAspectRatio: false,
          indexAxis: "y",
          plugins: { legend: { display: false } },
          scales: { x: { beginAtZero: true, ticks: { precision: 0 } } },
        },
      });
    } else {
      charts.reasons.data.datasets[0].data = counts;
      charts.reasons.update("none");
    }
  }

  function render(s) {
    setText("group", s.group);
    setText("taken-at", time(s.taken_at_ms));
    counters(s);
    partitions(s);
    deadLetters(s);
    audit(s);
    drawRates(s);
    drawReasons(s);
    body.dataset.charts = String(Object.keys(charts).length);
  }

  async function tick() {
    try {
      const response = await fetch(summaryUrl, { cache: "no-store" });
      const s = await response.json();
      if (!response.ok) throw new Error(s.error || response.statusText);
      render(s);
      setText("status", "");
      body.dataset.polls = String(Number(body.dataset.polls) + 1);
    } catch (e) {
      setText("status", "· the last refresh failed: " + e.message);
    }
    setTimeout(tick, refreshMs);
  }

  tick();
})();
