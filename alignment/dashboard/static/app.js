// The dashboard page: hash routes over the JSON API of alignment/dashboard/app.py; charts by uPlot.
// Every text from a run (names, prompts, completions) goes in through textContent, never as HTML:
// a model's completion is data, not markup.
"use strict";

const view = document.getElementById("view");
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0598bc", "#e16f24", "#6e7781",
                "#d1242f", "#116329"];
let timer = null;          // the current view's refresh
let charts = [];           // uPlot instances of the current view (destroyed on every redraw)
const selected = new Set(); // runs ticked on the overview, for one chart of several runs

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(url) {
  const response = await fetch(url, {credentials: "same-origin"});
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

const q = encodeURIComponent;
const badge = (state) => el("span", {class: `state state-${state}`, "data-state": state}, state);
const runLink = (path, text) => el("a", {href: `#/run?p=${q(path)}`}, text || path || "(this folder)");

function stamp() {
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function show(...children) {
  for (const chart of charts) chart.destroy();
  charts = [];
  view.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}

function fail(error) {
  show(el("p", {class: "error"}, String(error.message || error)));
}

function textOf(value) {
  // a prompt or completion: a string, or a conversation (list of {role, content})
  if (Array.isArray(value)) {
    if (value.length === 1 && value[0] && typeof value[0] === "object") return String(value[0].content ?? "");
    return value.map((m) => (m && typeof m === "object" ? `${m.role}: ${m.content}` : String(m))).join("\n");
  }
  if (value === null || value === undefined) return "—";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function format(value) {
  if (typeof value !== "number") return textOf(value);
  return Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

// ------------------------------------------------------------------ overview

async function overview() {
  const data = await api("/api/overview");
  document.getElementById("root").textContent = data.root;
  const parts = [el("h1", {}, "Runs")];

  if (data.pipelines.length) {
    parts.push(el("h2", {}, "Pipelines"));
    for (const pipeline of data.pipelines) {
      parts.push(el("div", {class: "card", "data-pipeline": pipeline.path},
        el("div", {}, el("strong", {}, pipeline.path || pipeline.name), " ", badge(pipeline.state)),
        el("div", {class: "stages"}, pipeline.stages.map((stage) =>
          el("span", {class: "stage", title: stage.detail}, runLink(stage.path, stage.name), " ", badge(stage.state)))),
        pipeline.reports.length ? el("div", {}, "evaluation: ",
          pipeline.reports.map((r) => [el("a", {href: `#/report?p=${q(r)}`}, r), " ",
                                       el("a", {href: `#/compare?p=${q(r)}`}, "(side by side)"), " "])) : null));
    }
  }

  parts.push(el("h2", {}, "Run directories"));
  if (!data.runs.length) {
    parts.push(el("p", {class: "muted"}, "No run directories here yet."));
  } else {
    const compare = el("button", {onclick: () => {
      if (selected.size) location.hash = "#/run?" + [...selected].map((p) => `p=${q(p)}`).join("&");
    }}, "Curves of the ticked runs together");
    const rows = data.runs.map((run) => {
      const tick = el("input", {type: "checkbox", checked: selected.has(run.path), onchange: (event) => {
        if (event.target.checked) selected.add(run.path); else selected.delete(run.path);
      }});
      const step = run.last_step === null ? "—" : run.target_steps ? `${run.last_step} / ${run.target_steps}` : String(run.last_step);
      return el("tr", {"data-run": run.path, "data-state": run.state},
        el("td", {}, tick), el("td", {}, runLink(run.path)), el("td", {}, run.stage || "—"),
        el("td", {}, run.model || "—"), el("td", {}, badge(run.state)), el("td", {}, step),
        el("td", {class: "muted"}, run.detail),
        el("td", {}, run.has_metrics ? runLink(run.path, "curves") : null, " ",
           run.completions.length ? el("a", {href: `#/samples?p=${q(run.path)}`}, "samples") : null));
    });
    parts.push(el("div", {class: "controls"}, compare),
      el("table", {id: "runs"}, el("tr", {}, ["", "run", "stage", "model", "state", "step", "detail", "views"]
        .map((h) => el("th", {}, h))), rows));
  }
  parts.push(reportsTable(data.reports));
  show(...parts);
  stamp();
}

function reportsTable(reports) {
  if (!reports.length) return el("p", {class: "muted"}, "No evaluation reports (align eval writes report.json).");
  return el("div", {}, el("h2", {}, "Evaluation reports"),
    el("table", {id: "reports"}, el("tr", {}, ["report", "checkpoints", "created", ""].map((h) => el("th", {}, h))),
      reports.map((r) => el("tr", {"data-report": r.path},
        el("td", {}, el("a", {href: `#/report?p=${q(r.path)}`}, r.path || r.title)),
        el("td", {}, r.checkpoints.join(", ")), el("td", {class: "muted"}, r.created || "—"),
        el("td", {}, el("a", {href: `#/compare?p=${q(r.path)}`}, "side by side"))))));
}

async function reportsView() {
  const data = await api("/api/overview");
  show(el("h1", {}, "Evaluation reports"), reportsTable(data.reports));
  stamp();
}

// ------------------------------------------------------------------ training curves

function seriesOf(records, key) {
  const points = new Map();  // step -> value (a step logged twice keeps its last value)
  records.forEach((record, index) => {
    const value = record[key];
    if (typeof value !== "number" || !Number.isFinite(value)) return;
    const step = typeof record.step === "number" ? record.step : index;
    points.set(step, value);
  });
  return points;
}

function numericKeys(records) {
  const keys = new Set();
  for (const record of records)
    for (const [key, value] of Object.entries(record))
      if (key !== "step" && key !== "time" && typeof value === "number") keys.add(key);
  return [...keys].sort();
}

function drawPanel(container, title, lines) {
  // lines: [{label, points: Map(step -> value)}]; one x axis, the union of their steps
  const steps = [...new Set(lines.flatMap((line) => [...line.points.keys()]))].sort((a, b) => a - b);
  const data = [steps, ...lines.map((line) => steps.map((s) => (line.points.has(s) ? line.points.get(s) : null)))];
  const panel = el("div", {class: "panel", "data-panel": title}, el("h3", {}, title));
  container.append(panel);
  const width = Math.max(320, panel.clientWidth - 16);
  const options = {
    width, height: 240,
    scales: {x: {time: false}},
    // whole steps on the x axis; a y axis wide enough for "-0.0075"
    axes: [{label: "training step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
                                          50000, 100000]},
           {size: 70}],
    series: [{label: "step"}, ...lines.map((line, i) => ({
      label: line.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: {show: steps.length <= 40},
    }))],
  };
  charts.push(new uPlot(options, data, panel));
}

async function curves(paths) {
  const state = paths.map((path) => ({path, records: [], count: 0, run: null}));
  let panels = [];
  let extraKey = null;
  const header = el("div");
  const grid = el("div", {class: "panels", id: "curves"});
  const extra = el("select", {id: "any-metric", onchange: (event) => { extraKey = event.target.value; draw(); }});
  const samplesLinks = el("span");
  show(header, el("div", {class: "controls"}, el("label", {}, "any metric: ", extra), samplesLinks), grid);

  function draw() {
    for (const chart of charts) chart.destroy();
    charts = [];
    grid.replaceChildren();
    const many = state.length > 1;
    let drawn = 0;
    for (const {title, keys} of panels) {
      const lines = [];
      for (const run of state) {
        const key = keys.find((k) => seriesOf(run.records, k).size > 0);
        if (key) lines.push({label: many ? `${run.path}: ${key}` : key, points: seriesOf(run.records, key)});
      }
      if (lines.length) { drawPanel(grid, title, lines); drawn += 1; }
    }
    const all = [...new Set(state.flatMap((run) => numericKeys(run.records)))].sort();
    if (extraKey === null || !all.includes(extraKey)) {
      const inPanels = new Set(panels.flatMap((p) => p.keys));
      // the metric logged at the most steps that no panel draws (a one-off count is a dull first picture)
      const points = (k) => Math.max(...state.map((run) => seriesOf(run.records, k).size));
      const rest = all.filter((k) => !inPanels.has(k));
      extraKey = rest.reduce((best, k) => (best === null || points(k) > points(best) ? k : best), null) || all[0] || null;
    }
    extra.replaceChildren(...all.map((k) => el("option", {value: k, selected: k === extraKey}, k)));
    if (extraKey) {
      drawPanel(grid, extraKey, state.map((run) => ({label: many ? run.path : extraKey,
                                                     points: seriesOf(run.records, extraKey)}))
        .filter((line) => line.points.size));
      drawn += 1;
    }
    if (!drawn) grid.append(el("p", {class: "muted"}, "No metrics logged yet."));
  }

  async function poll() {
    let changed = false;
    for (const run of state) {
      const data = await api(`/api/run?path=${q(run.path)}&since=${run.count}`);
      panels = data.panels;
      if (data.count < run.count) { run.records = []; run.count = 0; changed = true; continue; } // trimmed: resumed
      if (data.records.length) { run.records.push(...data.records); changed = true; }
      run.count = data.count;
      if (!run.run || run.run.state !== data.run.state || run.run.last_step !== data.run.last_step) changed = true;
      run.run = data.run;
    }
    header.replaceChildren(el("h1", {}, paths.length > 1 ? "Training curves" : paths[0] || "(this folder)"),
      ...state.map((run) => el("div", {"data-run": run.path}, many(run), badge(run.run.state), " ",
        el("span", {class: "muted"}, run.run.detail), " ",
        run.run.last_step !== null ? `step ${run.run.last_step}${run.run.target_steps ? " / " + run.run.target_steps : ""}` : "")));
    samplesLinks.replaceChildren(...state.filter((run) => run.run.completions.length).map((run) =>
      el("a", {href: `#/samples?p=${q(run.path)}`}, `sampled completions of ${run.path}`)));
    if (changed) draw();
    stamp();
  }
  const many = (run) => (paths.length > 1 ? el("strong", {}, run.path + " ") : null);
  await poll();
  timer = setInterval(() => poll().catch(fail), 3000);  // live: new lines of metrics.jsonl as the run writes them
}

// ------------------------------------------------------------------ sampled completions per training step

async function samples(path) {
  const data = await api(`/api/completions?path=${q(path)}`);
  const header = el("h1", {}, `Sampled completions: ${path}`);
  if (!data.steps.length) {
    show(header, el("p", {class: "muted"}, "This run logged no sampled completions."));
    return;
  }
  const body = el("div");
  const pick = el("select", {id: "step", onchange: () => render(Number(pick.value))},
    data.steps.map((s) => el("option", {value: s}, `step ${s}`)));
  function render(step) {
    const rows = data.by_step[String(step)] || [];
    const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))]
      .filter((k) => !["step", "prompt", "completion"].includes(k));
    body.replaceChildren(el("p", {class: "muted"}, `${rows.length} completions at step ${step}`),
      el("table", {id: "samples"}, el("tr", {}, ["#", "prompt", "completion", ...columns].map((h) => el("th", {}, h))),
        rows.map((r, i) => el("tr", {}, el("td", {}, i + 1), el("td", {class: "text"}, textOf(r.prompt)),
          el("td", {class: "text"}, textOf(r.completion)), columns.map((c) => el("td", {}, format(r[c])))))));
  }
  pick.value = String(data.steps[data.steps.length - 1]);
  show(header, el("div", {class: "controls"}, el("label", {}, "training step: ", pick), runLink(path, "curves")), body);
  render(Number(pick.value));
  stamp();
}

