// One VM: its summary, effective network and where each part came from, config versions
// and what changed between them, live console, vsock and forwards, actions, network patch.

import {
  API, ApiError, ago, dash, describe, el, errorOf, fill, followEvents, getJSON, labelList,
  pageUrl, request, sessionEnded, showAlert, statusBadge,
} from "./common.js";
import { diffLines } from "./diff.js";
import { interfacesOf } from "./model.js";

const prefix = new URL("vms/", document.baseURI).pathname;
const NAME = decodeURIComponent(window.location.pathname.slice(prefix.length).split("/")[0]);
const PATH = `/v1/vms/${encodeURIComponent(NAME)}`;

let vm = null;
let config = null;
let manifest = null;
let removed = false;

document.getElementById("vm-name").textContent = NAME;
document.title = `${NAME} · roost`;

// ---- summary and actions ----

const ALLOWED = {
  start: ["created", "stopped", "crashed", "error"],
  stop: ["starting", "running", "paused"],
  restart: ["running", "paused", "stopped", "crashed", "error"],
  pause: ["running"],
  resume: ["paused"],
};

function fact(list, term, ...value) {
  list.append(el("dt", {}, term), el("dd", {}, ...value));
}

function renderSummary() {
  fill(document.getElementById("vm-status"), statusBadge(vm.status));
  const list = fill(document.getElementById("summary"));
  fact(list, "Plugin", dash(vm.plugin));
  const why = [vm.status_reason, vm.exit_code !== null && vm.exit_code !== undefined ? `exit code ${vm.exit_code}` : null]
    .filter(Boolean).join(", ");
  fact(list, "Status", statusBadge(vm.status), why ? ` ${why}` : "");
  fact(list, "Host", dash(vm.host));
  fact(list, "VMM", vm.vmm ? `${vm.vmm.kind}${vm.vmm.pid ? ` (pid ${vm.vmm.pid})` : ""}` : "—");
  const resources = vm.resources ?? {};
  fact(list, "Resources", `${dash(resources.vcpus)} vCPU, ${dash(resources.memory_mib)} MiB`);
  fact(list, "Config version", `${dash(vm.config_version)} (running: ${dash(vm.running_version)})`);
  fact(
    list,
    "Restart required",
    vm.restart_required ? el("span", { class: "flag" }, "yes: it runs an older version than its latest") : "no",
  );
  fact(list, "Labels", labelList(vm.labels));
  fact(list, "Created", dash(vm.created_at));
  fact(list, "Updated", `${dash(vm.updated_at)} (${ago(vm.updated_at)})`);

  for (const button of document.querySelectorAll("#actions button[data-action]")) {
    const allowed = ALLOWED[button.dataset.action];
    button.disabled = removed || (allowed !== undefined && !allowed.includes(vm.status) &&
      !["unknown", "lost"].includes(vm.status));
  }

  const vsock = fill(document.getElementById("vsock"));
  const info = vm.vsock ?? {};
  fact(vsock, "CID", dash(info.cid));
  fact(vsock, "Available", info.available ? "yes" : `no${info.reason ? `: ${info.reason}` : ""}`);
  fact(vsock, "Backend", dash(info.backend));
  fact(vsock, "Socket", dash(info.uds_path));
}

const actionState = document.getElementById("action-state");

async function act(action) {
  actionState.textContent = `${action}…`;
  try {
    if (action === "remove") {
      await request("DELETE", PATH);
      removed = true;
      window.location.assign(pageUrl("./"));
      return;
    }
    vm = await request("POST", `${PATH}/${action}`);
    actionState.textContent = `${action}: done`;
    showAlert(null);
    renderSummary();
  } catch (error) {
    actionState.textContent = "";
    showAlert(error);
  }
}

const dialog = document.getElementById("confirm-remove");
document.getElementById("confirm-name").textContent = NAME;
dialog.addEventListener("close", () => {
  if (dialog.returnValue === "remove") act("remove");
});
for (const button of document.querySelectorAll("#actions button[data-action]")) {
  button.addEventListener("click", () => {
    if (button.dataset.action === "remove") {
      dialog.returnValue = "";
      dialog.showModal();
    } else {
      act(button.dataset.action);
    }
  });
}

// ---- the effective network and where each part came from ----

