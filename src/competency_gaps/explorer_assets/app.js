// The Competency Gaps explorer: one static page, no framework, no network. Data files call CG.receive(name, data).
// Safety: every text from the data (benchmark items, responses, labels, tokens) is set with textContent or text
// nodes, never as HTML, so an item containing <script> or <img onerror=…> is shown, not run.
"use strict";

(function () {
  const CG = (window.CG = { data: {}, waiting: {}, timings: {} });
  const ROW_HEIGHT = 28;
  const DEFAULTS = { view: "overview", metric: "model", q: "", sort: "", dir: "", minsup: "0", cls: "", c: "", item: "", cell: "" };
  let state = { ...DEFAULTS };
  let T = null; // the concept table (column-wise)
  let META = null;
  let MAP = null;
  let positionOf = null; // concept id -> row position in T
  let lowerLabels = null;

  CG.receive = function (name, value) {
    CG.data[name] = value;
    const waiting = CG.waiting[name];
    if (waiting) {
      delete CG.waiting[name];
      waiting.forEach((resolve) => resolve(value));
    }
  };

  function load(name, src) {
    if (CG.data[name] !== undefined) return Promise.resolve(CG.data[name]);
    return new Promise((resolve, reject) => {
      const first = !CG.waiting[name];
      (CG.waiting[name] = CG.waiting[name] || []).push(resolve);
      if (!first) return;
      const tag = document.createElement("script");
      tag.src = src;
      tag.onerror = () => reject(new Error("could not load " + src));
      document.body.append(tag);
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // DOM helpers (text only)

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function link(text, patch, cls) {
    return el("a", { href: hashFor(patch), class: cls, onclick: (event) => { event.preventDefault(); go(patch); } }, text);
  }

  function conceptName(id) {
    const label = T.label[positionOf.get(id)];
    return label ? `#${id} ${label}` : `#${id}`;
  }

  function conceptLink(id) {
    return link(conceptName(id), { view: "concept", c: String(id) }, "concept-link");
  }

  // [min, max] of an array without spreading it into arguments (65,536 values overflow the call stack); null if empty.
  function extent(values) {
    if (!values.length) return null;
    let lo = Infinity, hi = -Infinity;
    for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
    return [lo, hi];
  }

  function fmt(value, digits = 3) {
    if (value === null || value === undefined) return "N/A";
    if (Math.abs(value) > 0 && Math.abs(value) < 0.001) return value.toExponential(1);
    return Number(value).toFixed(digits);
  }

  function fmtBench(value) {
    if (value === null || value === undefined) return "N/A";
    if (value === 0) return "missing";
    return Number(value).toPrecision(3);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Colours that mean something: χ_model red (weak) → yellow → green (strong); χ_bench white → blue (log scale),
  // missing red; correlation blue (−1) → white → red (+1); overlap white → teal.

  function mix(a, b, t) {
    return a.map((v, i) => Math.round(v + (b[i] - v) * t));
  }
  function ramp(stops, t) {
    t = Math.min(1, Math.max(0, t));
    const scaled = t * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(scaled));
    return mix(stops[i], stops[i + 1], scaled - i);
  }
  const MODEL_STOPS = [[215, 48, 39], [254, 224, 139], [26, 152, 80]];
  const BENCH_STOPS = [[239, 243, 255], [107, 174, 214], [8, 81, 156]];
  const CORR_STOPS = [[33, 102, 172], [247, 247, 247], [178, 24, 43]];
  const OVERLAP_STOPS = [[247, 252, 250], [102, 194, 164], [0, 88, 36]];
  const GREY = [200, 200, 200];
  const MISSING = [244, 109, 67];
  let benchRange = [1e-6, 1];

  function metricColour(metric, value) {
    if (value === null || value === undefined) return GREY;
    if (metric === "model") return ramp(MODEL_STOPS, value);
    if (value <= 0) return MISSING;
    const [lo, hi] = benchRange;
    return ramp(BENCH_STOPS, (Math.log(value) - Math.log(lo)) / (Math.log(hi) - Math.log(lo) || 1));
  }
  function css(rgb, alpha) {
    return alpha === undefined ? `rgb(${rgb.join(",")})` : `rgba(${rgb.join(",")},${alpha})`;
  }
  function textOn(rgb) {
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 140 ? "#fff" : "#111";
  }

  function legend(metric) {
    const stops = metric === "model" ? MODEL_STOPS : BENCH_STOPS;
    const bar = el("span", { class: "legend-bar" });
    bar.style.background = `linear-gradient(to right, ${stops.map((s) => css(s)).join(",")})`;
    const swatch = (rgb, text) => {
      const box = el("span", { class: "swatch" });
      box.style.background = css(rgb);
      return el("span", { class: "legend-item" }, box, text);
    };
    if (metric === "model") {
      return el("div", { class: "legend" }, "χ_model: ", el("span", {}, "0 (weak)"), bar, el("span", {}, "1 (strong)"),
        swatch(GREY, "N/A: never fires / unscored"));
    }
    return el("div", { class: "legend" }, "χ_bench (log): ", el("span", {}, fmtBench(benchRange[0])), bar,
      el("span", {}, fmtBench(benchRange[1])), swatch(MISSING, "missing: never evoked"));
  }

  // ---------------------------------------------------------------------------------------------------------
  // State in the URL: #view=…&metric=…&q=…; every change is a new history entry or replaces the current one.

  function readState() {
    const params = new URLSearchParams(location.hash.slice(1));
    const next = { ...DEFAULTS };
    for (const key of Object.keys(DEFAULTS)) if (params.has(key)) next[key] = params.get(key);
    if (!["model", "bench"].includes(next.metric)) next.metric = "model";
    return next;
  }

  function hashFor(patch) {
    const next = { ...state, ...patch };
    const params = new URLSearchParams();
    for (const key of Object.keys(DEFAULTS)) if (next[key] !== DEFAULTS[key] && next[key] !== "") params.set(key, next[key]);
    return "#" + params.toString();
  }

  function go(patch, replace) {
    const hash = hashFor(patch);
    if (replace) history.replaceState(null, "", hash);
    else history.pushState(null, "", hash);
    const previous = state;
    state = readState();
    render(previous);
  }

  window.addEventListener("popstate", () => { const previous = state; state = readState(); render(previous); });
  window.addEventListener("hashchange", () => { const previous = state; state = readState(); render(previous); });

  // ---------------------------------------------------------------------------------------------------------
  // Start

  function start() {
    META = CG.data.meta;
    T = CG.data.table;
    MAP = CG.data.map;
    if (!META || !T || !MAP) {
      document.getElementById("main").replaceChildren(el("p", { class: "error" },
        "The explorer's data files (data/meta.js, data/table.js, data/map.js) did not load."));
      return;
    }
    positionOf = new Map(T.concept.map((id, i) => [id, i]));
    lowerLabels = T.label.map((label) => label.toLowerCase());
    const positive = extent(T.chi_bench.filter((v) => v !== null && v > 0));
    if (positive) benchRange = positive;
    document.getElementById("title").textContent = `Competency Gaps — model ${META.model}, layer ${META.layer}`;
    document.title = `Competency Gaps — ${META.model}, layer ${META.layer}`;
    // The run's other explorers: results/explorer/sites.js, two folders up (absent when this site stands alone).
    load("sites", "../../sites.js").then(renderSiblings, () => {});
    document.querySelectorAll("#metric button").forEach((button) =>
      button.addEventListener("click", () => go({ metric: button.dataset.metric })));
    document.querySelectorAll("#views a").forEach((a) =>
      a.addEventListener("click", (event) => { event.preventDefault(); go({ view: a.dataset.view }); }));
    state = readState();
    render(null);
  }

  function renderSiblings(sites) {
    const others = sites.filter((s) => !(s.model === META.model && String(s.layer) === String(META.layer)));
    if (!others.length) return;
    document.getElementById("siblings").replaceChildren(el("span", {}, "Also: ",
      others.map((s) => [el("a", { href: "../../" + s.href }, `${s.model} / layer ${s.layer}`), " "])));
  }

  function render(previous) {
    const began = performance.now();
    document.querySelectorAll("#metric button").forEach((b) => b.classList.toggle("active", b.dataset.metric === state.metric));
    document.querySelectorAll("#views a").forEach((a) => a.classList.toggle("active", a.dataset.view === state.view));
    const sameView = previous && previous.view === state.view;
    const main = document.getElementById("main");
    hideTooltip();
    if (state.view === "concepts" && sameView && tableView.mounted) tableView.update();
    else if (state.view === "map" && sameView && mapView.mounted) mapView.draw();
    else {
      tableView.mounted = false;
      mapView.mounted = false;
      main.replaceChildren();
      const views = { overview: renderOverview, concepts: renderTable, concept: renderConcept, map: renderMap,
        heatmaps: renderHeatmaps, item: renderItem };
      (views[state.view] || renderOverview)(main);
    }
    CG.timings.render = performance.now() - began;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Overview

  function renderOverview(main) {
    const sae = META.sae;
    const facts = [
      ["model", META.model], ["SAE", sae.source], ["SAE layer / hook", `${sae.layer} (${sae.hook_name || "?"})`],
      ["SAE width", `${sae.d_sae} concepts on d_model ${sae.d_in}`],
      ["SAE quality", `explained variance ${fmt(sae.explained_variance)}, L0 ${fmt(sae.l0, 1)}, dead ${fmt(100 * (sae.dead_fraction || 0), 1)} %`],
      ["concepts", `${META.n_concepts} (${META.n_live} live)`],
      ["ranking of weakest concepts", META.thresholds.ranking || "chi_model"],
    ];
    main.append(el("section", { class: "card" }, el("h2", { text: "Model and SAE" }),
      el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]))));

    const maxMissing = Math.max(1, ...META.benchmarks.map((b) => b.missing_percent || 0));
    const rows = META.benchmarks.map((b) => {
      const bar = el("span", { class: "bar" });
      bar.style.width = `${(100 * (b.missing_percent || 0)) / maxMissing}%`;
      return el("tr", {}, el("td", { text: b.name }), el("td", { text: b.category }), el("td", { class: "num", text: b.n_items }),
        el("td", { class: "num", text: b.n_scored ?? "" }), el("td", { class: "num", text: b.accuracy === null ? "N/A" : fmt(b.accuracy) }),
        el("td", { class: "num", text: b.covered }), el("td", { class: "num" }, el("span", { class: "barbox" }, bar), ` ${fmt(b.missing_percent, 1)} %`));
    });
    main.append(el("section", { class: "card" }, el("h2", { text: "Benchmarks" }),
      el("table", { class: "plain" }, el("thead", {}, el("tr", {}, ["benchmark", "category", "items", "scored", "mean score",
        "concepts covered", "missing concepts"].map((h) => el("th", { text: h })))), el("tbody", {}, rows))));

    const values = (state.metric === "model" ? T.chi_model : T.chi_bench).filter((v) => v !== null && (state.metric === "model" || v > 0));
    const canvas = el("canvas", { class: "histogram", width: 720, height: 260, "aria-label": "histogram" });
    main.append(el("section", { class: "card" },
      el("h2", { text: state.metric === "model" ? "Distribution of χ_model over concepts (all benchmarks)" :
        "Distribution of χ_bench over covered concepts (all benchmarks, log scale)" }), canvas, legend(state.metric)));
    drawHistogram(canvas, values, state.metric);
  }

  function drawHistogram(canvas, values, metric) {
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, left = 50, bottom = 36, top = 10, right = 24;
    const transform = metric === "model" ? (v) => v : (v) => Math.log10(v);
    const xs = values.map(transform);
    if (!xs.length) { ctx.fillText("no values", W / 2 - 20, H / 2); return; }
    const [lo, hi] = metric === "model" ? [0, 1] : extent(xs);
    const n = 40, counts = new Array(n).fill(0);
    xs.forEach((x) => counts[Math.min(n - 1, Math.max(0, Math.floor(((x - lo) / (hi - lo || 1)) * n)))]++);
    const peak = Math.max(...counts);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    const bw = (W - left - right) / n;
    counts.forEach((c, i) => {
      const centre = lo + ((i + 0.5) / n) * (hi - lo);
      ctx.fillStyle = css(metricColour(metric, metric === "model" ? centre : Math.pow(10, centre)));
      const h = ((H - top - bottom) * c) / peak;
      ctx.fillRect(left + i * bw + 1, H - bottom - h, bw - 2, h);
    });
    ctx.strokeStyle = "#444"; ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, H - bottom); ctx.lineTo(W - right, H - bottom); ctx.stroke();
    ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.textAlign = "center";
    for (let k = 0; k <= 4; k++) {
      const x = lo + (k / 4) * (hi - lo);
      ctx.fillText(metric === "model" ? x.toFixed(2) : Math.pow(10, x).toPrecision(2), left + (k / 4) * (W - left - right), H - bottom + 16);
    }
    ctx.fillText(metric === "model" ? "χ_model" : "χ_bench (log scale)", (W + left) / 2, H - 4);
    ctx.textAlign = "right";
    ctx.fillText(String(peak), left - 6, top + 10);
    ctx.fillText("0", left - 6, H - bottom);
    ctx.save(); ctx.translate(14, (H - bottom) / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center"; ctx.fillText("concepts", 0, 0); ctx.restore();
  }

  // ---------------------------------------------------------------------------------------------------------
  // Concept table: filtered and sorted index arrays, rows drawn only where the viewport is (virtual scrolling).

  const tableView = { mounted: false };

  function columns(metric) {
    const per = T.per_benchmark[metric];
    const cols = [
      { key: "id", title: "#", width: 64, value: (i) => T.concept[i], text: (i) => String(T.concept[i]) },
      { key: "label", title: "label", width: 300, value: (i) => lowerLabels[i], text: (i) => T.label[i] || "(no label)", cls: "label" },
      { key: "overall", title: metric === "model" ? "χ_model (all)" : "χ_bench (all)", width: 90,
        value: (i) => (metric === "model" ? T.chi_model : T.chi_bench)[i],
        text: (i) => (metric === "model" ? fmt(T.chi_model[i]) : fmtBench(T.chi_bench[i])),
        colour: (i) => metricColour(metric, (metric === "model" ? T.chi_model : T.chi_bench)[i]) },
    ];
    if (metric === "model") {
      cols.push({ key: "rank", title: "rank (1 = weakest)", width: 92, value: (i) => T.rank[i], text: (i) => String(T.rank[i]),
        tip: `position in the support-aware ranking of the weakest-concept lists (${T.rank_column})` });
    }
    cols.push({ key: "support", title: "support", width: 72, value: (i) => T.support[i], text: (i) => String(T.support[i]) });
    cols.push({ key: "class", title: "coverage", width: 84, value: (i) => T.classification[i], text: (i) => T.classification[i] });
    META.benchmarks.forEach((b, j) => cols.push({
      key: "b" + j, title: b.name, width: 96, value: (i) => per[j][i],
      text: (i) => (metric === "model" ? fmt(per[j][i]) : fmtBench(per[j][i])),
      colour: (i) => metricColour(metric, per[j][i]),
      tip: `${b.name} (${b.category}): ${metric === "model" ? "χ_model" : "χ_bench"} in this benchmark`,
    }));
    return cols;
  }

  function defaultSort(metric) {
    return metric === "model" ? ["rank", "asc"] : ["overall", "asc"];
  }

  function filteredOrder(cols) {
    const q = state.q.trim().toLowerCase();
    const idQuery = /^#?\d+$/.test(q) ? Number(q.replace("#", "")) : null;
    const minSupport = Number(state.minsup) || 0;
    const keep = [];
    for (let i = 0; i < T.concept.length; i++) {
      if (minSupport && T.support[i] < minSupport) continue;
      if (state.cls && T.classification[i] !== state.cls) continue;
      if (q && !(idQuery !== null ? T.concept[i] === idQuery : lowerLabels[i].includes(q))) continue;
      keep.push(i);
    }
    const [defaultKey, defaultDir] = defaultSort(state.metric);
    const key = cols.some((c) => c.key === state.sort) ? state.sort : defaultKey;
    const dir = state.dir || (key === state.sort ? "asc" : defaultDir);
    const col = cols.find((c) => c.key === key);
    const values = new Array(T.concept.length);
    keep.forEach((i) => { values[i] = col.value(i); });
    const sign = dir === "desc" ? -1 : 1;
    keep.sort((a, b) => {
      const x = values[a], y = values[b];
      if (x === y) return T.concept[a] - T.concept[b];
      if (x === null || x === undefined) return 1; // N/A last in either direction
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    return { rows: keep, key, dir };
  }

  function renderTable(main) {
    const search = el("input", { type: "search", id: "search", placeholder: "search id or label", value: state.q,
      "aria-label": "search concepts by id or label" });
    search.addEventListener("input", () => go({ q: search.value }, true));
    const minsup = el("input", { type: "number", id: "minsup", min: "0", value: state.minsup, "aria-label": "minimum support" });
    minsup.addEventListener("change", () => go({ minsup: minsup.value || "0" }, true));
    const cls = el("select", { id: "cls", "aria-label": "coverage class" },
      [["", "all concepts"], ["missing", "missing"], ["under", "under-covered"], ["normal", "normal"], ["over", "over-covered"]]
        .map(([v, t]) => el("option", { value: v, selected: state.cls === v ? "selected" : null }, t)));
    cls.addEventListener("change", () => go({ cls: cls.value }, true));
    const count = el("span", { id: "count", class: "count" });
    const scroller = el("div", { class: "table-scroll", id: "table" });
    const legendBox = el("div", { id: "table-legend" });
    main.append(el("section", { class: "controls" }, search, el("label", {}, "min support ", minsup),
      el("label", {}, "coverage ", cls), count), legendBox, scroller);
    tableView.mounted = true;
    tableView.update = () => updateTable(scroller, count, legendBox);
    scroller.addEventListener("scroll", () => requestAnimationFrame(() => drawRows(scroller)));
    window.onresize = () => tableView.mounted && drawRows(scroller);
    tableView.update();
  }

  function updateTable(scroller, count, legendBox) {
    const began = performance.now();
    const cols = columns(state.metric);
    const { rows, key, dir } = filteredOrder(cols);
    tableView.cols = cols;
    tableView.rows = rows;
    const template = cols.map((c) => `${c.width}px`).join(" ");
    const header = el("div", { class: "row head", role: "row" }, cols.map((c) => {
      const mark = c.key === key ? (dir === "desc" ? " ▼" : " ▲") : "";
      const cell = el("button", { class: "cell", role: "columnheader", "data-key": c.key, title: c.tip || `sort by ${c.title}` }, c.title + mark);
      cell.addEventListener("click", () => go({ sort: c.key, dir: c.key === key && dir === "asc" ? "desc" : "asc" }, true));
      return cell;
    }));
    header.style.gridTemplateColumns = template;
    const body = el("div", { class: "body", role: "rowgroup" });
    body.style.height = `${rows.length * ROW_HEIGHT}px`;
    const width = cols.reduce((s, c) => s + c.width, 0);
    const inner = el("div", { class: "table-inner", role: "table" }, header, body);
    inner.style.width = `${width}px`;
    scroller.replaceChildren(inner);
    tableView.body = body;
    tableView.template = template;
    count.textContent = `${rows.length.toLocaleString("en")} of ${T.concept.length.toLocaleString("en")} concepts`;
    legendBox.replaceChildren(legend(state.metric));
    drawRows(scroller);
    CG.timings.table = performance.now() - began;
  }

  function drawRows(scroller) {
    const { rows, cols, body, template } = tableView;
    if (!body) return;
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_HEIGHT) - 10);
    const last = Math.min(rows.length, first + Math.ceil(scroller.clientHeight / ROW_HEIGHT) + 20);
    const fragment = document.createDocumentFragment();
    for (let r = first; r < last; r++) {
      const i = rows[r];
      const row = el("div", { class: "row", role: "row", "data-concept": T.concept[i], tabindex: "0" });
      row.style.top = `${r * ROW_HEIGHT}px`;
      row.style.gridTemplateColumns = template;
      cols.forEach((c) => {
        const cell = el("div", { class: "cell " + (c.cls || ""), role: "cell" }, c.text(i));
        if (c.colour) {
          const rgb = c.colour(i);
          cell.style.background = css(rgb);
          cell.style.color = textOn(rgb);
        }
        if (c.key === "label") cell.title = T.label[i];
        else if (c.key.startsWith("b")) cell.title = `${c.title}: support ${T.per_benchmark.support[Number(c.key.slice(1))][i]} items`;
        row.append(cell);
      });
      const open = () => go({ view: "concept", c: String(T.concept[i]) });
      row.addEventListener("click", open);
      row.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
      fragment.append(row);
    }
    body.replaceChildren(fragment);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Concept detail

  function tokens(tokenList, acts) {
    const peak = Math.max(1e-9, ...acts.map((a) => a || 0));
    return el("div", { class: "context" }, tokenList.map((token, k) => {
      const act = acts[k] || 0;
      const span = el("span", { class: act > 0 ? "tok on" : "tok" }, token.replace(/\n/g, "⏎"));
      if (act > 0) {
        span.style.background = `rgba(255, 127, 14, ${(0.15 + (0.85 * act) / peak).toFixed(3)})`;
        span.title = `activation ${act.toFixed(2)}`;
      }
      return span;
    }));
  }

  function chips(title, list) {
    if (!list || !list.length) return null;
    return el("div", { class: "chips" }, el("span", { class: "chips-title" }, title), list.map((t) => el("code", {}, t)));
  }

  async function renderConcept(main) {
    const id = Number(state.c);
    const position = positionOf.get(id);
    if (position === undefined) { main.append(el("p", { class: "error" }, `No concept #${state.c} in this explorer.`)); return; }
    main.append(el("p", { class: "loading" }, "Loading concept…"));
    const shard = Math.floor(position / META.shard_size);
    let record;
    try {
      record = (await load(`concepts:${shard}`, `data/concepts/${shard}.js`))[String(id)];
    } catch (error) {
      main.replaceChildren(el("p", { class: "error" }, String(error.message)));
      return;
    }
    if (state.view !== "concept" || Number(state.c) !== id) return; // navigated away while loading
    const metric = state.metric;
    const head = el("section", { class: "card concept-head" },
      el("h2", { id: "concept-title" }, `#${id} `, el("span", { class: "label" }, record.label || "(no label)")),
      el("p", { class: "muted" }, `label: ${record.label_source || "none"}`,
        record.detection !== null ? `, detection score ${fmt(record.detection, 2)}` : "",
        record.n_detection ? ` on ${record.n_detection} held-out contexts` : "",
        record.live === false ? " — dead: fired on nothing that was read" : ""),
      el("p", {}, `χ_model ${fmt(T.chi_model[position])} [${fmt(T.chi_model_lo[position])}, ${fmt(T.chi_model_hi[position])}]`,
        ` · rank ${T.rank[position]} of ${T.concept.length} (${T.rank_column} ${fmt(T.rank_score[position], 4)}) · χ_bench ${fmtBench(T.chi_bench[position])}`,
        ` · support ${T.support[position]} items · ESS ${fmt(T.ess[position], 1)} · coverage ${T.classification[position]}`),
      chips("fires on", record.firing), chips("promotes", record.promoted), chips("suppresses", record.suppressed),
      el("p", {}, link("show on the map", { view: "map", c: String(id) })));
    const perBench = el("table", { class: "plain" },
      el("thead", {}, el("tr", {}, ["benchmark", "χ_model", "CI", "adjusted", "support", "ESS", "χ_bench"].map((h) =>
        el("th", { text: h, class: (metric === "model" && h === "χ_model") || (metric === "bench" && h === "χ_bench") ? "current" : null })))),
      el("tbody", {}, record.benchmarks.map((row) => {
        const value = metric === "model" ? row.chi_model : row.chi_bench;
        const rgb = metricColour(metric, value);
        const cell = el("td", { class: "num" }, metric === "model" ? fmt(row.chi_model) : fmtBench(row.chi_bench));
        cell.style.background = css(rgb); cell.style.color = textOn(rgb);
        const other = el("td", { class: "num" }, metric === "model" ? fmtBench(row.chi_bench) : fmt(row.chi_model));
        return el("tr", {}, el("td", { text: META.benchmarks[row.b].name }),
          metric === "model" ? cell : el("td", { class: "num" }, fmt(row.chi_model)),
          el("td", { class: "num" }, row.chi_model === null || row.lo === null ? "" : `[${fmt(row.lo)}, ${fmt(row.hi)}]`),
          el("td", { class: "num" }, fmt(row.adjusted)), el("td", { class: "num" }, String(row.support)),
          el("td", { class: "num" }, fmt(row.ess, 1)), metric === "bench" ? cell : other);
      })));
    const contexts = el("section", { class: "card" }, el("h3", { text: "Top contexts in the SAE corpus" }),
      record.contexts.length ? record.contexts.map((c) => tokens(c.tokens, c.acts)) : el("p", { class: "muted" }, "none read"));
    const examples = el("section", { class: "card", id: "examples" },
      el("h3", { text: "Example items: the worst- and best-scored among the items this concept fires on most" }));
    const byBench = new Map();
    record.examples.forEach((e) => { if (!byBench.has(e.b)) byBench.set(e.b, []); byBench.get(e.b).push(e); });
    if (!byBench.size) examples.append(el("p", { class: "muted" }, "No scored item among this concept's top contexts."));
    for (const [b, list] of byBench) {
      examples.append(el("h4", { text: META.benchmarks[b].name }), ...list.map((e) => el("div", { class: `example ${e.side}` },
        el("div", { class: "example-head" }, el("span", { class: "side" }, e.side === "worst" ? "worst" : "best"),
          ` score ${fmt(e.score, 2)} · saliency ${fmt(e.saliency, 3)} · `, link(e.item, { view: "item", item: e.item }, "item-link")),
        tokens(e.tokens, e.acts))));
    }
    main.replaceChildren(head, el("section", { class: "card" }, el("h3", { text: "Per benchmark" }), perBench), contexts, examples);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Item view

  async function renderItem(main) {
    main.append(el("p", { class: "loading" }, "Loading item…"));
    const wanted = state.item;
    let record;
    try {
      const index = await load("item_index", "data/item_index.js");
      const shard = index[wanted];
      if (shard === undefined) throw new Error(`No item ${wanted} in this explorer.`);
      record = (await load(`items:${shard}`, `data/items/${shard}.js`))[wanted];
    } catch (error) {
      main.replaceChildren(el("p", { class: "error" }, String(error.message)));
      return;
    }
    if (state.view !== "item" || state.item !== wanted) return;
    main.replaceChildren(el("section", { class: "card", id: "item" },
      el("h2", {}, `Item ${record.id}`),
      el("p", { class: "muted" }, `${META.benchmarks[record.b].name} · score ${fmt(record.score, 2)}`),
      el("h3", { text: "Prompt" }), el("pre", { class: "prompt" }, record.prompt),
      el("h3", { text: "Gold answer" }), el("pre", {}, record.gold ?? "(none)"),
      el("h3", { text: "Model response" }), el("pre", { class: "response" }, record.response ?? "(no response recorded)"),
      el("h3", { text: "Top concepts by saliency" }),
      el("ol", { class: "top-concepts" }, record.top.map(([c, s, share]) =>
        el("li", {}, conceptLink(c), ` — saliency ${fmt(s, 3)} (${fmt(100 * share, 1)} % of the item's)`)))));
  }

  // ---------------------------------------------------------------------------------------------------------
  // Concept map: points drawn into an ImageData buffer (65,536 in a few ms), hulls and names on top.

  const mapView = { mounted: false };

  function renderMap(main) {
    const canvas = el("canvas", { id: "map", "aria-label": "concept map" });
    const info = el("p", { class: "muted" }, "UMAP of the SAE's decoder directions; clusters outlined and named by their " +
      "most characteristic label words. Drag to pan, wheel to zoom, hover for the label, click to open a concept.");
    main.append(el("section", { class: "map-wrap" }, el("div", { id: "map-legend" }), info, canvas));
    mapView.mounted = true;
    mapView.canvas = canvas;
    const [x0, x1] = extent(MAP.x.filter((v) => v !== null)) || [0, 1];
    const [y0, y1] = extent(MAP.y.filter((v) => v !== null)) || [0, 1];
    mapView.bounds = [x0, x1, y0, y1];
    buildGrid();
    mapView.view = null;
    mapView.colours = null;
    mapView.draw = drawMap;
    attachMapEvents(canvas);
    drawMap();
  }

  function fitView(width, height) {
    const [x0, x1, y0, y1] = mapView.bounds;
    const scale = 0.92 * Math.min(width / (x1 - x0 || 1), height / (y1 - y0 || 1));
    return { scale, tx: width / 2 - scale * (x0 + x1) / 2, ty: height / 2 + scale * (y0 + y1) / 2 };
  }

  function toScreen(x, y) {
    const v = mapView.view;
    return [v.tx + v.scale * x, v.ty - v.scale * y];
  }

  function buildGrid() {
    const [x0, x1, y0, y1] = mapView.bounds;
    const n = 128, cells = new Map();
    const cw = (x1 - x0 || 1) / n, ch = (y1 - y0 || 1) / n;
    MAP.x.forEach((x, k) => {
      if (x === null) return;
      const key = Math.floor((x - x0) / cw) * 100003 + Math.floor((MAP.y[k] - y0) / ch);
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(k);
    });
    mapView.grid = { cells, cw, ch, x0, y0 };
  }

  function nearest(px, py, radius) {
    const v = mapView.view, g = mapView.grid;
    const x = (px - v.tx) / v.scale, y = (v.ty - py) / v.scale, r = radius / v.scale;
    let best = -1, bestD = r * r;
    const gx0 = Math.floor((x - r - g.x0) / g.cw), gx1 = Math.floor((x + r - g.x0) / g.cw);
    const gy0 = Math.floor((y - r - g.y0) / g.ch), gy1 = Math.floor((y + r - g.y0) / g.ch);
    for (let gx = gx0; gx <= gx1; gx++) for (let gy = gy0; gy <= gy1; gy++) {
      for (const k of g.cells.get(gx * 100003 + gy) || []) {
        const d = (MAP.x[k] - x) ** 2 + (MAP.y[k] - y) ** 2;
        if (d <= bestD) { bestD = d; best = k; }
      }
    }
    return best;
  }

  function drawMap() {
    const began = performance.now();
    const canvas = mapView.canvas;
    const dpr = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr);
    }
    if (!mapView.view) mapView.view = fitView(width, height);
    const metric = state.metric;
    const colours = pointColours(metric);
    const ctx = canvas.getContext("2d");
    if (!mapView.image || mapView.image.width !== canvas.width || mapView.image.height !== canvas.height) {
      mapView.image = ctx.createImageData(canvas.width, canvas.height);
    }
    const image = mapView.image;
    const pixels = image.data;
    pixels.fill(255);
    // Points as large as the count allows: a few dozen concepts stay visible, 65,536 do not smear into one blob.
    const base = MAP.x.length < 2000 ? 5 : MAP.x.length < 20000 ? 3 : 2;
    const size = Math.max(2, Math.round(base * dpr));
    const v = mapView.view, w = canvas.width, h = canvas.height;
    for (let k = 0; k < MAP.x.length; k++) {
      const x = MAP.x[k];
      if (x === null) continue;
      const px = Math.round((v.tx + v.scale * x) * dpr - size / 2), py = Math.round((v.ty - v.scale * MAP.y[k]) * dpr - size / 2);
      if (px < 0 || py < 0 || px >= w - size || py >= h - size) continue;
      const r = colours[3 * k], g = colours[3 * k + 1], b = colours[3 * k + 2];
      for (let dy = 0; dy < size; dy++) {
        let o = ((py + dy) * w + px) * 4;
        for (let dx = 0; dx < size; dx++, o += 4) { pixels[o] = r; pixels[o + 1] = g; pixels[o + 2] = b; }
      }
    }
    ctx.putImageData(image, 0, 0);
    ctx.save();
    ctx.scale(dpr, dpr);
    ctx.lineWidth = 1;
    ctx.strokeStyle = "rgba(40, 40, 40, 0.45)";
    MAP.clusters.forEach((c) => {
      if (c.hull.length < 3) return;
      ctx.beginPath();
      c.hull.forEach(([x, y], i) => { const [sx, sy] = toScreen(x, y); i ? ctx.lineTo(sx, sy) : ctx.moveTo(sx, sy); });
      ctx.closePath();
      ctx.stroke();
    });
    ctx.font = "12px sans-serif";
    ctx.textAlign = "center";
    ctx.lineJoin = "round";
    MAP.clusters.forEach((c) => {
      const [sx, sy] = toScreen(c.x, c.y);
      ctx.lineWidth = 3; ctx.strokeStyle = "rgba(255,255,255,0.9)"; ctx.strokeText(c.name, sx, sy);
      ctx.fillStyle = "#111"; ctx.fillText(c.name, sx, sy);
    });
    const selected = state.c !== "" ? Number(state.c) : null;
    if (selected !== null && MAP.x[selected] !== undefined && MAP.x[selected] !== null) {
      const [sx, sy] = toScreen(MAP.x[selected], MAP.y[selected]);
      ctx.lineWidth = 2; ctx.strokeStyle = "#000"; ctx.beginPath(); ctx.arc(sx, sy, 8, 0, 2 * Math.PI); ctx.stroke();
    }
    ctx.restore();
    document.getElementById("map-legend").replaceChildren(legend(metric));
    CG.timings.map = performance.now() - began;
  }

  // Each point's colour for a metric, computed once (not per frame): panning and zooming only move pixels.
  function pointColours(metric) {
    if (mapView.colours && mapView.colours.metric === metric) return mapView.colours.rgb;
    const values = metric === "model" ? T.chi_model : T.chi_bench;
    const rgb = new Uint8ClampedArray(3 * MAP.x.length);
    for (let k = 0; k < MAP.x.length; k++) {
      const position = positionOf.get(k);
      rgb.set(metricColour(metric, position === undefined ? null : values[position]), 3 * k);
    }
    mapView.colours = { metric, rgb };
    return rgb;
  }

  function attachMapEvents(canvas) {
    let drag = null, moved = false;
    canvas.addEventListener("mousedown", (event) => { drag = [event.clientX, event.clientY]; moved = false; });
    window.onmouseup = (event) => {
      if (!drag || !mapView.mounted) return;
      const wasDrag = moved;
      drag = null;
      if (wasDrag) return;
      const box = canvas.getBoundingClientRect();
      const k = nearest(event.clientX - box.left, event.clientY - box.top, 6);
      if (k >= 0) go({ view: "concept", c: String(k) });
    };
    canvas.addEventListener("mousemove", (event) => {
      const box = canvas.getBoundingClientRect();
      if (drag) {
        const dx = event.clientX - drag[0], dy = event.clientY - drag[1];
        if (Math.abs(dx) + Math.abs(dy) > 2) moved = true;
        if (moved) {
          mapView.view.tx += dx; mapView.view.ty += dy; drag = [event.clientX, event.clientY];
          hideTooltip();
          requestDraw();
        }
        return;
      }
      const k = nearest(event.clientX - box.left, event.clientY - box.top, 6);
      if (k < 0) { hideTooltip(); return; }
      const position = positionOf.get(k);
      const value = position === undefined ? null : (state.metric === "model" ? T.chi_model : T.chi_bench)[position];
      showTooltip(event.clientX, event.clientY, `${conceptName(k)} — ${state.metric === "model" ? "χ_model " + fmt(value) : "χ_bench " + fmtBench(value)}`);
    });
    canvas.addEventListener("mouseleave", hideTooltip);
    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      const box = canvas.getBoundingClientRect();
      const px = event.clientX - box.left, py = event.clientY - box.top;
      const factor = Math.exp(-event.deltaY * 0.0015);
      const v = mapView.view;
      v.tx = px - (px - v.tx) * factor; v.ty = py - (py - v.ty) * factor; v.scale *= factor;
      requestDraw();
    }, { passive: false });
  }

  let drawPending = false;
  function requestDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => { drawPending = false; if (mapView.mounted) drawMap(); });
  }

  CG.mapScreenPosition = function (id) {
    if (!mapView.mounted || MAP.x[id] === null || MAP.x[id] === undefined) return null;
    const [sx, sy] = toScreen(MAP.x[id], MAP.y[id]);
    const box = mapView.canvas.getBoundingClientRect();
    return { x: box.left + sx + 1, y: box.top + sy + 1 };
  };

  function showTooltip(x, y, text) {
    const tip = document.getElementById("tooltip");
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = `${x + 12}px`;
    tip.style.top = `${y + 12}px`;
  }
  function hideTooltip() {
    const tip = document.getElementById("tooltip");
    if (tip) tip.hidden = true;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Heatmaps: cells are buttons; a click lists the concepts behind the cell.

  function heatmap(kind, title, matrix, stops, lo, hi, caption) {
    const names = META.benchmarks.map((b) => b.name);
    const grid = el("div", { class: "heatmap", role: "grid", "data-kind": kind });
    grid.style.gridTemplateColumns = `140px repeat(${names.length}, minmax(44px, 1fr))`;
    grid.append(el("div", { class: "hm-corner" }));
    names.forEach((n) => grid.append(el("div", { class: "hm-col", title: n }, n)));
    names.forEach((rowName, i) => {
      grid.append(el("div", { class: "hm-row", title: rowName }, rowName));
      names.forEach((colName, j) => {
        const value = matrix[i][j];
        const rgb = value === null ? GREY : ramp(stops, (value - lo) / (hi - lo));
        const cell = el("button", { class: "hm-cell", "data-cell": `${kind}:${i},${j}`,
          title: `${rowName} × ${colName}: ${value === null ? "undefined" : value.toFixed(3)}` }, value === null ? "–" : value.toFixed(2));
        cell.style.background = css(rgb);
        cell.style.color = textOn(rgb);
        if (state.cell === `${kind}:${i},${j}`) cell.classList.add("selected");
        if (i !== j) cell.addEventListener("click", () => go({ cell: `${kind}:${i},${j}` }, true));
        grid.append(cell);
      });
    });
    return el("section", { class: "card" }, el("h2", { text: title }), el("p", { class: "muted" }, caption), grid);
  }

  function renderHeatmaps(main) {
    const metric = state.metric;
    const corr = META.correlation[metric];
    const label = metric === "model" ? "χ_model" : "χ_bench";
    main.append(el("div", { class: "heatmaps" },
      heatmap("corr", `Cross-benchmark correlation of ${label}`, corr.r, CORR_STOPS, -1, 1,
        `Pearson r over the concepts active in both benchmarks (blue −1, white 0, red +1; – undefined: a constant column or fewer than 10 shared concepts). Click a cell for the concepts that drive it.`),
      heatmap("overlap", "Benchmark overlap (Jaccard of covered concepts)", META.overlap.jaccard, OVERLAP_STOPS, 0, 1,
        "Share of the concepts either benchmark evokes that both evoke. Click a cell for shared and unshared concepts.")));
    const match = /^(corr|overlap):(\d+),(\d+)$/.exec(state.cell);
    if (!match) return;
    const [, kind, i, j] = match;
    const a = META.benchmarks[i].name, b = META.benchmarks[j].name;
    const list = (ids, column) => el("ol", { class: "drivers" }, ids.map((id) => {
      const position = positionOf.get(id);
      const per = T.per_benchmark[column];
      const values = column === "model" ? `${fmt(per[i][position])} / ${fmt(per[j][position])}` :
        `${fmtBench(per[i][position])} / ${fmtBench(per[j][position])}`;
      return el("li", {}, conceptLink(id), el("span", { class: "muted" }, `  (${a} / ${b}: ${values})`));
    }));
    const panel = el("section", { class: "card", id: "drivers" });
    if (kind === "corr") {
      panel.append(el("h3", { text: `${a} × ${b}: r = ${fmt(corr.r[i][j], 3)} over ${corr.n[i][j]} concepts` }),
        el("p", { class: "muted" }, "The concepts contributing most to the correlation (largest products of standardised values):"),
        list(corr.drivers[i][j], metric));
    } else {
      panel.append(el("h3", { text: `${a} × ${b}: Jaccard ${fmt(META.overlap.jaccard[i][j], 3)}` }),
        el("h4", { text: "Covered by both (largest smaller χ_bench first)" }), list(META.overlap.shared[i][j], "bench"),
        el("h4", { text: `Covered by ${a} only` }), list(META.overlap.only[i][j], "bench"),
        el("h4", { text: `Covered by ${b} only` }), list(META.overlap.only[j][i], "bench"));
    }
    main.append(panel);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
