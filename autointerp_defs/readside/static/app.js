// The latent browser's pages, rendered from the JSON API. Vanilla JS, no external assets.
"use strict";

const main = document.getElementById("main");
const params = new URLSearchParams(location.search);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  return String(v);
}

// A GET of the API, or with `body` a POST of it as JSON (steering: the one request that costs the model's time).
async function api(path, body) {
  const res = body === undefined ? await fetch(path)
    : await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await res.json();
  if (!res.ok) throw Object.assign(new Error(data.error || res.statusText), { retryAfter: res.headers.get("Retry-After") });
  return data;
}

function showError(err) {
  main.replaceChildren(el("p", { class: "error", id: "error" }, err.message));
}

function crumbs(...parts) {
  document.getElementById("crumbs").replaceChildren(...parts.flatMap((p) => [" / ", p]));
}

// Three kinds of verdict: "informative", "cannot tell: …" (too few latents to decide: neutral) and "uninformative: …".
function verdictSpan(text) {
  const t = text || "";
  const kind = t.startsWith("informative") ? "informative" : t.startsWith("cannot tell") ? "cannot-tell" : "uninformative";
  return el("span", { class: `verdict-${kind}`, title: t }, t);
}

// A value with its 95 % interval: the numbers, and a bar (the whisker from lo to hi, a dot at the value) on an axis
// from min(0, lo) to max(1, hi), with a tick at 0 when the axis holds negative values (a gap).
function withInterval(value, interval) {
  const [lo, hi] = interval || [];
  if (value === null || value === undefined) return "–";
  if (lo === null || lo === undefined || hi === null || hi === undefined) return fmt(value);
  const from = Math.min(0, lo), to = Math.max(1, hi), at = (x) => `${(100 * (x - from)) / (to - from)}%`;
  return el("span", { class: "with-interval" }, fmt(value),
    el("span", { class: "interval muted" }, ` [${fmt(lo)}, ${fmt(hi)}]`),
    el("span", { class: "errorbar", "data-lo": lo, "data-hi": hi, title: `95 % interval [${fmt(lo)}, ${fmt(hi)}]` },
      from < 0 ? el("span", { class: "zero", style: `left: ${at(0)}` }) : null,
      el("span", { class: "whisker", style: `left: ${at(lo)}; width: calc(${at(hi)} - ${at(lo)})` }),
      el("span", { class: "dot", style: `left: ${at(value)}` })));
}

// Sort a rendered table in the page (for small tables: the coders).
function sortableTable(headers, rows, values) {
  const table = el("table", { class: "sortable" });
  const head = el("tr", {}, headers.map((h, i) => el("th", { "data-col": i, onclick: () => sortBy(i) }, h)));
  const body = el("tbody");
  let state = { col: -1, asc: true };
  function render() { body.replaceChildren(...rows.map((r) => r.node)); }
  function sortBy(i) {
    state = { col: i, asc: state.col === i ? !state.asc : false };
    rows.sort((a, b) => {
      const x = a.values[i], y = b.values[i];
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * (state.asc ? 1 : -1);
    });
    head.querySelectorAll("th").forEach((th, j) => { th.className = j === i ? (state.asc ? "sorted-asc" : "sorted-desc") : ""; });
    render();
  }
  table.append(el("thead", {}, head), body);
  render();
  return table;
}

// ---- coders ------------------------------------------------------------------------------------

