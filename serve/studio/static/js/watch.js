// Watch: one job live from GET /v1/avatars/{id}/events (status, queue, progress, preview), then
// its images, seed, timings and identity report.
import { api, streamEvents } from "./api.js";
import { $, clear, el, notice } from "./dom.js";

let current = null; // {id, abort}
let openAvatar = () => {};

export function setupWatch({ onOpen }) {
  openAvatar = onOpen;
  $("#watch-cancel").addEventListener("click", cancel);
  $("#watch-open").addEventListener("click", () => current && openAvatar(current.id));
}

function showStatus(av) {
  $("#watch-status").textContent = av.status + (av.cancelRequested ? " (cancel requested)" : "");
  $("#watch-queue").textContent = av.status === "queued" && av.queuePosition ? `· position ${av.queuePosition} in the queue` : "";
  $("#watch-cancel").disabled = !["queued", "processing"].includes(av.status) || av.cancelRequested;
  if (av.progress) showProgress(av.progress.step, av.progress.totalSteps);
  if (av.status === "completed") $("#watch-progress").value = $("#watch-progress").max;
  if (["completed", "failed", "cancelled"].includes(av.status)) renderResult(av);
}

function showProgress(step, total) {
  const bar = $("#watch-progress");
  bar.max = Math.max(1, total);
  bar.value = Math.min(step, bar.max);
  bar.setAttribute("aria-valuetext", `step ${step} of ${total}`);
}

function showPreview(p) {
  if (typeof p.dataUrl !== "string" || !/^data:image\/(png|jpeg|webp);base64,/.test(p.dataUrl)) return;
  $("#watch-preview").src = p.dataUrl;
  $("#watch-preview-caption").textContent = `Preview of image ${p.imageIndex + 1} at step ${p.step}`;
  $("#watch-preview-fig").hidden = false;
}

/** Images, seed, timings and identity report of an ended job (also used by the avatar page). */
export function resultNodes(av) {
  const nodes = [];
  if (av.error) nodes.push(el("p", { class: "error" }, `${av.error.code}: ${av.error.message}`));
  if (av.images && av.images.length) {
    nodes.push(el("div", { class: "images" }, av.images.map((img, i) => el("figure", {},
      el("img", { src: img.url, alt: `Image ${i + 1} of: ${av.prompt || av.id}`, width: img.width, height: img.height }),
      el("figcaption", {}, `seed ${img.seed ?? av.seed} · ${img.width}×${img.height} `,
        el("a", { href: img.url, download: `${av.id}-${i}.png` }, `Download image ${i + 1}`))))));
  }
  const facts = [["Seed", av.seed], ["Model", av.modelProfile], ["Credits", av.creditsUsed],
    ["Queued", av.timings && av.timings.queuedMs != null ? `${av.timings.queuedMs} ms` : null],
    ["Generation", av.timings && av.timings.generationMs != null ? `${av.timings.generationMs} ms` : null]];
  nodes.push(el("dl", { class: "facts" }, facts.filter(([, v]) => v !== null && v !== undefined).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))])));
  const id = av.identity;
  if (id) {
    const verdict = (s) => (s == null ? "no face found" : s >= 0.5 ? "same person" : s >= 0.3 ? "resembles" : "different person");
    nodes.push(el("table", { class: "identity" }, el("caption", {}, `Identity (${id.method || "default method"}, strength ${id.strength ?? "default"})`),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Image"), el("th", { scope: "col" }, "Similarity"), el("th", { scope: "col" }, "Verdict"))),
      el("tbody", {}, (id.perImage || [id.similarity]).map((s, i) => el("tr", {}, el("td", {}, String(i + 1)),
        el("td", {}, s == null ? "–" : s.toFixed(3)), el("td", {}, verdict(s)))))));
  }
  if (av.characters) {
    nodes.push(el("table", { class: "identity" }, el("caption", {}, "Characters"),
      el("thead", {}, el("tr", {}, ["#", "Prompt", "Similarity", "Box"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, av.characters.map((c, i) => el("tr", {}, el("td", {}, String(i + 1)), el("td", {}, c.prompt),
        el("td", {}, c.similarity == null ? "–" : c.similarity.toFixed(3)), el("td", {}, c.box ? c.box.map((v) => v.toFixed(2)).join(", ") : "auto"))))));
  }
  return nodes;
}

function renderResult(av) { clear($("#watch-result")).append(...resultNodes(av)); }

/** Follow a submitted (or any own) avatar until its job ends. */
export async function watch(av) {
  if (current) current.abort.abort();
  const abort = new AbortController();
  current = { id: av.id, abort };
  $("#watch-empty").hidden = true;
  $("#watch-job").hidden = false;
  $("#watch-id").textContent = av.id;
  $("#watch-preview-fig").hidden = true;
  clear($("#watch-result"));
  showProgress(0, 1);
  showStatus(av);
  try {
    await streamEvents(`/v1/avatars/${encodeURIComponent(av.id)}/events`, (name, data) => {
      if (!data || current.abort !== abort) return;
      if (name === "status") showStatus(data);
      else if (name === "queue") $("#watch-queue").textContent = `· position ${data.queuePosition} in the queue`;
      else if (name === "progress") showProgress(data.step, data.totalSteps);
      else if (name === "preview") showPreview(data);
      else if (name === "deleted") $("#watch-status").textContent = "deleted";
    }, abort.signal);
  } catch (err) {
    if (err.name !== "AbortError") notice(`Live updates stopped: ${err.message}`);
  }
}

async function cancel() {
  if (!current) return;
  try {
    const { body } = await api("POST", `/v1/avatars/${encodeURIComponent(current.id)}/cancel`);
    showStatus(body);
    notice(body.status === "cancelled" ? "Cancelled; the credits were refunded." : "Cancel requested: it stops at the next step.");
  } catch (err) {
    notice(err.message);
  }
}
