// DOM helpers that never parse HTML: user data goes in as text nodes only.

/** `el("p", {class: "x", "data-id": id}, "text", child)`: attributes set one by one, string
 * children as text nodes. There is deliberately no way to pass HTML. */
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

export function clear(node) { node.replaceChildren(); return node; }

export function notice(text) { $("#notice").textContent = text || ""; }

/** Show an API error next to the field it names (`data-param`), else as the form's error. */
export function showError(form, err) {
  clearErrors(form);
  const param = err && err.param;
  const base = param ? String(param).replace(/\[\d+\].*$/, "").replace(/\..*$/, "") : null;
  const field = param && (form.querySelector(`[data-param="${CSS.escape(param)}"]`) || form.querySelector(`[data-param="${CSS.escape(base)}"]`));
  const slot = param && (form.querySelector(`[data-error-for="${CSS.escape(param)}"]`) || form.querySelector(`[data-error-for="${CSS.escape(base)}"]`));
  if (field && slot) {
    field.setAttribute("aria-invalid", "true");
    field.classList.add("invalid");
    if (!slot.id) slot.id = `err-${form.id}-${base}`;
    field.setAttribute("aria-describedby", slot.id);
    slot.textContent = err.message;
    field.focus();
    return;
  }
  const general = form.querySelector(".form-error");
  if (general) general.textContent = err ? err.message : "";
}

export function clearErrors(form) {
  for (const n of form.querySelectorAll("[aria-invalid]")) { n.removeAttribute("aria-invalid"); n.classList.remove("invalid"); }
  for (const n of form.querySelectorAll(".field-error, .form-error")) n.textContent = "";
}

export function fmtDate(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