async function codersPage() {
  const data = await api("/api/coders");
  crumbs("coders");
  if (!data.coders.length) {
    main.replaceChildren(el("p", {}, "No coder with cached activations under this data root yet. Run `make demo`, or materialize `activations`."));
    return;
  }
  const scorers = data.scorers.map((s) => s.name);
  const headers = ["coder", "width", "dead fraction", "mean L0", "FVU", "dead", "too rare", "awaiting exemplars", "explained", "failed", ...scorers.flatMap((s) => [`${s} (${data.scorers.find((x) => x.name === s).main_metric ?? "unknown"})`, `${s} control`, `${s} gap`, `${s} verdict`])];
  const rows = data.coders.map((c) => {
    // every latent in one bucket: width = dead + too rare + awaiting exemplars + explained + failed
    const a = c.accounting || {};
    const values = [c.coder, c.width, c.dead_fraction, c.mean_l0, c.fvu, a.dead, a.too_rare, a.awaiting_exemplars, a.explained ?? c.explained, a.failed,
      ...scorers.flatMap((s) => { const r = c.scorers[s] || {}; return [r.mean, r.control, r.gap, r.verdict]; })];
    const why = { 5: "never fired in the cached corpus", 7: "fired, in shards without exemplars yet",
      6: `fired in fewer activating windows than [exemplars] min_activating_windows = ${(a.min_activating_windows || []).join(" or ") || "not recorded"}`,
      9: Object.entries(a.failed_by_reason || {}).map(([reason, n]) => `${n}: ${reason}`).join("\n") || null };
    const node = el("tr", { "data-coder": c.coder },
      el("td", {}, el("a", { href: c.url }, c.coder)),
      values.slice(1, 10).map((v, i) => el("td", { class: "num", title: why[i + 1], "data-bucket": i >= 4 ? headers[i + 1] : null }, fmt(v))),
      scorers.flatMap((s) => { const r = c.scorers[s] || {}; return [el("td", { class: "num", "data-scorer": s, "data-part": "mean" }, withInterval(r.mean, r.mean_interval)), el("td", { class: "num" }, fmt(r.control)),
        el("td", { class: "num", "data-scorer": s, "data-part": "gap" }, withInterval(r.gap, r.gap_interval)), el("td", {}, r.verdict ? verdictSpan(r.verdict) : "–",
          r.calibration ? el("div", { class: "muted calibration", "data-scorer": s }, r.calibration) : "")]; }));
    return { node, values };
  });
  main.replaceChildren(el("h1", {}, "Sparse coders"),
    el("p", { class: "muted" }, "Every latent is in one bucket: width = dead + too rare + awaiting exemplars + explained + failed (hover a count for its definition, or the failures' reasons). Each scorer's mean main metric beside its control's (the same scorer with another latent's explanation), both over the latents that have a control, and the mean gap between them; the bars and brackets are 95 % intervals over the latents. Below a verdict, the judge's calibration card: what it made of latents whose truth is planted (autointerp calibrate). Click a header to sort."),
    el("div", { class: "table-wrap" }, sortableTable(headers, rows)));
}

// ---- latents of a coder ------------------------------------------------------------------------

