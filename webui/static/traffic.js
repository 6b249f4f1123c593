// The traffic page's stream: rows from /api/v1/traffic/stream (SSE) shown newest first, a filter that
// changes without a reload (the server validates it and sends the matching history), pause/resume (the
// stream closes and later resumes after the last row seen, so nothing is missed), and export of what is
// shown as JSON lines (a local Blob download: nothing leaves the gateway). Loaded by traffic.html only.

const KEEP = 500;
const live = document.getElementById("live");
const list = document.getElementById("stream");
const stateEl = document.getElementById("stream-state");
const countEl = document.getElementById("stream-count");
const pauseButton = document.getElementById("pause");
const form = document.getElementById("traffic-filter");
const errorEl = document.getElementById("filter-error");
const historyEl = document.getElementById("history");

let source = null;
let topic = live.dataset.topic || "";
let lastId = Number(live.dataset.after || 0);
let paused = false;
const shown = []; // the rows on screen, oldest first (what export writes)

function setState(text) { stateEl.textContent = text; }

function updateCount() { countEl.textContent = `${shown.length} shown`; }

function clock(ts) {
  const d = new Date(ts * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // always text: a topic or payload is never markup
  return node;
}

function rowElement(row) {
  const item = el("li", `msg fmt-${row.format}${row.error ? " bad" : ""}`);
  item.dataset.id = row.id;
  const head = el("div", "msg-head");
  head.append(el("time", "", clock(row.ts)), " ", el("code", "topic", row.topic), " ", el("span", "badge fmt", row.format));
  const meta = [`qos ${row.qos}`, `${row.size} B${row.truncated ? " (cut)" : ""}`];
  if (row.retain) meta.push("retained");
  if (row.client_id) meta.push(row.client_id);
  if (row.direction !== "in") meta.push(row.direction);
  head.append(" ", el("span", "muted", meta.join(" · ")));
  item.append(head);
  if (row.error) item.append(el("div", "error", row.error));
  if (row.payload) item.append(el("pre", "", row.payload));
  return item;
}

function add(row) {
  shown.push(row);
  list.prepend(rowElement(row));
  while (shown.length > KEEP) {
    shown.shift();
    list.lastElementChild?.remove();
  }
  updateCount();
}

function note(text) {
  list.prepend(el("li", "msg note", text));
}

function stop() {
  if (source) source.close();
  source = null;
}

function start() {
  stop();
  const params = new URLSearchParams({ after: String(lastId) });
  if (topic) params.set("topic", topic);
  source = new EventSource(`${live.dataset.stream}?${params}`);
  source.addEventListener("ready", () => setState(topic ? `live · ${topic}` : "live · all topics"));
  source.addEventListener("traffic", (e) => {
    const row = JSON.parse(e.data);
    lastId = Math.max(lastId, row.id);
    add(row);
  });
  source.addEventListener("skipped", (e) => {
    note(`${JSON.parse(e.data).count} messages skipped: too many at once to show`);
  });
  source.onerror = () => setState("reconnecting…"); // EventSource retries with Last-Event-ID by itself
}

function togglePause() {
  paused = !paused;
  pauseButton.textContent = paused ? "Resume" : "Pause";
  pauseButton.setAttribute("aria-pressed", String(paused));
  if (paused) {
    stop();
    setState("paused");
  } else {
    start(); // resumes after lastId: what arrived meanwhile comes now
  }
}

function exportShown() {
  const lines = shown.map((row) => JSON.stringify(row)).join("\n");
  const blob = new Blob([lines ? `${lines}\n` : ""], { type: "application/x-ndjson" });
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  link.download = `traffic-${stamp}.jsonl`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function applyFilter(event) {
  event.preventDefault();
  const text = new FormData(form).get("topic").trim();
  const params = new URLSearchParams({ fragment: "history" });
  if (text) params.set("topic", text);
  const response = await fetch(`/traffic?${params}`, { headers: { Accept: "text/html" }, credentials: "same-origin" });
  historyEl.innerHTML = await response.text();
  const url = new URL(window.location);
  url.search = text ? `?${new URLSearchParams({ topic: text })}` : "";
  window.history.replaceState(null, "", url);
  if (!response.ok) {
    stop();
    errorEl.textContent = historyEl.querySelector(".error")?.textContent || `refused (${response.status})`;
    errorEl.hidden = false;
    setState("stopped: fix the filter");
    return;
  }
  errorEl.hidden = true;
  topic = text;
  lastId = Number(historyEl.querySelector("[data-latest]")?.dataset.latest || lastId);
  shown.length = 0;
  list.replaceChildren();
  updateCount();
  if (paused) setState("paused");
  else start();
}

live.hidden = false;
pauseButton.addEventListener("click", togglePause);
document.getElementById("clear").addEventListener("click", () => { shown.length = 0; list.replaceChildren(); updateCount(); });
document.getElementById("export").addEventListener("click", exportShown);
form.addEventListener("submit", applyFilter);
if (live.dataset.error) setState("stopped: fix the filter");
else start();
