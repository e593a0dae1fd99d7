// The network map: an SVG of the networks (bridges) with the VMs on them, an edge per
// interface (its tap and address, the policies on it), VMs with no interface apart as
// isolated, and in a cluster each host as a group with VXLAN links between hosts.

import {
  debounce, el, fill, followEvents, getJSON, showAlert, vmUrl,
} from "./common.js";
import { interfacesOf } from "./model.js";

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 168;
const NODE_H = 48;
const NETWORK_H = 62;
const GAP = 28;
const COLUMNS = 4;
const PAD = 24;
const NETWORK_Y = PAD;
const VM_TOP = NETWORK_Y + NETWORK_H + 150; // room for the edges' labels
const wrap = document.getElementById("map-wrap");

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function text(x, y, content, className) {
  return svg("text", { x, y, class: className }, content);
}

/** The name a network node goes by for an interface: its network, else its bridge's. */
function networkKey(nic, byBridge) {
  if (nic.network) return nic.network;
  if (nic.bridge && byBridge.has(nic.bridge)) return byBridge.get(nic.bridge).name;
  return nic.bridge ? `bridge ${nic.bridge}` : `${nic.mode} (unattached)`;
}

function policiesOf(nic) {
  return nic.policies?.length ? nic.policies : [];
}

/** Where every node goes: networks in a row at the top, VMs below in their host's group. */
export function layout(vms, networks, hosts) {
  const byBridge = new Map(networks.filter((n) => n.bridge).map((n) => [n.bridge, n]));
  const nodes = new Map(networks.map((n) => [n.name, { network: n, name: n.name }]));
  for (const vm of vms) {
    for (const nic of interfacesOf(vm)) {
      const key = networkKey(nic, byBridge);
      if (!nodes.has(key)) nodes.set(key, { network: { name: key, bridge: nic.bridge, kind: "unregistered" }, name: key });
    }
  }
  const cluster = hosts.length > 0;
  const groupNames = cluster ? hosts.map((h) => h.name) : [""];
  const groups = new Map(groupNames.map((name) => [name, { name, host: hosts.find((h) => h.name === name), connected: [], isolated: [] }]));
  // fewer crossings: each VM after those whose networks come earlier (by name), then each
  // network over the middle of its VMs
  const order = [...nodes.keys()].sort();
  const rank = (vm) => {
    const ranks = interfacesOf(vm).map((nic) => order.indexOf(networkKey(nic, byBridge)));
    return ranks.length ? ranks.reduce((a, b) => a + b, 0) / ranks.length : Infinity;
  };
  const sorted = [...vms].sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
  for (const vm of sorted) {
    const key = cluster ? (vm.host ?? "") : "";
    if (!groups.has(key)) groups.set(key, { name: key, host: null, connected: [], isolated: [] });
    const group = groups.get(key);
    (interfacesOf(vm).length ? group.connected : group.isolated).push(vm);
  }

  const placed = new Map();
  let x = PAD;
  let bottom = VM_TOP;
  const boxes = [];
  for (const group of groups.values()) {
    const fewest = cluster ? 2 : 1; // room for the host's title
    const columns = Math.max(fewest, Math.min(COLUMNS, Math.max(group.connected.length, group.isolated.length)));
    const inner = columns * NODE_W + (columns - 1) * GAP;
    const left = x + (cluster ? GAP : 0);
    let y = VM_TOP + (cluster ? 40 : 0);
    group.connected.forEach((vm, index) => {
      placed.set(vm.name, {
        x: left + (index % columns) * (NODE_W + GAP),
        y: y + Math.floor(index / columns) * (NODE_H + GAP),
      });
    });
    if (group.connected.length) y += Math.ceil(group.connected.length / columns) * (NODE_H + GAP);
    let isolatedBox = null;
    if (group.isolated.length) {
      y += 30;
      const rows = Math.ceil(group.isolated.length / columns);
      isolatedBox = { x: left - 10, y: y - 28, width: inner + 20, height: rows * (NODE_H + GAP) + 18 };
      group.isolated.forEach((vm, index) => {
        placed.set(vm.name, {
          x: left + (index % columns) * (NODE_W + GAP),
          y: y + Math.floor(index / columns) * (NODE_H + GAP),
          isolated: true,
        });
      });
      y += rows * (NODE_H + GAP);
    }
    const width = inner + (cluster ? 2 * GAP : 0);
    boxes.push({ group, x, y: VM_TOP - 10, width, height: y - VM_TOP + 20, isolatedBox });
    bottom = Math.max(bottom, y + 10);
    x += width + GAP * 2;
  }
  const vmWidth = x - GAP * 2 + PAD;

  const middle = new Map();
  for (const vm of vms) {
    const place = placed.get(vm.name);
    for (const nic of interfacesOf(vm)) {
      const key = networkKey(nic, byBridge);
      const xs = middle.get(key) ?? [];
      xs.push(place.x);
      middle.set(key, xs);
    }
  }
  const centre = (node) => {
    const xs = middle.get(node.name);
    return xs ? xs.reduce((a, b) => a + b, 0) / xs.length : Infinity;
  };
  const networkNodes = [...nodes.values()]
    .sort((a, b) => centre(a) - centre(b) || a.name.localeCompare(b.name));
  const rowWidth = networkNodes.length * (NODE_W + GAP) - GAP + 2 * PAD;
  const width = Math.max(vmWidth, rowWidth, 320);
  let nx = (width - rowWidth) / 2 + PAD;
  for (const node of networkNodes) {
    node.x = nx;
    node.y = NETWORK_Y;
    nx += NODE_W + GAP;
  }
  return { byBridge, nodes, networkNodes, placed, boxes, cluster, width, height: bottom + (cluster ? 90 : PAD) };
}