async function coderPage() {
  const coder = params.get("coder") || "";
  crumbs(el("a", { href: location.pathname + "?coder=" + encodeURIComponent(coder) }, coder));
  const state = Object.fromEntries(params.entries());
  state.page = state.page || "1";

  const search = el("input", { type: "text", id: "search", placeholder: "search explanations (semantic)", value: state.q || "" });
  const status = el("select", { id: "status" }, ["", "ok", "failed", "none"].map((s) => el("option", { value: s }, s ? `status: ${s}` : "any status")));
  status.value = state.status || "";
  const filterCol = el("select", { id: "filter-col" });
  const filterMin = el("input", { type: "text", class: "num", id: "filter-min", placeholder: "min" });
  const filterMax = el("input", { type: "text", class: "num", id: "filter-max", placeholder: "max" });
  const apply = el("button", { id: "apply", onclick: () => { readControls(); state.page = "1"; load(); } }, "Apply");
  const clear = el("button", { id: "clear", onclick: () => { for (const k of Object.keys(state)) if (k !== "coder") delete state[k]; state.page = "1"; search.value = ""; status.value = ""; filterMin.value = ""; filterMax.value = ""; load(); } }, "Clear");
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") apply.click(); });
  const summary = el("p", { id: "summary", class: "muted" });
  const table = el("table", { id: "latents" });
  const pager = el("div", { class: "pager" });
  main.replaceChildren(el("h1", {}, `Latents of ${coder}`), el("div", { class: "controls" }, search, status, "filter", filterCol, filterMin, filterMax, apply, clear), summary,
    el("div", { class: "table-wrap" }, table), pager);

  function readControls() {
    for (const k of Object.keys(state)) if (k.startsWith("min_") || k.startsWith("max_")) delete state[k];
    state.q = search.value.trim();
    state.status = status.value;
    if (filterCol.value && filterMin.value !== "") state["min_" + filterCol.value] = filterMin.value;
    if (filterCol.value && filterMax.value !== "") state["max_" + filterCol.value] = filterMax.value;
    if (state.q && !state.sort) delete state.sort;
  }

  async function load() {
    const query = new URLSearchParams(Object.entries(state).filter(([, v]) => v !== "" && v !== undefined));
    history.replaceState(null, "", "?" + query.toString());
    document.body.dataset.ready = "0";
    try { await render(query); } finally { document.body.dataset.ready = "1"; }
  }

  async function render(query) {
    let data;
    try { data = await api("/api/latents?" + query.toString()); } catch (err) { summary.replaceChildren(el("span", { class: "error", id: "error" }, err.message)); return; }
    const numeric = data.columns.filter((c) => !["latent", "shard", "status", "explanation"].includes(c));
    if (!filterCol.options.length) {
      filterCol.replaceChildren(...numeric.map((c) => el("option", { value: c }, c)));
      const active = Object.keys(state).find((k) => k.startsWith("min_") || k.startsWith("max_"));
      if (active) { filterCol.value = active.slice(4); filterMin.value = state["min_" + active.slice(4)] || ""; filterMax.value = state["max_" + active.slice(4)] || ""; }
    }
    const sortedBy = data.sort === "status" ? "explained first" : `${data.sort} (${data.order})`;
    const severalSenses = data.several_senses && state.min_senses !== "2"
      ? el("button", { id: "several-senses", onclick: () => { filterCol.value = "senses"; filterMin.value = "2"; filterMax.value = ""; apply.click(); } }, `only the ${data.several_senses} with several senses`) : "";
    summary.replaceChildren(`${data.total} latents${state.q ? ` matching “${state.q}”` : ""}, page ${data.page} of ${data.pages}, sorted by ${sortedBy} `, severalSenses,
      data.search_note ? el("div", { id: "search-note" }, data.search_note) : "");
    const lowest = (s) => (data.several_senses && s.scores_senses ? [`${s.name}_min_sense`] : []);  // only where a latent has several senses
    const shown = ["latent", "status", "explanation", "senses", "frequency", "max_activation", ...data.scorers.flatMap((s) => [s.name, `${s.name}_lo`, `${s.name}_control`, `${s.name}_gap`, ...lowest(s)]), "mean_gap"].concat(data.columns.includes("distance") ? ["distance"] : []);
    const head = el("tr", {}, shown.map((c) => {
      const low = c.endsWith("_lo") ? `the 95 % interval's lower bound of ${c.slice(0, -3)}: sort by it to rank latents by what their score surely reaches` : null;
      const th = el("th", { "data-col": c, title: low, onclick: () => { state.order = state.sort === c && state.order === "desc" ? "asc" : "desc"; state.sort = c; state.page = "1"; load(); } }, c.endsWith("_lo") ? `${c.slice(0, -3).replaceAll("_", " ")} lower bound` : c.replaceAll("_", " "));
      if (c === data.sort) th.className = data.order === "asc" ? "sorted-asc" : "sorted-desc";
      return th;
    }));
    const body = data.rows.map((r) => el("tr", { "data-latent": r.latent }, shown.map((c) => {
      if (c === "latent") return el("td", { class: "num" }, el("a", { href: `/latent?coder=${encodeURIComponent(coder)}&latent=${r.latent}` }, r.latent));
      if (c === "status") return el("td", {}, el("span", { class: `tag ${r.status}` }, r.status));
      if (c === "explanation") return el("td", { class: "text" }, r.explanation || "");
      return el("td", { class: "num" }, fmt(r[c], c === "frequency" ? 5 : 3));
    })));
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, body));
    pager.replaceChildren(
      el("button", { id: "prev", disabled: data.page <= 1 ? "" : null, onclick: () => { state.page = String(data.page - 1); load(); } }, "← previous"),
      el("button", { id: "next", disabled: data.page >= data.pages ? "" : null, onclick: () => { state.page = String(data.page + 1); load(); } }, "next →"));
  }
  await load();
}

// ---- one latent --------------------------------------------------------------------------------

function heat(value, top, color = "37, 99, 235") {
  const a = top > 0 ? Math.max(0, Math.min(1, value / top)) : 0;
  return a > 0 ? `background: rgba(${color}, ${(0.12 + 0.78 * a).toFixed(3)})` : "";
}

function tokenText(t) {
  return t.replaceAll("\n", "↵\n").replaceAll("\t", "⇥");
}

