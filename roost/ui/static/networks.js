// Networks with their address use: leased addresses out of those the subnet has for VMs.

import { dash, el, fill, followEvents, debounce, getJSON, showAlert, usageBar } from "./common.js";

/** The addresses of an IPv4 subnet VMs can lease: all but network, broadcast and gateway. */
export function subnetSize(network) {
  if (typeof network.size === "number") return network.size;
  const match = /^(\d+\.\d+\.\d+\.\d+)\/(\d+)$/.exec(network.subnet ?? "");
  if (!match) return null;
  const prefix = Number(match[2]);
  const all = 2 ** (32 - prefix);
  if (prefix >= 31) return all;
  return all - 2 - (network.gateway ? 1 : 0);
}

function row(network) {
  const cell = (label, ...content) => el("td", { "data-label": label }, ...content);
  const leases = network.leases ?? [];
  const size = subnetSize(network);
  return el(
    "tr",
    { "data-name": network.name },
    el("th", { scope: "row", "data-label": "Name" }, network.name),
    cell("Kind", `${dash(network.kind)}${network.managed === false ? " (not managed)" : ""}`),
    cell("Bridge", dash(network.bridge)),
    cell("Subnet", dash(network.subnet)),
    cell("Gateway", dash(network.gateway)),
    cell("IPv6 prefix", dash(network.ipv6_prefix)),
    cell("VNI / MTU", `${dash(network.vni)} / ${dash(network.mtu)}`),
    cell(
      "Address use",
      usageBar(leases.length, size),
      leases.length
        ? el("details", {}, el("summary", {}, "leases"), el("ul", { class: "addresses" }, leases.map((ip) => el("li", {}, ip))))
        : null,
    ),
  );
}

async function load() {
  try {
    const networks = await getJSON("/v1/networks");
    fill(document.querySelector("#networks tbody"), networks.map(row));
    showAlert(null);
  } catch (error) {
    showAlert(error);
  }
}

const later = debounce(load, 250);
// leases come and go with VMs' addresses
followEvents({ "*": later }, { onOpen: later });
load();
