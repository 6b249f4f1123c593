// Bosun's one script: live updates over Server-Sent Events and in-place form posts.
// Every page works without it; with it, regions marked data-live="kind,kind" refresh from data-refresh
// when the live bus says something of that kind changed, their forms post without leaving the page, ages tick,
// and a new call shows a banner and (once sound is enabled by a click: the browser's autoplay rule) beeps.

const csrf = document.querySelector('meta[name="csrf"]')?.content || "";
const banner = document.getElementById("banner");
const liveState = document.getElementById("live-state");
let audio = null;

function showBanner(text, kind = "info") {
  if (!banner) return;
  banner.textContent = text;
  banner.className = `banner ${kind}`;
  banner.hidden = false;
  clearTimeout(showBanner.timer);
  showBanner.timer = setTimeout(() => { banner.hidden = true; }, kind === "call" ? 15000 : 6000);
}

function beep() {
  if (!audio) return;
  const now = audio.currentTime;
  for (const [i, freq] of [880, 660, 880].entries()) {
    const osc = audio.createOscillator();
    const gain = audio.createGain();
    osc.frequency.value = freq;
    gain.gain.setValueAtTime(0.25, now + i * 0.25);
    gain.gain.exponentialRampToValueAtTime(0.001, now + i * 0.25 + 0.22);
    osc.connect(gain).connect(audio.destination);
    osc.start(now + i * 0.25);
    osc.stop(now + i * 0.25 + 0.23);
  }
}

function setupSound() {
  const button = document.getElementById("sound");
  if (!button) return;
  button.hidden = false;
  button.addEventListener("click", () => {
    audio = audio || new AudioContext();
    audio.resume();
    button.textContent = "Sound on";
    button.disabled = true;
    beep();
  });
}

const pending = new Map();

async function refresh(region) {
  const url = region.dataset.refresh;
  if (!url) return;
  const response = await fetch(url, { headers: { Accept: "text/html" }, credentials: "same-origin" });
  if (response.ok) {
    region.innerHTML = await response.text();
    tick();
  }
}

function refreshSoon(region) {
  // several events in a burst cost one request
  if (pending.has(region)) return;
  pending.set(region, setTimeout(() => { pending.delete(region); refresh(region); }, 80));
}

function onEvent(kind, data) {
  for (const region of document.querySelectorAll("[data-live]")) {
    if (!region.dataset.live.split(",").includes(kind)) continue;
    // a region about one device (data-device) only cares about that device's events
    if (region.dataset.device && data.device_id && region.dataset.device !== data.device_id) continue;
    refreshSoon(region);
  }
  if (kind === "call" && data.change === "created" && !data.dnd) {
    showBanner(`New ${data.priority} call: ${data.room} (${data.site})`, "call");
    beep();
  }
  document.dispatchEvent(new CustomEvent("bosun:event", { detail: { kind, data } }));
}

function connect() {
  // signed-in pages only (the login page has no session: the stream would be refused and retried forever);
  // every signed-in page listens, so a new call's banner and beep reach the crew wherever they are
  if (!csrf) return;
  const source = new EventSource("/api/v1/live");
  const kinds = ["call", "room", "event.press", "device.status", "device.presence", "command.ack", "traffic"];
  for (const kind of kinds) {
    source.addEventListener(kind, (e) => onEvent(kind, JSON.parse(e.data)));
  }
  source.onopen = () => { if (liveState) liveState.textContent = "live"; };
  source.onerror = () => { if (liveState) liveState.textContent = "reconnecting…"; };
}

function tick() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll("[data-since]")) {
    const s = Math.max(0, Math.floor(now - Number(el.dataset.since)));
    el.textContent = s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`
      : `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }
}

async function postInPlace(event) {
  const form = event.target;
  // only forms inside a live region post in place (the board's buttons); sign-in, sign-out and settings navigate
  if (!(form instanceof HTMLFormElement) || form.method.toLowerCase() !== "post" || !form.closest("[data-live]")) return;
  event.preventDefault();
  const response = await fetch(form.action, {
    method: "POST",
    body: new FormData(form),
    headers: { Accept: "application/json", "X-CSRF-Token": csrf },
    credentials: "same-origin",
  });
  if (response.redirected && new URL(response.url).pathname === "/login") {
    window.location = response.url;
    return;
  }
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).message; } catch { /* not JSON */ }
    showBanner(message, "error");
  }
  for (const region of document.querySelectorAll("[data-live]")) refresh(region);
}

// regions that change without a live-bus event (system health) refresh on a timer while the page is visible
for (const region of document.querySelectorAll("[data-every]")) {
  const seconds = Math.max(5, Number(region.dataset.every) || 0);
  setInterval(() => { if (!document.hidden) refresh(region); }, seconds * 1000);
}

document.addEventListener("submit", postInPlace);
setupSound();
connect();
tick();
setInterval(tick, 1000);