function windowNode(w, top) {
  return el("div", { class: "window", "data-max": w.max_activation },
    el("span", { class: "max" }, fmt(w.max_activation, 2)),
    w.tokens.map((t, i) => el("span", { class: w.activations[i] > 0 ? "tok active" : "tok", "data-act": w.activations[i], title: `${JSON.stringify(t)}: ${w.activations[i]}`, style: heat(w.activations[i], top) }, tokenText(t))));
}

function histogram(density) {
  if (!density.counts.length) return el("p", { class: "muted" }, "No cached activation.");
  return bars("density", density, "activation");
}

function bars(id, hist, label, color) {
  const top = Math.max(...hist.counts);
  return el("div", {},
    el("div", { class: "bars", id }, hist.counts.map((c, i) => el("div", { title: `${fmt(hist.edges[i], 2)}–${fmt(hist.edges[i + 1], 2)}: ${c}`, style: `height: ${top ? (100 * c) / top : 0}%` + (color ? `; background: ${color(hist.edges[i], hist.edges[i + 1])}` : "") }))),
    el("div", { class: "axis muted" }, el("span", {}, fmt(hist.edges[0], 2)), el("span", {}, label), el("span", {}, fmt(hist.edges[hist.edges.length - 1], 2))));
}

function tokenValues(id, tokens) {
  return el("div", { class: "tokens-list", id }, tokens.map((t) => el("span", { class: "logit", title: `${JSON.stringify(t.token)}: ${t.logit}` }, tokenText(t.token), el("b", {}, fmt(t.logit, 2)))));
}

// The logit lens: promoted and suppressed tokens with their logits, and the histogram of its logits over the
// vocabulary; while the server is still caching the unembedding (a first start) it says so and asks again.
function renderLens(card, lens, coder, latent) {
  card.replaceChildren(el("h2", {}, "Logit lens: what the decoder direction writes"));
  if (lens.note) { card.append(el("p", { class: "muted" }, lens.note)); return; }
  if (lens.pending) {
    card.append(el("p", { class: "muted", id: "lens-pending" }, lens.pending + " …"));
    setTimeout(() => api(`/api/logit_lens?coder=${encodeURIComponent(coder)}&latent=${latent}`).then((l) => renderLens(card, l, coder, latent)).catch((e) => card.append(el("p", { class: "error" }, e.message))), 2000);
    return;
  }
  card.append(el("h3", {}, "promotes"), tokenValues("promoted", lens.promoted), el("h3", {}, "suppresses"), tokenValues("suppressed", lens.suppressed),
    el("h3", {}, "Logits over the vocabulary"), bars("logit-histogram", lens.histogram, "logit (tokens per bin)", (lo, hi) => (lo + hi) / 2 < 0 ? "#dc2626" : "#2563eb"));
}

// The permalink's view: one scorer's score beside its control's, named at the top of the page.
function pinnedScorer(s, name) {
  const card = el("div", { class: "card", id: "pinned-scorer" });
  if (!s) { card.append(el("p", { class: "error" }, `No scorer ${name} for this coder.`)); return card; }
  card.append(el("h2", {}, `${s.name}: ${s.main_metric || "gap"} beside its control`));
  if (!s.scored) { card.append(el("p", { class: "muted" }, "Not scored.")); return card; }
  card.append(el("table", {},
    el("tr", {}, ["", "text", s.main_metric || "score"].map((h) => el("th", {}, h))),
    el("tr", {}, el("td", {}, "explanation"), el("td", { class: "text" }, s.explanation || "–"), el("td", { class: "num score" }, withInterval(s.score, s.interval))),
    el("tr", {}, el("td", {}, "control"), el("td", { class: "text" }, s.control_explanation || s.control_note || "–"), el("td", { class: "num control" }, fmt(s.control_score)))),
    el("p", {}, `gap ${fmt(s.gap)} · control: ${s.control} · `, verdictSpan(s.verdict)),
    s.stale ? el("p", { class: "stale" }, s.stale) : "");
  return card;
}

// Top activations searchable by token: keep the windows holding a token that contains the text.
function filterWindows(container, text, summary) {
  const needle = text.trim().toLowerCase();
  let shown = 0, total = 0;
  for (const w of container.querySelectorAll(".window")) {
    const toks = [...w.querySelectorAll(".tok")];
    const hits = needle ? toks.filter((t) => t.textContent.toLowerCase().includes(needle)) : [];
    toks.forEach((t) => t.classList.toggle("match", hits.includes(t)));
    const keep = !needle || hits.length > 0;
    w.style.display = keep ? "" : "none";
    total += 1; shown += keep ? 1 : 0;
  }
  summary.textContent = needle ? `${shown} of ${total} windows hold “${text.trim()}”` : "";
}

