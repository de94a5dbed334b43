// Building DOM from data. Everything that came from users (task names, arguments, results,
// errors, tracebacks) goes in as text nodes, never as markup: no innerHTML anywhere.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "style") Object.assign(el.style, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function text(id, value) {
  const el = document.getElementById(id);
  const s = String(value);
  if (el && el.textContent !== s) el.textContent = s;
}

export const $ = (id) => document.getElementById(id);

export function fmtS(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  const s = Number(seconds);
  if (s < 1e-3) return `${Math.round(s * 1e6)} µs`;
  if (s < 0.01) return `${(s * 1e3).toFixed(1)} ms`;
  if (s < 1) return `${Math.round(s * 1e3)} ms`;
  if (s < 60) return `${s.toFixed(2)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, "0")}m`;
}

export function fmtInt(n) {
  return Number(n || 0).toLocaleString("en-US");
}

export function fmtClock(ts) {
  if (!ts) return "–";
  return new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

export function fmtQty(name, qty) {
  if (name.endsWith("mem") && qty >= 1 << 20) return `${(qty / (1 << 30)).toFixed(1)}G`;
  return Number.isInteger(qty) ? String(qty) : String(Math.round(qty * 1000) / 1000);
}
