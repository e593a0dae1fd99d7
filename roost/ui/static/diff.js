// What changed between two JSON values, as text lines ("config.network.ip  - -> 10.100.0.7"),
// the way `roost vm config patch` prints it.

/** Every leaf of `value` by its dotted path (an empty object or list is a leaf of its own). */
export function flatten(value, path = "", into = new Map()) {
  const isContainer = value !== null && typeof value === "object";
  const entries = isContainer ? Object.entries(value) : [];
  if (!entries.length) {
    if (path) into.set(path, value);
    return into;
  }
  for (const [key, child] of entries) flatten(child, path ? `${path}.${key}` : key, into);
  return into;
}

function shown(value) {
  if (value === undefined) return "-";
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** The lines saying what differs from `before` to `after`, in path order; none when equal. */
export function diffLines(before, after) {
  const old = flatten(before);
  const now = flatten(after);
  const paths = [...new Set([...old.keys(), ...now.keys()])].sort();
  const changed = paths.filter((path) => JSON.stringify(old.get(path)) !== JSON.stringify(now.get(path)));
  const width = Math.max(0, ...changed.map((path) => path.length));
  return changed.map((path) => `${path.padEnd(width)}  ${shown(old.get(path))} -> ${shown(now.get(path))}`);
}