function listOf(config) {
  if (!config) return null;
  if (Array.isArray(config.interfaces)) return config.interfaces;
  return config.network ? [config.network] : null;
}

/**
 * Where each field of interface `index` came from: the VM's own config, the plugin's default
 * (a VM that names no network inherits the plugin's; a single `network` of the same mode that
 * names no subnet or network of its own inherits the fields it leaves out), or roost.
 */
export function originOf(key, value, index, vmNets, pluginNets, singleForm) {
  const mine = vmNets?.[index];
  const plugins = pluginNets?.[index];
  const inherits = vmNets === null ||
    (singleForm && mine && plugins && (mine.mode ?? plugins.mode) === plugins.mode &&
      !("subnet" in mine) && !("network" in mine));
  if (mine && key in mine) {
    if (inherits && plugins && key in plugins && JSON.stringify(plugins[key]) !== JSON.stringify(mine[key])) {
      return { origin: "override", note: `this VM (overrides the plugin's ${JSON.stringify(plugins[key])})` };
    }
    return { origin: "vm", note: "this VM" };
  }
  if (inherits && plugins && key in plugins) {
    if (JSON.stringify(plugins[key]) === JSON.stringify(value)) return { origin: "plugin", note: "plugin default" };
    return { origin: "roost", note: `roost (follows from this VM's settings; the plugin's is ${JSON.stringify(plugins[key])})` };
  }
  return { origin: "roost", note: "roost (assigned or derived)" };
}

const SHOWN_FIELDS = [
  "mode", "network", "subnet", "gateway", "ip", "auto_assign", "ipv6", "mac", "default_route",
  "policies", "policy_defaults",
];

