// What every page shares: the API base, requests and their errors, DOM building (text only,
// never markup from data), the nav, and the daemon's event stream.

const root = document.documentElement;
export const API = root.dataset.api ?? "";
export const PAGE = root.dataset.page ?? "";
// the daemon's /ui/ mount serves a login page; `roost ui` has a one-time token instead
export const ON_DAEMON = API === "";

export const EVENT_TYPES = [
  "vm.created", "vm.status", "vm.config", "vm.deleted", "vm.cni_detach_failed",
  "plugin.installed", "plugin.removed",
  "network.created", "network.removed",
  "policy.created", "policy.changed", "policy.removed",
  "host.joined", "host.offline", "host.fenced", "host.cordoned", "host.uncordoned",
];

/** A URL of the page's own mount (`vms/web-1`), resolved against <base href>. */
export function pageUrl(path) {
  return new URL(path, document.baseURI).href;
}

export function vmUrl(name) {
  return pageUrl("vms/" + encodeURIComponent(name));
}

/** An error the API answered: its code, message and details ({loc, msg}). */
export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details ?? [];
  }
}

export async function errorOf(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    return new ApiError(response.status, error.code, error.message, error.details);
  } catch {
    const message = text.trim() || response.statusText || "no answer";
    return new ApiError(response.status, "http_" + response.status, message, []);
  }
}

let ended = false;

/** The session is gone: on the daemon log in again; under `roost ui` say how to get one. */
export function sessionEnded() {
  if (ended) return;
  ended = true;
  if (ON_DAEMON && PAGE !== "login") {
    window.location.assign(pageUrl("login"));
    return;
  }
  showAlert("The session ended: run roost ui again and open the address it prints.");
}

/**
 * A call to the API at `path` ("/v1/..."): its JSON (null for 204), or an ApiError. Every
 * call names the UI (the server's CSRF check for changes) and sends the session cookie.
 */
export async function request(method, path, body, { signal } = {}) {
  const init = {
    method,
    credentials: "same-origin",
    headers: { "X-Roost-UI": "1", Accept: "application/json" },
    signal,
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", "roost does not answer: " + error.message, []);
  }
  if (response.status === 401) {
    sessionEnded();
    throw await errorOf(response);
  }
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  return response.json();
}

export const getJSON = (path, options) => request("GET", path, undefined, options);

/** An error as a sentence for the page: the API's message, its code, and its details. */
export function describe(error) {
  if (!(error instanceof ApiError)) return String(error?.message ?? error);
  const parts = [error.message];
  for (const detail of error.details) {
    const line = `${detail.loc}: ${detail.msg}`;
    if (!error.message.includes(line)) parts.push(line);
  }
  return parts.join(" — ") + (error.code ? ` (${error.code})` : "");
}

/** Show `message` (or an error) in the page's alert line; null hides it. */
export function showAlert(message) {
  const box = document.getElementById("alert");
  if (!box) return;
  if (message === null) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = typeof message === "string" ? message : describe(message);
  box.hidden = false;
}

/**
 * An element: `el("td", {class: "x", "data-name": n}, "text", child)`. Attributes go through
 * setAttribute, children strings become text nodes: data never becomes markup.
 */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

export function dash(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

export function labelText(labels) {
  return Object.entries(labels ?? {}).map(([key, value]) => `${key}=${value}`);
}

export function labelList(labels) {
  const items = labelText(labels);
  if (!items.length) return "—";
  return el("ul", { class: "labels" }, items.map((text) => el("li", {}, text)));
}

export function statusBadge(status) {
  return el("span", { class: `status status-${status}`, "data-status": status }, status);
}

/** "12 s ago" for an ISO time. */
export function ago(iso) {
  if (!iso) return "—";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

/** A <meter> of `used` out of `size` with its figures as text beside it. */
export function usageBar(used, size, unit = "") {
  if (size === null || size === undefined || size <= 0) return el("span", {}, `${used}${unit}`);
  const label = `${used}${unit} / ${size}${unit}`;
  return el(
    "span",
    { class: "usage" },
    el("meter", { min: 0, max: size, value: used, high: size * 0.8, optimum: 0, "aria-label": label }),
    el("span", { class: "usage-text" }, label),
  );
}

function setUpNav() {
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    if (link.dataset.page === PAGE || (PAGE === "vm" && link.dataset.page === "index")) {
      link.setAttribute("aria-current", "page");
    }
  }
  const logout = document.getElementById("logout");
  if (!logout || !ON_DAEMON || PAGE === "login") return;
  logout.hidden = false;
  logout.addEventListener("click", async () => {
    try {
      await fetch(pageUrl("logout"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-Roost-UI": "1" },
      });
    } finally {
      window.location.assign(pageUrl("login"));
    }
  });
}

function setLive(text) {
  const live = document.getElementById("live");
  if (live) live.textContent = text;
}

/**
 * Follow the daemon's events: `handlers[type](event)` for each (`"*"` for every type);
 * `vm` keeps one VM's events; `onOpen()` each time the stream (re)opens: what happened before it may be missed, so a page
 * reads its data again then. An
 * EventSource reconnects by itself; one the server refused (401) is closed, and then the
 * session is checked.
 */
export function followEvents(handlers, { onOpen, vm } = {}) {
  let source;
  const dispatch = (type, message) => {
    let data;
    try {
      data = JSON.parse(message.data);
    } catch {
      return;
    }
    handlers[type]?.(data);
    handlers["*"]?.(data);
  };
  const connect = () => {
    const query = vm ? "?vm=" + encodeURIComponent(vm) : "";
    source = new EventSource(API + "/v1/events" + query, { withCredentials: true });
    for (const type of [...EVENT_TYPES, "overflow"]) {
      source.addEventListener(type, (message) => dispatch(type, message));
    }
    source.addEventListener("message", (message) => dispatch("message", message));
    source.addEventListener("open", () => {
      setLive("● live");
      onOpen?.();
    });
    source.addEventListener("error", () => {
      setLive("○ reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // refused, not dropped: a 401 ends the session; anything else, try again shortly
        getJSON("/v1/hosts").then(
          () => setTimeout(connect, 2000),
          (error) => {
            if (!(error instanceof ApiError && error.status === 401)) setTimeout(connect, 2000);
          },
        );
      }
    });
  };
  connect();
  window.addEventListener("pagehide", () => source?.close());
}

/** Run `work` at most once per `delay` ms, after the last call asked for it. */
export function debounce(work, delay) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => work(...args), delay);
  };
}

setUpNav();
