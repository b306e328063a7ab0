// Create: generate, percify-yourself and cast forms, the credits each costs, field errors.
import { api } from "./api.js";
import { $, $$, clear, clearErrors, el, showError } from "./dom.js";

const COLORS = ["#d7263d", "#1b998b", "#2e86ab", "#f46036"];
const state = { meta: null, onSubmitted: null, percifyFiles: [], characters: [] };

function commonFields(kind, meta) {
  const id = (n) => `${kind}-${n}`;
  const field = (name, label, input) => [
    el("label", { for: id(name) }, label), input, el("p", { class: "field-error", "data-error-for": name })];
  const select = (name, options, value) => el("select", { id: id(name), name, "data-param": name },
    options.map(([v, t]) => el("option", { value: v, selected: v === value }, t)));
  const models = [];
  for (const m of meta.models.filter((m) => m.kinds.length === 0 || m.kinds.includes(kind))) {
    models.push([m.name, m.name]);
    for (const a of m.aliases) models.push([a, `${a} (= ${m.name})`]);
  }
  return [
    ...field("prompt", kind === "cast" ? "Scene prompt" : "Prompt",
      el("textarea", { id: id("prompt"), name: "prompt", rows: 3, required: true, "data-param": "prompt" },
        kind === "percify" ? "a portrait photo of a person" : "")),
    ...field("negativePrompt", "Negative prompt", el("input", { id: id("negativePrompt"), name: "negativePrompt", type: "text", "data-param": "negativePrompt" })),
    ...field("model", "Model", select("model", models, meta.defaultModel)),
    ...field("stylePreset", "Style", select("stylePreset", [["", "none"]], "")),
    el("div", { class: "style-strength", hidden: true },
      ...field("styleStrength", ["Style strength ", el("output", { id: id("styleStrength-out"), for: id("styleStrength") }, "1")],
        el("input", { id: id("styleStrength"), name: "styleStrength", type: "range", min: 0, max: 2, step: 0.1, value: 1, "data-param": "styleStrength" }))),
    ...field("aspectRatio", "Aspect ratio", select("aspectRatio", meta.ratios.map((r) => [r, r]), "1:1")),
    ...field("seed", "Seed (empty: random)", el("input", { id: id("seed"), name: "seed", type: "number", min: 0, "data-param": "seed" })),
    ...field("visibility", "Visibility", select("visibility", [["private", "private"], ["unlisted", "unlisted"], ["public", "public"]], "private")),
  ];
}

function modelOf(name) {
  return state.meta.models.find((p) => p.name === name || p.aliases.includes(name)) || null;
}

function profileOf(name) {
  const m = modelOf(name);
  return m ? m.name : name;
}

/** The chosen style's description from GET /v1/models (null: none chosen or not offered). */
function chosenStyle(form) {
  const m = modelOf(form.elements.model.value);
  return (m && (m.styles || []).find((s) => s.name === form.elements.stylePreset.value)) || null;
}

/** The style picker lists the chosen model's styles (GET /v1/models), keeping the choice when the
 * model offers it too; the strength slider shows only for a style with a LoRA. */
function updateStyles(form) {
  const sel = form.elements.stylePreset;
  const m = modelOf(form.elements.model.value);
  const styles = (m && m.styles) || [];
  const keep = styles.some((s) => s.name === sel.value) ? sel.value : "";
  clear(sel).append(el("option", { value: "" }, "none"), ...styles.map((s) =>
    el("option", { value: s.name }, s.description ? `${s.name} (${s.description})` : s.name)));
  sel.value = keep;
  updateStrength(form);
}

function updateStrength(form) {
  const style = chosenStyle(form);
  const box = form.querySelector(".style-strength");
  box.hidden = !(style && style.lora);
  form.querySelector(".style-strength output").textContent = Number(form.elements.styleStrength.value).toFixed(1);
}

/** Credits the form's request will reserve (the API's pricing from GET /v1/account `costs`). */
export function costOf(form) {
  const costs = state.meta.account.costs;
  const kind = form.dataset.kind;
  if (kind === "percify") return costs.percify;
  if (kind === "cast") return costs.cast;
  const per = costs.generatePerImage[profileOf(form.elements.model.value)] ?? 0;
  const batch = parseInt(form.elements.batchSize.value, 10);
  return per * (Number.isFinite(batch) && batch > 0 ? batch : 1);
}

