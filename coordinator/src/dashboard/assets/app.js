// The dashboard page: the job list (a page at a time), the running jobs and the workers kept
// live by the server's event stream (/api/events), the gallery, the operator's actions and
// the submit form. Every text from the server goes in through textContent.
"use strict";

const PER_PAGE = 50;
const GALLERY_PER_PAGE = 24;
const state = { view: "all", page: 0, total: 0, gpage: 0, gtotal: 0, listVersion: null, steps: {} };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function duration(s) {
  if (s == null || !isFinite(s)) return "—";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function bytes(n) {
  if (!n) return "";
  const gib = n / 2 ** 30;
  return gib >= 1 ? `${gib.toFixed(1)} GiB` : `${(n / 2 ** 20).toFixed(0)} MiB`;
}

function notice(text, bad = false) {
  const n = document.getElementById("notice");
  n.textContent = text;
  n.className = bad ? "notice error" : "notice";
}

// A call to the API; an answer other than 2xx throws its message (401: back to the login).
async function api(path, body) {
  const opts = { headers: { "X-Tessera-Dashboard": "1" } };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  if (res.status === 401) {
    location.reload();
    throw new Error("logged out");
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || `${res.status} ${res.statusText}`);
  return data;
}

async function act(what, path, body) {
  try {
    const job = await api(path, body);
    notice(`${what}: job ${job.id} is ${job.state}`);
    await loadJobs();
  } catch (e) {
    notice(`${what}: ${e.message}`, true);
  }
}

function progressText(j) {
  const parts = [];
  if (j.count > 1) parts.push(`image ${Math.min(j.image + 1, j.count)}/${j.count}`);
  if (j.stages) parts.push(`stage ${j.stage + 1}/${j.stages}`);
  if (j.steps) parts.push(`step ${j.step}/${j.steps}`);
  parts.push(`views ${j.views_done}/${j.views_total}`);
  if (j.phase && j.state === "running") parts.push(j.phase);
  return parts.join(" · ");
}

function fraction(j) {
  return j.views_total ? Math.min(1, j.views_done / j.views_total) : 0;
}

// The buttons a job's state allows: cancel (asks once more), requeue, priority.
function actions(j) {
  const td = el("td");
  if (j.state === "queued" || j.state === "running") {
    const b = el("button", { type: "button", class: "cancel danger", "data-job": j.id, text: "cancel" });
    b.addEventListener("click", () => {
      if (b.dataset.armed) act("cancel", `/api/jobs/${j.id}/cancel`, {});
      else {
        b.dataset.armed = "1";
        b.textContent = "really cancel?";
        setTimeout(() => { delete b.dataset.armed; b.textContent = "cancel"; }, 4000);
      }
    });
    td.append(b);
  }
  if (j.state === "failed") {
    td.append(el("button", { type: "button", class: "requeue", "data-job": j.id, text: "requeue",
      onclick: () => act("requeue", `/api/jobs/${j.id}/requeue`, {}) }));
  }
  return td;
}

function priorityCell(j) {
  const td = el("td", { class: "num" });
  if (j.state !== "queued") {
    td.textContent = j.priority;
    return td;
  }
  const input = el("input", { type: "number", min: "-1000", max: "1000", value: String(j.priority),
    class: "priority", "data-job": j.id, size: "5", title: "higher runs first; Enter to set" });
  input.addEventListener("change", () =>
    act("priority", `/api/jobs/${j.id}/priority`, { priority: Number(input.value) }));
  td.append(input);
  return td;
}

function jobRow(j) {
  const what = el("td", {},
    el("div", { text: `${j.width}×${j.height} · ${j.model} · seed ${j.seed}` +
      (j.submitted_by ? ` · by ${j.submitted_by}` : "") }),
    el("div", { class: "mute", text: j.summary }),
    el("div", { class: "mute", text: `“${j.prompt}”` }));
  if (j.error) what.append(el("div", { class: "error", text: j.error }));
  for (const w of j.warnings || []) what.append(el("div", { class: "error", text: `warning: ${w}` }));
  return el("tr", { "data-job": j.id },
    el("td", {}, el("code", { text: j.id })),
    el("td", { class: `state ${j.state}`, text: j.state }),
    priorityCell(j), what,
    el("td", { class: "progress", text: progressText(j) }),
    el("td", { class: "num", text: duration(j.eta_s) }),
    el("td", { class: "num", text: duration(j.elapsed_s) }),
    el("td", { class: "num", text: j.evals_per_s ? j.evals_per_s.toFixed(2) : "—" }),
    actions(j));
}

async function loadJobs() {
  try {
    const page = await api(`/api/jobs?view=${state.view}&page=${state.page}&per_page=${PER_PAGE}`);
    state.total = page.total;
    const body = document.querySelector("#jobs tbody");
    body.replaceChildren(...page.jobs.map(jobRow));
    if (!page.jobs.length) body.append(el("tr", {}, el("td", { colspan: "9", class: "mute", text: "No jobs." })));
    const pages = Math.max(1, Math.ceil(page.total / PER_PAGE));
    document.getElementById("page").textContent = `page ${state.page + 1} of ${pages} (${page.total} jobs)`;
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page + 1 >= pages;
    // For `tessera bench dashboard`: when the first page of jobs was on screen.
    if (!performance.getEntriesByName("tessera-jobs").length) performance.mark("tessera-jobs");
  } catch (e) {
    notice(`jobs: ${e.message}`, true);
  }
  loadGallery();
}

async function loadGallery() {
  try {
    const page = await api(`/api/jobs?view=finished&page=${state.gpage}&per_page=${GALLERY_PER_PAGE}`);
    const g = document.getElementById("gallery");
    const thumbs = [];
    for (const j of page.jobs) {
      for (let n = 0; n < j.images_done; n++) {
        const a = el("a", { href: "#", class: "thumb", "data-job": j.id, "data-image": String(n) },
          el("img", { src: `/api/jobs/${j.id}/preview.png`, alt: j.prompt, loading: "lazy" }),
          el("span", { text: `${j.width}×${j.height} ${j.prompt.slice(0, 40)}` }));
        a.addEventListener("click", (ev) => { ev.preventDefault(); openViewer(j, n); });
        thumbs.push(a);
      }
    }
    g.replaceChildren(...thumbs);
    if (!thumbs.length) g.append(el("p", { class: "mute", text: "No finished images yet." }));
    const pages = Math.max(1, Math.ceil(page.total / GALLERY_PER_PAGE));
    document.getElementById("gpage").textContent = `${state.gpage + 1} / ${pages}`;
    document.getElementById("gprev").disabled = state.gpage === 0;
    document.getElementById("gnext").disabled = state.gpage + 1 >= pages;
  } catch (e) {
    notice(`gallery: ${e.message}`, true);
  }
}

// A running job's card; its preview is fetched again only when its step moved.
function runningCard(j) {
  const key = `${j.image}-${j.stage}-${j.step}`;
  let card = document.querySelector(`[data-running="${j.id}"]`);
  if (!card) {
    card = el("div", { class: "card", "data-running": j.id },
      el("img", { alt: "preview" }),
      el("div", { class: "title" }), el("div", { class: "bar" }, el("div")),
      el("div", { class: "views" }), el("div", { class: "times mute" }));
  }
  card.querySelector(".title").textContent = `${j.id} · ${j.width}×${j.height} · ${j.method} · “${j.prompt}”`;
  card.querySelector(".bar > div").style.width = `${(fraction(j) * 100).toFixed(1)}%`;
  card.querySelector(".views").textContent = progressText(j);
  card.querySelector(".times").textContent =
    `ETA ${duration(j.eta_s)} · elapsed ${duration(j.elapsed_s)} · ` +
    `${j.evals_per_s ? j.evals_per_s.toFixed(2) : "—"} evals/s`;
  if (state.steps[j.id] !== key && j.step > 0) {
    state.steps[j.id] = key;
    card.querySelector("img").src = `/api/jobs/${j.id}/preview.png?v=${key}`;
  }
  return card;
}

function showRunning(jobs) {
  const box = document.getElementById("running");
  box.replaceChildren(...jobs.map(runningCard));
  if (!jobs.length) box.append(el("p", { class: "empty mute", text: "No job is running." }));
}

function showWorkers(workers) {
  const rows = workers.map((w) => {
    const pace = Object.entries(w.pace).map(([k, s]) => `${k} ${s.toFixed(2)}`).join(", ") || "—";
    return el("tr", { "data-worker": w.name },
      el("td", {}, el("div", { text: w.name }), el("div", { class: "mute", text: w.address })),
      el("td", { text: w.models.join(", ") }),
      el("td", { text: `${w.device} ${bytes(w.device_memory_bytes)}` }),
      el("td", { class: `state ${w.state}`, text: w.state }),
      el("td", { class: "num", text: pace }),
      el("td", { class: "num", text: String(w.tasks_done) }),
      el("td", { class: "num", text: `${w.copies_won} / ${w.copies_lost}` }),
      el("td", { class: "num", text: `${w.heartbeat_s_ago.toFixed(1)} s ago` }));
  });
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: "8", class: "mute", text: "No worker has joined." })));
}