// ------------------------------------------------------------------ evaluation report and side by side

async function report(path) {
  const data = await api(`/api/report?path=${q(path)}`);
  const url = `/report?path=${q(path)}`;
  show(el("h1", {}, data.title || path),
    el("div", {class: "controls"}, el("a", {href: `#/compare?p=${q(path)}`}, "completions side by side"),
       el("a", {href: url, target: "_blank"}, "open the report on its own")),
    el("iframe", {class: "report", id: "report", src: url, title: "evaluation report", onload: (event) => {
      // as tall as the report (same origin): one scroll bar, the page's
      const frame = event.target;
      frame.style.height = `${frame.contentDocument.documentElement.scrollHeight + 20}px`;
    }}));
  stamp();
}

async function compare(path) {
  const data = await api(`/api/report?path=${q(path)}`);
  const names = Object.keys(data.checkpoints).filter((n) => data.checkpoints[n].samples.length);
  if (!names.length) {
    show(el("h1", {}, data.title || path), el("p", {class: "muted"}, "No checkpoint in this report has samples."));
    return;
  }
  const count = Math.min(...names.map((n) => data.checkpoints[n].samples.length));
  const sample = (n, i) => data.checkpoints[n].samples[i];
  const graded = names.filter((n) => data.checkpoints[n].samples.some((s) => typeof s.correct === "boolean"));
  const filters = Object.fromEntries(names.map((n) => [n, "any"]));
  let differOnly = false;
  let search = "";

  const selects = Object.fromEntries(graded.map((n) => [n, el("select", {"data-filter": n, onchange: (event) => {
    filters[n] = event.target.value; render();
  }}, ["any", "right", "wrong"].map((v) => el("option", {value: v}, v)))]));
  const presets = data.baseline && graded.includes(data.baseline)
    ? graded.filter((n) => n !== data.baseline).map((n) => el("button", {"data-preset": `${n}>${data.baseline}`, onclick: () => {
        for (const m of graded) filters[m] = m === n ? "right" : m === data.baseline ? "wrong" : "any";
        for (const m of graded) selects[m].value = filters[m];
        render();
      }}, `${n} right, ${data.baseline} wrong`))
    : [];
  const summary = el("p", {class: "muted", id: "shown"});
  const table = el("table", {id: "side-by-side"});
  const mismatched = [];
  for (let i = 0; i < count; i++)
    if (names.some((n) => textOf(sample(n, i).prompt) !== textOf(sample(names[0], i).prompt))) mismatched.push(i + 1);

  function render() {
    const rows = [];
    for (let i = 0; i < count; i++) {
      const ok = graded.every((n) => filters[n] === "any" || (filters[n] === "right") === (sample(n, i).correct === true));
      const texts = names.map((n) => textOf(sample(n, i).completion));
      const differ = new Set(texts).size > 1;
      const matches = !search || [textOf(sample(names[0], i).prompt), ...texts].some((t) => t.toLowerCase().includes(search));
      if (!ok || (differOnly && !differ) || !matches) continue;
      const head = sample(names[0], i);
      rows.push(el("tr", {"data-row": i + 1}, el("td", {}, i + 1), el("td", {class: "text"}, textOf(head.prompt)),
        el("td", {class: "text"}, textOf(head.reference)),
        names.map((n) => {
          const s = sample(n, i);
          const verdict = s.correct === true ? "right" : s.correct === false ? "wrong" : null;
          return el("td", {class: `text ${verdict || ""}`, "data-checkpoint": n, "data-verdict": verdict || ""},
            textOf(s.completion), verdict ? el("span", {class: `mark-${verdict}`}, verdict === "right" ? " ✓" : " ✗") : null);
        })));
    }
    summary.textContent = `${rows.length} of ${count} prompts shown`;
    table.replaceChildren(el("tr", {}, ["#", "prompt", "reference", ...names].map((h) => el("th", {}, h))), ...rows);
  }

  show(el("h1", {}, `Side by side: ${data.title || path}`),
    el("p", {class: "muted"}, `The same ${count} prompts for every checkpoint` +
      (data.baseline ? `; baseline ${data.baseline}.` : ".") + " ✓ right, ✗ wrong by the task's rule."),
    mismatched.length ? el("p", {class: "error"}, `the checkpoints' prompts differ at rows ${mismatched.join(", ")}`) : null,
    el("div", {class: "controls"},
      graded.map((n) => el("label", {}, `${n}: `, selects[n])),
      el("label", {}, el("input", {type: "checkbox", id: "differ", onchange: (event) => { differOnly = event.target.checked; render(); }}),
        "only where the completions differ"),
      el("label", {}, "search: ", el("input", {type: "search", id: "search", oninput: (event) => {
        search = event.target.value.toLowerCase(); render(); }}))),
    presets.length ? el("div", {class: "controls"}, "quick filters: ", presets) : null,
    summary, table, el("p", {}, el("a", {href: `#/report?p=${q(path)}`}, "the report")));
  render();
  stamp();
}

// ------------------------------------------------------------------ routes

async function route() {
  clearInterval(timer);
  timer = null;
  const [name, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const paths = params.getAll("p");
  try {
    if (name === "/run" && paths.length) await curves(paths);
    else if (name === "/samples" && paths.length) await samples(paths[0]);
    else if (name === "/report" && paths.length) await report(paths[0]);
    else if (name === "/compare" && paths.length) await compare(paths[0]);
    else if (name === "/reports") await reportsView();
    else {
      await overview();
      timer = setInterval(() => overview().catch(fail), 5000);  // states change while runs train
    }
  } catch (error) {
    fail(error);
  }
}

window.addEventListener("hashchange", route);
route();
// the folder shown in the header, whichever view the page opened on
api("/api/overview").then((data) => { document.getElementById("root").textContent = data.root; }).catch(() => {});
