// Plugins with their default network and the network modes their VMs may use.

import { dash, el, fill, followEvents, debounce, getJSON, showAlert } from "./common.js";

function networkText(network) {
  const parts = [network.mode ?? "bridged"];
  if (network.network) parts.push(`on ${network.network}`);
  if (network.subnet) parts.push(network.subnet);
  if (network.gateway) parts.push(`gateway ${network.gateway}`);
  if (network.ip) parts.push(network.ip);
  if (network.policies?.length) parts.push(`policies ${network.policies.join(", ")}`);
  return parts.join(" ");
}

export function defaultNetwork(manifest) {
  if (Array.isArray(manifest.interfaces)) {
    if (!manifest.interfaces.length) return ["vsock only"];
    return manifest.interfaces.map((nic, index) => `${nic.name ?? `eth${index}`}: ${networkText(nic)}`);
  }
  if (manifest.network) return [networkText(manifest.network)];
  return ["not set (roost's default network)"];
}

function row(plugin) {
  const manifest = plugin.manifest ?? {};
  const cell = (label, ...content) => el("td", { "data-label": label }, ...content);
  const resources = manifest.resources ?? {};
  const vms = plugin.vms ?? [];
  return el(
    "tr",
    { "data-name": plugin.name },
    el("th", { scope: "row", "data-label": "Name" }, plugin.name),
    cell("Version", dash(plugin.version)),
    cell("Default network", el("ul", { class: "addresses" }, defaultNetwork(manifest).map((line) => el("li", {}, line)))),
    cell("Allowed modes", manifest.allowed_network_modes?.length ? manifest.allowed_network_modes.join(", ") : "any"),
    cell("Resources", `${dash(resources.vcpus)} vCPU, ${dash(resources.memory_mib)} MiB`),
    cell("VMs", Array.isArray(vms) ? String(vms.length) : dash(vms)),
  );
}

async function load() {
  try {
    const list = await getJSON("/v1/plugins");
    // the list may carry summaries: each plugin's own JSON has its manifest
    const plugins = await Promise.all(list.map((plugin) =>
      plugin.manifest ? plugin : getJSON(`/v1/plugins/${encodeURIComponent(plugin.name)}`)));
    fill(document.querySelector("#plugins tbody"), plugins.map(row));
    document.getElementById("empty").hidden = plugins.length > 0;
    showAlert(null);
  } catch (error) {
    showAlert(error);
  }
}

const later = debounce(load, 250);
followEvents({ "plugin.installed": later, "plugin.removed": later, "vm.created": later, "vm.deleted": later }, { onOpen: later });
load();