export function updateCost(form) {
  const cost = costOf(form);
  const balance = state.meta.account.credits;
  form.querySelector(".cost").textContent = `Costs ${cost} credit${cost === 1 ? "" : "s"} · balance ${balance}` +
    (cost > balance ? " (not enough credits)" : "");
}

function numberOrText(v) {
  if (v === "") return undefined;
  const n = Number(v);
  return Number.isFinite(n) && String(v).trim() !== "" ? n : v; // the API names a bad value
}

function jsonBody(form) {
  const f = form.elements;
  const body = { prompt: f.prompt.value, aspectRatio: f.aspectRatio.value, model: f.model.value, visibility: f.visibility.value };
  if (f.negativePrompt.value) body.negativePrompt = f.negativePrompt.value;
  if (f.stylePreset.value) body.stylePreset = f.stylePreset.value;
  if (!form.querySelector(".style-strength").hidden) body.styleStrength = Number(f.styleStrength.value);
  const seed = numberOrText(f.seed.value);
  if (seed !== undefined) body.seed = seed;
  if (f.batchSize) body.batchSize = numberOrText(f.batchSize.value) ?? 1;
  return body;
}

function formBody(form, extra) {
  const fd = new FormData();
  for (const [k, v] of Object.entries({ ...jsonBody(form), ...extra })) if (v !== undefined) fd.append(k, typeof v === "string" ? v : JSON.stringify(v));
  return fd;
}

async function submit(form) {
  clearErrors(form);
  const kind = form.dataset.kind;
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    let resp;
    if (kind === "generate") {
      resp = await api("POST", "/v1/avatars/generate", { json: jsonBody(form) });
    } else if (kind === "percify") {
      const fd = formBody(form, { identityMethod: form.elements.identityMethod.value || undefined,
        identityStrength: form.elements.identityStrength.value });
      for (const file of state.percifyFiles) fd.append("photo", file, file.name);
      resp = await api("POST", "/v1/avatars/percify-yourself", { form: fd });
    } else {
      const withBoxes = state.characters.every((c) => c.box);
      const characters = state.characters.map((c) => ({ prompt: c.prompt.value, ...(withBoxes ? { box: c.box } : {}) }));
      const fd = formBody(form, withBoxes ? { layout: "custom" } : {});
      fd.append("characters", JSON.stringify(characters));
      state.characters.forEach((c, i) => { for (const file of c.files.files) fd.append(`photo${i}`, file, file.name); });
      resp = await api("POST", "/v1/avatars/cast", { form: fd });
    }
    state.meta.account.credits -= resp.body.creditsUsed || 0;
    for (const f of $$(".create-form")) updateCost(f);
    state.onSubmitted(resp.body);
  } catch (err) {
    showError(form, err);
  } finally {
    button.disabled = false;
  }
}

function setupTabs() {
  const tabs = $$("[role=tab]");
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
    }
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => { // arrow keys move between tabs (WAI-ARIA tabs pattern)
      const d = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (!d) return;
      const next = tabs[(i + d + tabs.length) % tabs.length];
      select(next);
      next.focus();
    });
  });
}

function setupPercify(form, meta) {
  const methods = [...new Set(meta.models.flatMap((m) => m.identityMethods))];
  const sel = $("#percify-identityMethod");
  clear(sel).append(el("option", { value: "" }, "default"), ...methods.map((m) => el("option", { value: m }, m)));
  const strength = $("#percify-identityStrength");
  strength.addEventListener("input", () => { $("#percify-strength-out").textContent = strength.value; });
  const render = () => {
    const list = clear($("#percify-thumbs"));
    state.percifyFiles.forEach((file, i) => {
      const url = URL.createObjectURL(file);
      list.append(el("li", {}, el("img", { src: url, alt: `Photo ${i + 1}: ${file.name}` }),
        el("button", { type: "button", onclick: () => { state.percifyFiles.splice(i, 1); render(); } }, `Remove photo ${i + 1}`)));
    });
  };
  const add = (files) => {
    state.percifyFiles.push(...Array.from(files).filter((f) => f.type.startsWith("image/")));
    state.percifyFiles = state.percifyFiles.slice(0, 5);
    render();
  };
  for (const input of [$("#percify-photos"), $("#percify-camera")]) input.addEventListener("change", () => { add(input.files); input.value = ""; });
  const drop = $("#percify-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); add(e.dataTransfer.files); });
}

function drawBoxes() {
  const canvas = $("#cast-canvas");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#f4f4f4";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  state.characters.forEach((c, i) => {
    if (!c.box) return;
    const [x0, y0, x1, y1] = c.box;
    ctx.strokeStyle = COLORS[i];
    ctx.lineWidth = 3;
    ctx.strokeRect(x0 * canvas.width, y0 * canvas.height, (x1 - x0) * canvas.width, (y1 - y0) * canvas.height);
    ctx.fillStyle = COLORS[i];
    ctx.font = "16px sans-serif";
    ctx.fillText(String(i + 1), x0 * canvas.width + 6, y0 * canvas.height + 20);
  });
}

