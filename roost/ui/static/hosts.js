// A cluster's hosts with their capacity and state; under SQLite there is no cluster.

import { ago, dash, el, fill, followEvents, debounce, getJSON, labelList, showAlert, usageBar } from "./common.js";

function row(host) {
  const cell = (label, ...content) => el("td", { "data-label": label }, ...content);
  const capacity = host.capacity ?? {};
  const allocated = host.allocated ?? {};
  return el(
    "tr",
    { "data-name": host.name, "data-state": host.state },
    el("th", { scope: "row", "data-label": "Name" }, host.name),
    cell("State", el("span", { class: `status state-${host.state}` }, dash(host.state))),
    cell("VTEP", dash(host.vtep_address)),
    cell("API", dash(host.api)),
    cell("vCPUs", usageBar(allocated.vcpus ?? 0, capacity.vcpus)),
    cell("Memory", usageBar(allocated.memory_mib ?? 0, capacity.memory_mib, " MiB")),
    cell("Heartbeat", ago(host.heartbeat_at)),
    cell("Labels", labelList(host.labels)),
  );
}

async function load() {
  try {
    const hosts = await getJSON("/v1/hosts");
    fill(document.querySelector("#hosts tbody"), hosts.map(row));
    document.getElementById("not-cluster").hidden = hosts.length > 0;
    document.getElementById("hosts").hidden = hosts.length === 0;
    showAlert(null);
  } catch (error) {
    showAlert(error);
  }
}

const later = debounce(load, 250);
followEvents({ "*": (event) => event.type?.startsWith("host.") && later() }, { onOpen: later });
load();
// heartbeats age between events
setInterval(load, 5000);
