// /docs: a plain reference page rendered from the gateway's own /openapi.json (no CDN, works offline).

import { $, h } from "./dom.js";

function schemaName(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array") return `[${schemaName(schema.items)}]`;
  if (schema.anyOf) return schema.anyOf.map(schemaName).join(" | ");
  return schema.type || "";
}

function operation(path, method, op) {
  const params = (op.parameters || []).map((p) => h("tr", {},
    h("td", { class: "mono" }, p.name), h("td", { class: "muted" }, p.in),
    h("td", { class: "mono" }, schemaName(p.schema)), h("td", {}, p.description || "")));
  const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
  const responses = Object.entries(op.responses || {}).map(([code, r]) => {
    const content = r.content ? Object.entries(r.content)[0] : null;
    return h("tr", {}, h("td", { class: `code ${code < 400 ? "ok" : "bad"}` }, code), h("td", {}, r.description || ""),
      h("td", { class: "mono muted" }, content ? `${content[0]} ${schemaName(content[1].schema)}` : ""));
  });
  return h("section", { class: "op" },
    h("h3", {}, h("span", { class: `method ${method}` }, method.toUpperCase()), path),
    h("div", {}, op.summary || ""),
    op.security ? h("div", { class: "muted small" }, "needs a bearer token where the gateway runs with --tokens") : null,
    params.length ? h("table", {}, h("tr", {}, h("th", {}, "parameter"), h("th", {}, "in"), h("th", {}, "type"), h("th", {}, "")), params) : null,
    body ? h("div", { class: "small" }, "body: ", h("span", { class: "mono" }, schemaName(body.schema))) : null,
    h("table", {}, h("tr", {}, h("th", {}, "status"), h("th", {}, "meaning"), h("th", {}, "body")), responses));
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  $("version").textContent = `OpenAPI ${spec.openapi} · ${spec.info.title} ${spec.info.version}`;
  $("description").textContent = spec.info.description || "";
  const ops = [];
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) ops.push(operation(path, method, op));
  }
  $("operations").replaceChildren(...ops);
  const schemas = Object.entries((spec.components || {}).schemas || {}).map(([name, s]) =>
    h("details", {}, h("summary", { class: "mono" }, name), h("pre", {}, JSON.stringify(s, null, 2))));
  $("schemas").replaceChildren(...schemas);
}

main();
