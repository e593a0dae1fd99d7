// What the pages read from a VM's JSON the same way: its interfaces, modes and addresses.

export function interfacesOf(vm) {
  return vm.interfaces ?? [];
}

export function modeOf(vm) {
  const modes = [...new Set(interfacesOf(vm).map((nic) => nic.mode))];
  return modes.length ? modes.join(", ") : "vsock";
}

/** Each interface's addresses as lines: "eth0 10.57.0.2", "eth0 dhcp 10.0.0.9", "eth0 fd00::2". */
export function addressLines(vm) {
  const lines = [];
  for (const nic of interfacesOf(vm)) {
    if (nic.ip) lines.push({ nic: nic.name, kind: "ip", text: nic.ip });
    if (nic.observed_ip && nic.observed_ip !== nic.ip) {
      lines.push({ nic: nic.name, kind: "observed", text: nic.observed_ip });
    }
    if (nic.ipv6) lines.push({ nic: nic.name, kind: "ipv6", text: nic.ipv6 });
  }
  return lines;
}
