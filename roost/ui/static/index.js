// The VM table: one row per VM with every interface's addresses, filtered and sorted here,
// kept current from the daemon's events.

import {
  ApiError, dash, el, fill, followEvents, getJSON, labelList, labelText, showAlert,
  statusBadge, vmUrl,
} from "./common.js";
import { addressLines, interfacesOf, modeOf } from "./model.js";

const vms = new Map(); // name -> the VM's JSON
const table = document.getElementById("vms");
const body = table.tBodies[0];
const filter = document.getElementById("filter");
const count = document.getElementById("count");
const empty = document.getElementById("empty");
let sortKey = "name";
let ascending = true;

const SORTS = {
  name: (vm) => vm.name,
  plugin: (vm) => vm.plugin ?? "",
  status: (vm) => vm.status ?? "",
  mode: modeOf,
  addresses: (vm) => addressLines(vm).map((line) => line.text).join(" "),
  mac: (vm) => interfacesOf(vm).map((nic) => nic.mac ?? "").join(" "),
  vmm: (vm) => vm.vmm?.kind ?? "",
  host: (vm) => vm.host ?? "",
  restart: (vm) => (vm.restart_required ? "1" : "0"),
  labels: (vm) => labelText(vm.labels).join(" "),
};

function searchText(vm) {
  return [
    vm.name, vm.plugin, vm.status, modeOf(vm), vm.vmm?.kind, vm.host,
    ...addressLines(vm).map((line) => line.text),
    ...interfacesOf(vm).map((nic) => nic.mac),
    ...labelText(vm.labels),
  ].join(" ").toLowerCase();
}

function addressCell(vm) {
  const lines = addressLines(vm);
  if (!lines.length) return "—";
  const kinds = { ip: "", observed: "dhcp ", ipv6: "" };
  return el(
    "ul",
    { class: "addresses" },
    lines.map((line) =>
      el(
        "li",
        { "data-kind": line.kind },
        el("span", { class: "nic" }, line.nic),
        " ",
        el("span", { class: "muted" }, kinds[line.kind]),
        el("span", { class: "address" }, line.text),
      ),
    ),
  );
}

function macCell(vm) {
  const nics = interfacesOf(vm).filter((nic) => nic.mac);
  if (!nics.length) return "—";
  return el("ul", { class: "addresses" }, nics.map((nic) => el("li", {}, nic.mac)));
}

function vmmText(vm) {
  if (!vm.vmm) return "—";
  return vm.vmm.pid ? `${vm.vmm.kind} (pid ${vm.vmm.pid})` : vm.vmm.kind;
}

function row(vm) {
  const cell = (label, ...content) => el("td", { "data-label": label }, ...content);
  return el(
    "tr",
    { "data-name": vm.name, "data-status": vm.status },
    el(
      "th",
      { scope: "row", "data-label": "Name" },
      el("a", { href: vmUrl(vm.name) }, vm.name),
    ),
    cell("Plugin", dash(vm.plugin)),
    cell("Status", statusBadge(vm.status)),
    cell("Mode", modeOf(vm)),
    cell("Addresses", addressCell(vm)),
    cell("MAC", macCell(vm)),
    cell("VMM", vmmText(vm)),
    cell("Host", dash(vm.host)),
    cell(
      "Restart required",
      vm.restart_required
        ? el("span", { class: "flag", title: "runs an older config version than its latest" }, "yes")
        : "no",
    ),
    cell("Labels", labelList(vm.labels)),
  );
}

function render() {
  const query = filter.value.trim().toLowerCase();
  const key = SORTS[sortKey];
  const shown = [...vms.values()]
    .filter((vm) => !query || searchText(vm).includes(query))
    .sort((a, b) => {
      const order = key(a).localeCompare(key(b), undefined, { numeric: true }) ||
        a.name.localeCompare(b.name);
      return ascending ? order : -order;
    });
  fill(body, shown.map(row));
  count.textContent = query ? `${shown.length} of ${vms.size}` : `${vms.size} VM${vms.size === 1 ? "" : "s"}`;
  empty.hidden = vms.size > 0;
}

async function loadAll() {
  try {
    const list = await getJSON("/v1/vms");
    vms.clear();
    for (const vm of list) vms.set(vm.name, vm);
    showAlert(null);
  } catch (error) {
    showAlert(error);
  }
  render();
}

// names whose VM to read again, read together shortly after the events that asked
const stale = new Set();
let refreshing = null;

function refresh(name) {
  stale.add(name);
  refreshing ??= setTimeout(refreshStale, 50);
}

async function refreshStale() {
  const names = [...stale];
  stale.clear();
  refreshing = null;
  await Promise.all(names.map(async (name) => {
    try {
      vms.set(name, await getJSON(`/v1/vms/${encodeURIComponent(name)}`));
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) vms.delete(name);
      else showAlert(error);
    }
  }));
  render();
}

for (const button of table.querySelectorAll("th button[data-sort]")) {
  button.addEventListener("click", () => {
    const key = button.dataset.sort;
    ascending = key === sortKey ? !ascending : true;
    sortKey = key;
    for (const header of table.tHead.rows[0].cells) header.removeAttribute("aria-sort");
    button.parentElement.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    render();
  });
}
filter.addEventListener("input", render);

followEvents(
  {
    "vm.created": (event) => refresh(event.vm),
    "vm.config": (event) => refresh(event.vm),
    "vm.status": (event) => {
      const vm = vms.get(event.vm);
      if (vm) {
        // shown at once; the rest of the record (pid, addresses) follows
        vm.status = event.status;
        render();
      }
      refresh(event.vm);
    },
    "vm.deleted": (event) => {
      vms.delete(event.vm);
      render();
    },
    overflow: loadAll,
  },
  { onOpen: loadAll },
);
loadAll();