// The steering box: the prompt continued without and with the latent steered, side by side (the server
// loads the subject model on the first request and answers "loading" until it is ready).
function steeringBox(d, coder) {
  const box = el("div", { class: "card", id: "steering" }, el("h2", {}, "Steer this latent"));
  if (!d.steering.available) { box.append(el("p", { class: "muted", id: "steering-off" }, d.steering.message)); return box; }
  const prompt = el("input", { type: "text", id: "steer-prompt", value: "The" });
  const strength = el("input", { type: "text", class: "num", id: "steer-strength", value: "2", title: "added at every position, in units of the latent's max cached activation" });
  const tokens = el("input", { type: "text", class: "num", id: "steer-tokens", value: "24" });
  const status = el("p", { class: "muted", id: "steer-status" });
  const out = el("div", { class: "steer-out" });
  const go = el("button", { id: "steer-go", onclick: () => run() }, "Steer");
  async function run() {
    go.disabled = true;
    try {
      const r = await api("/api/steer", { coder, latent: d.latent, prompt: prompt.value, strength: strength.value, tokens: tokens.value });
      if (r.state === "loading") { status.textContent = r.message; setTimeout(run, 1500); return; }
      if (r.state === "unavailable") { status.textContent = r.message; return; }
      status.textContent = `+${fmt(r.strength, 2)} × max activation ${fmt(r.unit, 3)} = +${fmt(r.delta, 3)} at every position; next-token KL ${fmt(r.kl, 3)} nats`;
      out.replaceChildren(el("div", { id: "unsteered" }, el("h3", {}, "unsteered"), el("div", { class: "window" }, r.prompt, el("b", {}, r.unsteered))),
        el("div", { id: "steered" }, el("h3", {}, "steered"), el("div", { class: "window" }, r.prompt, el("b", {}, r.steered))));
    } catch (err) {
      status.replaceChildren(el("span", { class: "error" }, err.message));
      if (err.retryAfter) { setTimeout(run, 1000 * Number(err.retryAfter)); return; }  // another steering runs: this one waits its turn
    }
    go.disabled = false;
  }
  box.append(el("div", { class: "controls" }, "prompt", prompt, "strength", strength, "tokens", tokens, go), status, out);
  return box;
}