function valueText(value) {
  if (value === null || value === undefined) return "—";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function renderNetwork() {
  const box = fill(document.getElementById("network"));
  const effective = config?.effective ?? {};
  const nics = effective.interfaces ?? [];
  const live = interfacesOf(vm);
  const source = effective.network?.source;
  document.getElementById("network-source").textContent = !nics.length
    ? "vsock only: no network interface (the host reaches it over vsock)."
    : `Network source: ${source ?? (config?.config?.interfaces ? "vm (interfaces)" : "plugin")}. ` +
      "Each field says whether it is this VM's own setting, its plugin's default " +
      `(plugin ${vm.plugin}'s manifest as installed now) or roost's.` +
      (vm.running_version && vm.running_version !== config?.version
        ? ` This is config version ${config?.version}; the VMM runs version ${vm.running_version} until it restarts.`
        : "");
  const vmNets = listOf(config?.config);
  const pluginNets = listOf(manifest);
  const singleForm = !Array.isArray(config?.config?.interfaces) && !Array.isArray(manifest?.interfaces);
  nics.forEach((nic, index) => {
    const now = live[index] ?? {};
    const rows = [];
    for (const key of SHOWN_FIELDS) {
      if (!(key in nic) && !(vmNets?.[index] && key in vmNets[index])) continue;
      const { origin, note } = originOf(key, nic[key], index, vmNets, pluginNets, singleForm);
      rows.push(el(
        "tr",
        { "data-field": key, "data-origin": origin },
        el("th", { scope: "row" }, key),
        el("td", {}, valueText(nic[key])),
        el("td", { class: `origin origin-${origin}` }, note),
      ));
    }
    for (const key of ["bridge", "tap", "observed_ip"]) {
      if (now[key]) {
        rows.push(el(
          "tr",
          { "data-field": key, "data-origin": "host" },
          el("th", { scope: "row" }, key),
          el("td", {}, valueText(now[key])),
          el("td", { class: "origin origin-host" }, key === "observed_ip" ? "seen on the host" : "roost (on the host)"),
        ));
      }
    }
    box.append(el(
      "div",
      { class: "table-wrap" },
      el(
        "table",
        { class: "list fields", "data-interface": nic.name ?? index },
        el("caption", {}, `Interface ${nic.name ?? index}`),
        el("thead", {}, el("tr", {},
          el("th", { scope: "col" }, "Field"),
          el("th", { scope: "col" }, "Value"),
          el("th", { scope: "col" }, "From"))),
        el("tbody", {}, rows),
      ),
    ));
  });
}

// ---- config versions ----

function versionSummary(entry) {
  const nics = entry.effective?.interfaces ?? [];
  const modes = nics.length ? nics.map((nic) => `${nic.mode}${nic.ip ? ` ${nic.ip}` : ""}`).join(", ") : "vsock";
  const resources = entry.effective?.resources ?? {};
  return `${modes} · ${dash(resources.vcpus)} vCPU / ${dash(resources.memory_mib)} MiB · ${dash(entry.effective?.vmm)}`;
}

function renderVersions(history) {
  const box = fill(document.getElementById("versions"));
  history.forEach((entry, index) => {
    const before = history[index + 1];
    const tags = [];
    if (entry.version === vm.config_version) tags.push("latest");
    if (entry.version === vm.running_version) tags.push("running");
    const lines = before
      ? diffLines(
        { config: before.config, effective: before.effective },
        { config: entry.config, effective: entry.effective },
      )
      : null;
    const text = lines === null
      ? "version 1: as created\n" + JSON.stringify(entry.config, null, 2)
      : lines.length ? lines.join("\n") : "(no change)";
    box.append(el(
      "details",
      { class: "version", "data-version": entry.version, open: index === 0 },
      el(
        "summary",
        {},
        el("strong", {}, `Version ${entry.version}`),
        tags.length ? ` (${tags.join(", ")})` : "",
        ` · ${dash(entry.created_at)} · ${versionSummary(entry)}`,
      ),
      el("pre", { class: "diff" }, text),
    ));
  });
}

// ---- console ----

const MAX_CONSOLE = 200_000;
const consoleBox = document.getElementById("console");
const consoleState = document.getElementById("console-state");
let consoleText = "";
let consoleOffset = 0;
let following = false;

function appendConsole(text) {
  if (!text) return;
  const atBottom = consoleBox.scrollHeight - consoleBox.scrollTop - consoleBox.clientHeight < 40;
  consoleText += text;
  if (consoleText.length > MAX_CONSOLE) consoleText = consoleText.slice(-MAX_CONSOLE);
  consoleBox.textContent = consoleText;
  if (atBottom) consoleBox.scrollTop = consoleBox.scrollHeight;
}

/** Stream the console from where it was read up to, while the VM runs. */
async function followConsole() {
  if (following || removed) return;
  following = true;
  consoleState.textContent = "Following the console…";
  try {
    const response = await fetch(`${API}${PATH}/console?follow=true&offset=${consoleOffset}`, {
      credentials: "same-origin",
      headers: { "X-Roost-UI": "1" },
    });
    if (response.status === 401) sessionEnded();
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      consoleOffset += value.byteLength;
      appendConsole(decoder.decode(value, { stream: true }));
    }
    appendConsole(decoder.decode());
    consoleState.textContent = "The VM is not running: the console ends here (it follows again when the VM starts).";
  } catch (error) {
    consoleState.textContent = `The console could not be read: ${describe(error)}`;
  } finally {
    following = false;
  }
}

// ---- the network patch ----

const form = document.getElementById("patch");
const formError = document.getElementById("patch-error");
const patchState = document.getElementById("patch-state");
const SINGLE_FIELDS = ["mode", "network", "subnet", "gateway", "ip"];

function singleNetwork() {
  return !Array.isArray(config?.config?.interfaces) && (config?.effective?.interfaces ?? []).length <= 1;
}

function fillForm() {
  const single = singleNetwork();
  document.getElementById("patch-single").hidden = !single;
  document.getElementById("patch-multi").hidden = single;
  if (!single) return;
  const own = config?.config?.network ?? {};
  const effective = config?.effective?.network ?? {};
  for (const key of SINGLE_FIELDS) {
    const input = form.elements.namedItem(`network.${key}`);
    if (key === "mode") {
      input.value = own.mode ?? effective.mode ?? "vsock";
    } else {
      input.value = own[key] ?? "";
      input.placeholder = effective[key] ? `${effective[key]} (now)` : "(none)";
    }
  }
}

function clearErrors() {
  formError.hidden = true;
  formError.textContent = "";
  for (const message of form.querySelectorAll(".field-error")) message.remove();
  for (const input of form.querySelectorAll("[aria-invalid]")) {
    input.removeAttribute("aria-invalid");
    input.removeAttribute("aria-describedby");
  }
}