function networkNode(node) {
  const network = node.network;
  const classes = ["network", `kind-${network.kind ?? "unknown"}`];
  if (network.bridge) classes.push("bridge");
  const detail = [network.bridge, network.subnet].filter(Boolean).join(" · ") || network.kind || "";
  const extra = [network.vni ? `VNI ${network.vni}` : null, network.mtu ? `MTU ${network.mtu}` : null].filter(Boolean).join(" · ");
  return svg(
    "g",
    { class: classes.join(" "), "data-name": node.name, "data-bridge": network.bridge ?? null, transform: `translate(${node.x} ${node.y})` },
    svg("title", {}, `${node.name}: ${network.kind ?? ""} network${network.bridge ? ` on bridge ${network.bridge}` : ""}${network.subnet ? `, ${network.subnet}` : ""}`),
    svg("rect", { width: NODE_W, height: NETWORK_H, rx: 6 }),
    text(10, 19, node.name, "title"),
    text(10, 36, detail, "detail"),
    extra ? text(10, 52, extra, "detail") : null,
  );
}

function vmNode(vm, place) {
  const nics = interfacesOf(vm);
  const policies = [...new Set(nics.flatMap(policiesOf))];
  const classes = ["vm", `status-${vm.status}`];
  if (place.isolated) classes.push("isolated");
  const summary = nics.length
    ? nics.map((nic) => `${nic.name}: ${nic.mode} ${nic.ip ?? nic.observed_ip ?? ""}`).join("; ")
    : "vsock only (no network interface)";
  const node = svg(
    "g",
    { class: classes.join(" "), "data-name": vm.name, "data-status": vm.status, transform: `translate(${place.x} ${place.y})` },
    svg("title", {}, `${vm.name} (${vm.status}, plugin ${vm.plugin}): ${summary}${policies.length ? `; policies: ${policies.join(", ")}` : ""}`),
    svg("rect", { width: NODE_W, height: NODE_H, rx: 10 }),
    svg("circle", { cx: 14, cy: 16, r: 5, class: "dot" }),
    text(26, 20, vm.name, "title"),
    text(10, 38, policies.length ? `${vm.status} · policies: ${policies.join(", ")}` : `${vm.status} · ${vm.plugin ?? ""}`, "detail"),
  );
  return svg("a", { href: vmUrl(vm.name), class: "vm-link", "aria-label": `VM ${vm.name}, ${vm.status}: open it` }, node);
}

function edges(vms, plan) {
  const drawn = [];
  const counts = new Map();
  for (const vm of vms) {
    const place = plan.placed.get(vm.name);
    const nics = interfacesOf(vm);
    nics.forEach((nic, index) => {
      const node = plan.nodes.get(networkKey(nic, plan.byBridge));
      const x1 = place.x + NODE_W * (index + 1) / (nics.length + 1);
      const y1 = place.y;
      const used = counts.get(node.name) ?? 0;
      counts.set(node.name, used + 1);
      const x2 = node.x + NODE_W / 2 + ((used % 5) - 2) * 8;
      const y2 = node.y + NETWORK_H;
      const address = [nic.ip, nic.observed_ip && nic.observed_ip !== nic.ip ? `dhcp ${nic.observed_ip}` : null, nic.ipv6]
        .filter(Boolean).join(" ");
      const label = `${nic.tap ?? nic.name ?? ""} ${address}`.trim();
      const policies = policiesOf(nic);
      // along the line, from near the VM, at a height of its own so that labels side by side
      // do not sit on each other
      const along = 0.4 + (drawn.length % 3) * 0.18;
      const lx = x1 + (x2 - x1) * along;
      const ly = y1 + (y2 - y1) * along;
      let angle = (Math.atan2(y2 - y1, x2 - x1) * 180) / Math.PI;
      if (angle > 90) angle -= 180;
      if (angle < -90) angle += 180;
      const turn = `rotate(${angle.toFixed(1)} ${lx.toFixed(1)} ${ly.toFixed(1)})`;
      drawn.push(svg(
        "g",
        { class: `edge mode-${nic.mode}`, "data-vm": vm.name, "data-network": node.name, "data-interface": nic.name ?? index, "data-tap": nic.tap ?? null },
        svg("title", {}, `${vm.name} ${nic.name}: ${nic.mode} on ${node.name}${nic.tap ? ` via ${nic.tap}` : ""}${address ? `, ${address}` : ""}${policies.length ? `; policies: ${policies.join(", ")}` : ""}`),
        svg("line", { x1, y1, x2, y2 }),
        svg("text", { x: lx, y: ly - 3, class: "edge-label", transform: turn }, label),
        policies.length
          ? svg("text", { x: lx, y: ly + 10, class: "edge-label policies", transform: turn }, `policies: ${policies.join(", ")}`)
          : null,
      ));
    });
  }
  return drawn;
}