function onTick(t) {
  const c = t.counts;
  document.getElementById("counts").textContent =
    `${c.jobs} jobs · ${c.queued} queued · ${c.running} running · ${c.workers} workers`;
  showRunning(t.running);
  showWorkers(t.workers);
  // Rows of running jobs in the list follow along without fetching the page again.
  for (const j of t.running) {
    const row = document.querySelector(`#jobs tr[data-job="${j.id}"]`);
    if (row) row.replaceWith(jobRow(j));
  }
  if (!performance.getEntriesByName("tessera-live").length) performance.mark("tessera-live");
  if (state.listVersion !== t.list_version) {
    state.listVersion = t.list_version;
    loadJobs();
  }
}

function listen() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  es.addEventListener("tick", (ev) => onTick(JSON.parse(ev.data)));
  es.addEventListener("error", () => {
    live.textContent = "reconnecting…";
    live.className = "live";
    // A lost login shows as an error too: check, and go back to the login page if so.
    fetch("/api/overview").then((r) => { if (r.status === 401) location.reload(); }).catch(() => {});
  });
}

// The form's fields as `tessera submit` flags, checked by the coordinator with its parser.
function splitFlags(text) {
  const out = [];
  const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
  let m;
  while ((m = re.exec(text))) out.push(m[1] ?? m[2] ?? m[3]);
  return out;
}