async function latentPage() {
  const coder = params.get("coder") || "";
  const latent = params.get("latent");
  crumbs(el("a", { href: `/coder?coder=${encodeURIComponent(coder)}` }, coder), `latent ${latent}`);
  const d = await api(`/api/latent?coder=${encodeURIComponent(coder)}&latent=${encodeURIComponent(latent)}`);
  const top = d.summary.max_activation || Math.max(0, ...d.windows.activating.flatMap((g) => g.windows.map((w) => w.max_activation)));
  const parts = [];
  parts.push(el("h1", {}, `Latent ${d.latent} `, el("span", { class: "muted" }, `of ${d.coder} (shard ${d.shard})`)));
  parts.push(el("p", {},
    d.links.previous ? el("a", { href: d.links.previous, id: "prev-latent" }, "← previous") : null, " ",
    d.links.next ? el("a", { href: d.links.next, id: "next-latent" }, "next →") : null, " · Dagster: ",
    el("a", { href: d.links.dagster_explanations, id: "dagster-link" }, "explanations partition"), " · ",
    el("a", { href: d.links.dagster_exemplars }, "exemplars"), " · ", el("a", { href: d.links.dagster_summary }, "score_summary")));
  if (d.graphs.length) parts.push(el("p", { id: "graphs" }, "Labels it in attribution graphs: ",
    ...d.graphs.flatMap((g, i) => [i ? " · " : "", el("a", { href: g.url }, g.slug), ` (${g.nodes.join(", ")})`])));

  const ex = d.explanation;
  const explanation = el("div", { class: "card", id: "explanation" }, el("h2", {}, "Explanation"));
  if (!ex) explanation.append(el("p", { class: "muted" }, "Not explained yet."));
  else {
    explanation.append(el("p", { class: "explanation" }, ex.status === "ok" ? ex.text : "(failed)"),
      el("p", { class: "muted" }, `${ex.explainer} explainer, model ${ex.model}`));
    if (ex.error) explanation.append(el("p", { class: "error" }, ex.error));
    if (ex.senses.length) {
      // each sense scored on its own test windows, then the explanation (their union) as every scorer scored it
      const scored = d.scorers.filter((s) => ex.senses.some((sense) => sense.scores[s.name]));
      const cell = (score, control) => el("td", { class: "num" }, fmt(score), el("span", { class: "muted" }, ` (control ${fmt(control)})`));
      explanation.append(el("h3", {}, "Senses"), el("table", { id: "senses" },
        el("tr", {}, el("th", {}, "sense"), el("th", {}, "train windows"), el("th", {}, "test windows"), scored.map((s) => el("th", {}, `${s.name} (${s.main_metric})`))),
        ex.senses.map((sense) => el("tr", { class: "sense" }, el("td", {}, sense.text), el("td", { class: "num" }, String(sense.windows)), el("td", { class: "num" }, String(sense.test_windows)),
          scored.map((s) => sense.scores[s.name] ? cell(sense.scores[s.name].score, sense.scores[s.name].control) : el("td", {}, "–")))),
        el("tr", { class: "union" }, el("td", {}, "all senses (the explanation)"), el("td", {}, ""), el("td", {}, ""),
          scored.map((s) => s.scored && !s.stale ? cell(s.score, s.control_score) : el("td", {}, "–")))));
    }
    if (ex.reseed) {
      // the same latent explained again from a disjoint draw of its windows: both texts and their scores side by side
      const scored = d.scorers.filter((s) => ex.reseed.scores[s.name]);
      explanation.append(el("h3", {}, "Explained again from other windows"), el("table", { id: "reseed" },
        el("tr", {}, el("th", {}, "draw"), el("th", {}, "text"), scored.map((s) => el("th", {}, `${s.name} (${s.main_metric})`))),
        el("tr", { class: "first" }, el("td", {}, "first"), el("td", {}, ex.text), scored.map((s) => el("td", { class: "num" }, s.scored && !s.stale ? fmt(s.score) : "–"))),
        el("tr", { class: "second" }, el("td", {}, `second (${ex.reseed.windows} other windows)`), el("td", {}, ex.reseed.text),
          scored.map((s) => el("td", { class: "num" }, fmt(ex.reseed.scores[s.name].score))))),
        el("p", { class: "muted", id: "reseed-similarity" }, `embedding similarity of the two texts: ${fmt(ex.reseed.similarity)}`));
    }
    if (ex.candidates.length) explanation.append(el("h3", {}, "Best-of-N candidates"), el("table", { id: "candidates" },
      el("tr", {}, el("th", {}, "candidate"), el("th", {}, "score (valid ROC AUC)"), el("th", {}, "kept")),
      ex.candidates.map((c) => el("tr", {}, el("td", {}, c.text), el("td", { class: "num" }, fmt(c.score)), el("td", {}, c.chosen ? "✓" : "")))));
  }
  const stats = el("div", { class: "card" }, el("h2", {}, "Activation density"),
    el("p", {}, `fires on ${fmt(100 * d.frequency, 4)}% of tokens; max ${fmt(d.summary.max_activation, 2)}, mean ${fmt(d.summary.mean_activation, 2)}`),
    histogram(d.density),
    d.top_tokens.length ? el("div", {}, el("h3", {}, "Top tokens by mean activation"), el("div", { class: "tokens-list" }, d.top_tokens.map((t) => el("span", { title: fmt(t.mean_activation) }, tokenText(t.token))))) : null);
  const pinned = d.scorers.find((s) => s.name === params.get("scorer"));
  if (params.get("scorer")) parts.push(pinnedScorer(pinned, params.get("scorer")));
  parts.push(el("div", { class: "grid" }, explanation, stats));

  const scorers = el("div", { class: "card", id: "scorers" }, el("h2", {}, "Scores beside their controls"));
  if (!d.scorers.length) scorers.append(el("p", { class: "muted" }, "No scorer has run on this coder."));
  else scorers.append(el("table", {},
    el("tr", {}, ["scorer", "metric", "explanation", "control", "gap", "control explanation", "coder verdict"].map((h) => el("th", {}, h))),
    d.scorers.map((s) => el("tr", { "data-scorer": s.name, class: s.name === params.get("scorer") ? "pinned" : null },
      el("td", {}, s.name, " ", el("a", { href: s.permalink, class: "permalink", title: "permalink: this latent with this scorer and its control shown first" }, "link")), el("td", {}, s.main_metric || "unknown"), el("td", { class: "num score" }, s.scored ? withInterval(s.score, s.interval) : "not scored",
        s.stale ? el("div", { class: "stale", title: `scored: ${s.explanation}` }, s.stale) : null),
      el("td", { class: "num control" }, s.scored ? fmt(s.control_score) : "–"), el("td", { class: "num" }, s.scored ? fmt(s.gap) : "–"),
      el("td", {}, s.scored ? (s.control_explanation || s.control_note || "–") : "–"), el("td", {}, verdictSpan(s.verdict))))));
  parts.push(scorers);
  parts.push(steeringBox(d, coder));

  const lens = el("div", { class: "card", id: "logit-lens" });
  renderLens(lens, d.logit_lens, coder, d.latent);
  const neighbours = el("div", { class: "card", id: "neighbours" }, el("h2", {}, "Decoder-cosine neighbours"));
  if (d.neighbours.note) neighbours.append(el("p", { class: "muted" }, d.neighbours.note));
  else neighbours.append(el("table", {}, el("tr", {}, el("th", {}, "latent"), el("th", {}, "cosine"), el("th", {}, "explanation")),
    d.neighbours.latents.map((n) => el("tr", {}, el("td", {}, el("a", { href: n.url, class: "neighbour" }, n.latent)), el("td", { class: "num" }, fmt(n.cosine)), el("td", {}, n.explanation || "")))));
  parts.push(el("div", { class: "grid" }, lens, neighbours));

  const windows = el("div", { id: "windows" }, el("h2", {}, "Top activating windows by activation quantile"),
    el("p", { class: "muted" }, "Darker = stronger; hover a token for its activation. Quantile 1 holds the strongest held-out windows."));
  const tokenSearch = el("input", { type: "text", id: "token-search", placeholder: "show windows with a token, e.g. file" });
  const tokenSummary = el("span", { id: "token-summary", class: "muted" });
  tokenSearch.addEventListener("input", () => filterWindows(windows, tokenSearch.value, tokenSummary));
  windows.append(el("div", { class: "controls" }, tokenSearch, tokenSummary));
  for (const g of d.windows.activating) windows.append(el("h3", { class: "group" }, `${g.group} (${g.windows.length})`), el("div", { class: "group-windows", "data-group": g.group }, g.windows.map((w) => windowNode(w, top))));
  if (!d.windows.activating.length) windows.append(el("p", { class: "muted" }, "No exemplars for this latent (dead, too rare, or its shard has no exemplars yet)."));
  parts.push(windows);
  const silent = el("div", { id: "non-activating" }, el("h2", {}, "Non-activating windows by source"));
  for (const g of d.windows.non_activating) silent.append(el("h3", {}, `${g.source} (${g.windows.length})`), el("div", { "data-source": g.source }, g.windows.map((w) => windowNode(w, top))));
  parts.push(silent);

  if (d.simulation) {
    const sim = el("div", { id: "simulation" }, el("h2", {}, "Simulation: predicted activation per token beside the true one (0–10)"));
    for (const w of d.simulation.windows) {
      sim.append(el("div", { class: "sim-pair" },
        el("div", { class: "window sim-true" }, el("span", { class: "max" }, "true"), w.tokens.map((t, i) => el("span", { class: "tok", "data-act": w.true[i], title: `true ${w.true[i]}`, style: heat(w.true[i], 10) }, tokenText(t)))),
        el("div", { class: "window sim-predicted" }, el("span", { class: "max" }, `simulated (${w.values_from})`), w.tokens.map((t, i) => el("span", { class: "tok", "data-act": w.simulated[i], title: `simulated ${w.simulated[i]}`, style: heat(w.simulated[i], 10, "234, 88, 12") }, tokenText(t))))));
    }
    parts.push(sim);
  }
  main.replaceChildren(...parts);
  document.title = `latent ${d.latent} · ${d.coder}`;
}

const pages = { coders: codersPage, coder: coderPage, latent: latentPage };
(pages[document.body.dataset.page] || codersPage)().catch(showError).finally(() => document.body.setAttribute("data-ready", "1"));