function hostGroups(plan) {
  const drawn = [];
  for (const box of plan.boxes) {
    const host = box.group.host;
    const parts = [];
    if (plan.cluster) {
      const state = host?.state ?? "unknown";
      parts.push(
        svg("rect", { x: box.x, y: box.y, width: box.width, height: box.height, rx: 12, class: "host-box" }),
        text(box.x + 12, box.y + 22, box.group.name ? `host ${box.group.name} · ${state}${host?.vtep_address ? ` · VTEP ${host.vtep_address}` : ""}` : "no host", "host-title"),
      );
    }
    if (box.isolatedBox) {
      const b = box.isolatedBox;
      parts.push(
        svg("rect", { x: b.x, y: b.y, width: b.width, height: b.height, rx: 8, class: "isolated-box" }),
        text(b.x + 10, b.y + 16, "isolated: vsock only", "isolated-title"),
      );
    }
    drawn.push(svg(
      "g",
      { class: plan.cluster ? `host state-${host?.state ?? "unknown"}` : "hostless", "data-name": box.group.name || null },
      parts,
    ));
  }
  return drawn;
}

function vxlanLinks(plan, networks) {
  if (!plan.cluster || plan.boxes.length < 2) return [];
  const vnis = networks.filter((n) => n.vni).map((n) => `${n.name} VNI ${n.vni}`);
  const label = `VXLAN${vnis.length ? `: ${vnis.join(", ")}` : ""}`;
  const boxes = plan.boxes.filter((box) => box.group.host);
  const links = [];
  boxes.forEach((from, i) => {
    boxes.slice(i + 1).forEach((to, j) => {
      const x1 = from.x + from.width / 2;
      const x2 = to.x + to.width / 2;
      const y = Math.max(from.y + from.height, to.y + to.height);
      const depth = 24 + j * 22;
      links.push(svg(
        "g",
        { class: "vxlan", "data-from": from.group.name, "data-to": to.group.name },
        svg("title", {}, `${from.group.name} ↔ ${to.group.name}: ${label}`),
        svg("path", { d: `M ${x1} ${from.y + from.height} C ${x1} ${y + depth}, ${x2} ${y + depth}, ${x2} ${to.y + to.height}` }),
        links.length ? null : text((x1 + x2) / 2, y + depth - 2, label, "edge-label vxlan-label"),
      ));
    });
  });
  return links;
}

function draw(vms, networks, hosts) {
  const plan = layout(vms, networks, hosts);
  const focused = document.activeElement?.closest?.(".vm-link")?.querySelector(".vm")?.dataset.name;
  const picture = svg(
    "svg",
    {
      viewBox: `0 0 ${plan.width} ${plan.height}`,
      width: plan.width,
      height: plan.height,
      class: "map",
      role: "group",
      "aria-label": `Network map: ${plan.networkNodes.length} networks, ${vms.length} VMs`,
    },
    hostGroups(plan),
    vxlanLinks(plan, networks),
    svg("g", { class: "edges" }, edges(vms, plan)),
    svg("g", { class: "networks" }, plan.networkNodes.map(networkNode)),
    svg("g", { class: "vms" }, vms.map((vm) => vmNode(vm, plan.placed.get(vm.name)))),
  );
  fill(wrap, picture);
  if (!vms.length) wrap.append(el("p", { class: "muted" }, "No VMs yet."));
  if (focused) {
    for (const node of picture.querySelectorAll(".vm")) {
      if (node.dataset.name === focused) node.parentElement.focus();
    }
  }
}

async function load() {
  try {
    const [vms, networks, hosts] = await Promise.all([
      getJSON("/v1/vms"),
      getJSON("/v1/networks"),
      getJSON("/v1/hosts"),
    ]);
    draw(vms, networks, hosts);
    showAlert(null);
  } catch (error) {
    showAlert(error);
  }
}

const later = debounce(load, 250);
followEvents({ "*": later, overflow: later }, { onOpen: later });
load();