/** Each detail next to the input named by its `loc`; the rest at the form's top. */
export function showFormErrors(error) {
  clearErrors();
  const unplaced = [];
  let first = null;
  (error.details ?? []).forEach((detail, index) => {
    const input = form.elements.namedItem(detail.loc);
    if (!(input instanceof HTMLElement) || input.closest("[hidden]")) {
      unplaced.push(`${detail.loc}: ${detail.msg}`);
      return;
    }
    const id = `error-${index}`;
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", id);
    input.closest(".field").append(el("p", { class: "field-error", id, "data-loc": detail.loc }, detail.msg));
    first ??= input;
  });
  if (unplaced.length || !first) {
    formError.textContent = unplaced.length
      ? `Nothing was changed: ${unplaced.join("; ")} (${error.code})`
      : `Nothing was changed: ${describe(error)}`;
    formError.hidden = false;
  }
  (first ?? formError).focus();
}

function patchBody() {
  const raw = form.elements.namedItem("patch").value.trim();
  if (raw) {
    try {
      return JSON.parse(raw);
    } catch (error) {
      throw new ApiError(0, "invalid_json", "the patch is not JSON", [{ loc: "patch", msg: `is not JSON: ${error.message}` }]);
    }
  }
  const mode = form.elements.namedItem("network.mode").value;
  if (mode === "vsock") return { network: { mode } };
  const network = structuredClone(config?.config?.network ?? {});
  for (const key of SINGLE_FIELDS) {
    const value = form.elements.namedItem(`network.${key}`).value.trim();
    if (value) network[key] = value;
    else delete network[key];
  }
  return { network };
}

form.addEventListener("submit", async (submitted) => {
  submitted.preventDefault();
  clearErrors();
  patchState.textContent = "Applying…";
  try {
    const restart = form.elements.namedItem("restart").checked ? "?restart=true" : "";
    const stored = await request("PATCH", `${PATH}/config${restart}`, patchBody());
    patchState.textContent = `Stored as config version ${stored.version}.`;
    form.elements.namedItem("patch").value = "";
    await load();
    if (vm.restart_required) patchState.textContent += " It takes effect at the VM's next start (Restart applies it).";
  } catch (error) {
    patchState.textContent = "";
    if (error instanceof ApiError) showFormErrors(error);
    else showAlert(error);
  }
});

// ---- loading and live updates ----

async function loadForwards() {
  const forwards = await getJSON(`${PATH}/forwards`);
  const body = fill(document.querySelector("#forwards tbody"));
  for (const forward of forwards) {
    body.append(el("tr", {}, el("td", {}, String(forward.id)), el("td", {}, forward.listen), el("td", {}, String(forward.guest_port))));
  }
  document.getElementById("forwards").hidden = !forwards.length;
  document.getElementById("no-forwards").hidden = forwards.length > 0;
}

async function load() {
  vm = await getJSON(PATH);
  const [current, history] = await Promise.all([
    getJSON(`${PATH}/config`),
    getJSON(`${PATH}/config/history`),
  ]);
  config = current;
  if (manifest === null && vm.plugin) {
    try {
      manifest = (await getJSON(`/v1/plugins/${encodeURIComponent(vm.plugin)}`)).manifest ?? {};
    } catch {
      manifest = {};
    }
  }
  renderSummary();
  renderNetwork();
  renderVersions(history);
  if (!form.contains(document.activeElement)) fillForm();
}

function gone() {
  removed = true;
  showAlert(`VM ${NAME} was removed.`);
  renderSummary();
}

async function loadAll() {
  try {
    await load();
    await loadForwards();
    showAlert(null);
    followConsole();
  } catch (error) {
    if (error instanceof ApiError && error.status === 404 && vm === null) {
      removed = true;
      showAlert(`There is no VM ${NAME} (any more): the VM list shows those that exist.`);
      return;
    }
    showAlert(error);
  }
}

const reload = async () => {
  try {
    await load();
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) gone();
    else showAlert(error);
  }
};

followEvents(
  {
    "vm.status": (event) => {
      if (!vm || removed) return;
      vm.status = event.status;
      renderSummary();
      reload();
      if (["starting", "running"].includes(event.status)) followConsole();
    },
    "vm.config": reload,
    "vm.deleted": gone,
  },
  { vm: NAME, onOpen: () => vm && !removed && reload() },
);
loadAll();
