// The daemon's events as they come, newest first.

import { el, followEvents, showAlert } from "./common.js";

const MAX_SHOWN = 500;
const feed = document.getElementById("feed");
const filter = document.getElementById("filter");
const pause = document.getElementById("pause");
const held = [];
let paused = false;

const SUBJECTS = ["vm", "plugin", "network", "policy", "host"];

export function subjectOf(event) {
  for (const key of SUBJECTS) if (event[key]) return `${key} ${event[key]}`;
  return "";
}

function detailOf(event) {
  const rest = Object.fromEntries(Object.entries(event)
    .filter(([key]) => !["id", "type", "time", ...SUBJECTS].includes(key)));
  return Object.keys(rest).length ? JSON.stringify(rest) : "";
}

function matches(item) {
  const query = filter.value.trim().toLowerCase();
  return !query || item.dataset.search.includes(query);
}

function show(event) {
  const time = event.time ? new Date(event.time).toLocaleTimeString() : "";
  const subject = subjectOf(event);
  const item = el(
    "li",
    { class: `event type-${(event.type ?? "").replace(/[^a-z]/g, "-")}`, "data-type": event.type },
    el("time", { datetime: event.time ?? null }, time),
    " ",
    el("span", { class: "event-type" }, event.type ?? "message"),
    " ",
    el("span", { class: "event-subject" }, subject),
    " ",
    el("span", { class: "event-detail muted" }, detailOf(event)),
  );
  item.dataset.search = `${event.type} ${subject}`.toLowerCase();
  item.hidden = !matches(item);
  feed.prepend(item);
  while (feed.children.length > MAX_SHOWN) feed.lastElementChild.remove();
}

filter.addEventListener("input", () => {
  for (const item of feed.children) item.hidden = !matches(item);
});
pause.addEventListener("click", () => {
  paused = !paused;
  pause.setAttribute("aria-pressed", String(paused));
  pause.textContent = paused ? "Resume" : "Pause";
  if (!paused) held.splice(0).forEach(show);
});
document.getElementById("clear").addEventListener("click", () => feed.replaceChildren());

followEvents({
  "*": (event) => {
    showAlert(null);
    if (paused) held.push(event);
    else show(event);
  },
});