async function submitJob(ev) {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const args = [];
  for (const name of ["model", "prompt", "size", "method", "steps", "seed", "count", "priority"]) {
    const v = String(f.get(name) || "").trim();
    if (v) args.push(`--${name}`, v);
  }
  args.push(...splitFlags(String(f.get("more") || "")));
  const out = document.getElementById("submit-result");
  out.className = "result";
  try {
    const r = await api("/api/jobs", { args });
    out.textContent = `queued as job ${r.id}`;
    loadJobs();
  } catch (e) {
    out.className = "result error";
    out.textContent = e.message;
  }
}

async function openViewer(job, n) {
  try {
    const [detail, geometry] = await Promise.all([
      api(`/api/jobs/${job.id}`), api(`/api/jobs/${job.id}/images/${n}/dzi`)]);
    const img = detail.images.find((i) => i.n === n);
    document.getElementById("viewer-title").textContent = `${job.id} · image ${n} · ${geometry.width}×${geometry.height}`;
    document.getElementById("viewer-params").textContent = img ? img.parameters : "";
    const dl = document.getElementById("viewer-download");
    dl.href = `/api/jobs/${job.id}/images/${n}?download`;
    document.getElementById("viewer").hidden = false;
    window.tesseraViewer.open(`/api/jobs/${job.id}/images/${n}`, geometry);
  } catch (e) {
    notice(`viewer: ${e.message}`, true);
  }
}

function setup() {
  for (const b of document.querySelectorAll("#views button")) {
    b.addEventListener("click", () => {
      document.querySelectorAll("#views button").forEach((x) => x.classList.toggle("on", x === b));
      state.view = b.dataset.view;
      state.page = 0;
      loadJobs();
    });
  }
  document.getElementById("prev").addEventListener("click", () => { state.page--; loadJobs(); });
  document.getElementById("next").addEventListener("click", () => { state.page++; loadJobs(); });
  document.getElementById("gprev").addEventListener("click", () => { state.gpage--; loadGallery(); });
  document.getElementById("gnext").addEventListener("click", () => { state.gpage++; loadGallery(); });
  document.getElementById("submit").addEventListener("submit", submitJob);
  document.getElementById("viewer-close").addEventListener("click", () => {
    document.getElementById("viewer").hidden = true;
    window.tesseraViewer.close();
  });
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/logout", { method: "POST" });
    location.reload();
  });
  loadJobs();
  listen();
}

setup();