function renderCharacters() {
  const list = clear($("#cast-characters"));
  const active = clear($("#cast-active"));
  state.characters.forEach((c, i) => {
    const n = i + 1;
    active.append(el("option", { value: i }, `Character ${n}`));
    list.append(el("li", { class: "character", style: null },
      el("label", { for: `cast-c${i}-prompt` }, `Character ${n} prompt`), c.prompt,
      el("p", { class: "field-error", "data-error-for": `characters[${i}]` }),
      el("label", { for: `cast-c${i}-photos` }, `Character ${n} photos`), c.files,
      state.characters.length > 2 ? el("button", { type: "button", onclick: () => { state.characters.splice(i, 1); renumber(); } }, `Remove character ${n}`) : null));
  });
  $("#cast-add").disabled = state.characters.length >= 4;
  drawBoxes();
}

function renumber() {
  state.characters.forEach((c, i) => {
    c.prompt.id = `cast-c${i}-prompt`; c.prompt.dataset.param = `characters[${i}].prompt`;
    c.files.id = `cast-c${i}-photos`; c.files.dataset.param = `photo${i}`;
  });
  renderCharacters();
}

function addCharacter() {
  state.characters.push({
    prompt: el("input", { type: "text", name: "characterPrompt" }),
    files: el("input", { type: "file", accept: "image/png,image/jpeg,image/webp", multiple: true }),
    box: null,
  });
  renumber();
}

function setupCast() {
  addCharacter();
  addCharacter();
  $("#cast-add").addEventListener("click", addCharacter);
  $("#cast-clear-boxes").addEventListener("click", () => { for (const c of state.characters) c.box = null; drawBoxes(); });
  const canvas = $("#cast-canvas");
  let start = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [Math.min(1, Math.max(0, (e.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (e.clientY - r.top) / r.height))];
  };
  canvas.addEventListener("pointerdown", (e) => { start = at(e); canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => {
    if (!start) return;
    const p = at(e);
    const c = state.characters[parseInt($("#cast-active").value, 10) || 0];
    c.box = [Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])].map((v) => Math.round(v * 1000) / 1000);
    drawBoxes();
  });
  canvas.addEventListener("pointerup", () => {
    start = null;
    const c = state.characters[parseInt($("#cast-active").value, 10) || 0];
    if (c.box && (c.box[2] - c.box[0] < 0.05 || c.box[3] - c.box[1] < 0.05)) c.box = null; // a click, not a box
    drawBoxes();
  });
}

/** Build the forms from the deployment's models (with their styles: GET /v1/models) and prices. */
export function setupCreate(meta, onSubmitted) {
  state.meta = meta;
  state.onSubmitted = onSubmitted;
  for (const form of $$(".create-form")) {
    clear(form.querySelector(".common-fields")).append(...commonFields(form.dataset.kind, meta));
    updateStyles(form);
    form.elements.model.addEventListener("change", () => updateStyles(form));
    form.elements.stylePreset.addEventListener("change", () => updateStrength(form));
    form.elements.styleStrength.addEventListener("input", () => updateStrength(form));
    form.addEventListener("input", () => updateCost(form));
    form.addEventListener("change", () => updateCost(form));
    form.addEventListener("submit", (e) => { e.preventDefault(); submit(form); });
    updateCost(form);
  }
  setupTabs();
  setupPercify($("#form-percify"), meta);
  setupCast();
}

export function setBalance(credits) {
  if (!state.meta) return;
  state.meta.account.credits = credits;
  for (const f of $$(".create-form")) updateCost(f);
}
