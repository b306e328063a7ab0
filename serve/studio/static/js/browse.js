// Browse: your avatars (filters, sort, offset pages), the community feed, one avatar's page.
import { api } from "./api.js";
import { $, clear, clearErrors, el, fmtDate, notice, showError } from "./dom.js";
import { resultNodes } from "./watch.js";

const PAGE = 12;
const pages = { mine: 0, feed: 0 };
let me = null;
let shown = null; // the avatar on its page
let hooks = {};

function card(av) {
  const label = av.title || av.prompt || av.id;
  return el("li", { class: "card" }, el("button", { type: "button", class: "card-open", onclick: () => openAvatar(av.id) },
    av.thumbnailUrl ? el("img", { src: av.thumbnailUrl, alt: "", width: 128, height: 128 }) : el("span", { class: "placeholder" }, av.status),
    el("span", { class: "card-title" }, label)),
  el("span", { class: "card-meta" }, `${av.kind} · ${av.status} · ♥ ${av.likes} · 💬 ${av.comments}`));
}

function pager(name, page) {
  $(`#${name}-page`).textContent = `Page ${pages[name] + 1} of ${Math.max(1, Math.ceil(page.pagination.total / PAGE))} (${page.pagination.total} in all)`;
  $(`#${name}-prev`).disabled = pages[name] === 0;
  $(`#${name}-next`).disabled = !page.hasMore;
}

export async function loadMine() {
  const f = $("#mine-filters").elements;
  const query = { limit: PAGE, offset: pages.mine * PAGE, status: f.status.value, kind: f.kind.value,
    visibility: f.visibility.value, search: f.search.value, sortBy: f.sortBy.value, sortOrder: f.sortOrder.value };
  try {
    const { body } = await api("GET", "/v1/avatars", { query });
    clear($("#mine-list")).append(...body.avatars.map(card));
    pager("mine", body);
  } catch (err) { notice(err.message); }
}

export async function loadFeed() {
  try {
    const { body } = await api("GET", "/v1/feed", { query: { limit: PAGE, offset: pages.feed * PAGE, sort: $("#feed-sort").value } });
    clear($("#feed-list")).append(...body.avatars.map(card));
    pager("feed", body);
  } catch (err) { notice(err.message); }
}

/** The request that made `av`, as a curl command (the key as an environment variable). */
export function curlFor(av) {
  const origin = window.location.origin;
  const body = { prompt: av.prompt, model: av.model, aspectRatio: av.aspectRatio, seed: av.seed, batchSize: av.batchSize };
  if (av.negativePrompt) body.negativePrompt = av.negativePrompt;
  if (av.stylePreset) body.stylePreset = av.stylePreset;
  if (typeof av.styleStrength === "number") body.styleStrength = av.styleStrength;
  const path = { generate: "generate", percify: "percify-yourself", cast: "cast" }[av.kind];
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  if (av.kind === "remix" && av.remixedFrom) {
    return `curl -X POST '${origin}/v1/avatars/${av.remixedFrom}/remix' \\\n  -H "Authorization: Bearer $AVATAR_API_KEY" -H 'Content-Type: application/json' \\\n  -d '${JSON.stringify({ prompt: av.prompt, strength: av.strength, seed: av.seed }).replace(/'/g, "'\\''")}'`;
  }
  const photos = av.kind === "percify" ? " \\\n  # add your photos: -F photo=@me.jpg (multipart)" : av.kind === "cast" ? " \\\n  # add characters and photos (multipart): see docs/api.md" : "";
  return `curl -X POST '${origin}/v1/avatars/${path || "generate"}' \\\n  -H "Authorization: Bearer $AVATAR_API_KEY" -H 'Content-Type: application/json' \\\n  -d '${json}'${photos}`;
}

async function loadComments(id) {
  const { body } = await api("GET", `/v1/avatars/${encodeURIComponent(id)}/comments`, { query: { limit: 100 } });
  clear($("#comment-list")).append(...body.comments.map((c) => el("li", { class: "comment" },
    el("span", { class: "comment-author" }, c.accountId === me.id ? "you" : c.accountId), ": ",
    el("span", { class: "comment-text" }, c.text), el("span", { class: "comment-date" }, ` (${fmtDate(c.createdAt)})`))));
}

function action(label, fn) {
  return el("button", { type: "button", onclick: async () => {
    try { await fn(); } catch (err) { notice(err.message); }
  } }, label);
}

/** The style the engine applied (the Avatar's `style`), or the requested one until it completes. */
function styleNode(av) {
  const style = av.style;
  if (!style && !av.stylePreset) return null;
  let text = style ? style.name : av.stylePreset;
  if (style && style.lora) text += ` · LoRA ${style.lora.name} × ${style.lora.scale} (${style.lora.mode})`;
  if (style && typeof style.strength === "number") text += ` · strength ${style.strength}`;
  return el("p", { class: "avatar-style" }, el("strong", {}, "Style: "), el("span", {}, text));
}

function renderAvatar(av, liked) {
  shown = av;
  const own = av.userId === me.id;
  $("#avatar-title").textContent = av.title || `Avatar ${av.id}`;
  clear($("#avatar-body")).append(
    el("p", { class: "prompt" }, el("strong", {}, "Prompt: "), el("span", { class: "avatar-prompt" }, av.prompt || "")),
    el("p", {}, `${av.kind} · ${av.status} · ${av.visibility}${av.published ? " · published" : ""} · ♥ `,
      el("span", { id: "avatar-likes" }, String(av.likes)), ` · created ${fmtDate(av.createdAt)}`),
    styleNode(av),
    ...resultNodes(av));
  const acts = [];
  if (av.status === "completed") {
    acts.push(action(liked ? "Unlike" : "Like", async () => {
      const { body } = await api(liked ? "DELETE" : "POST", `/v1/avatars/${av.id}/like`);
      renderAvatar({ ...av, likes: body.likes }, body.liked);
    }));
  }
  if (own && av.status === "completed") {
    acts.push(av.published
      ? action("Unpublish", async () => renderAvatar((await api("PATCH", `/v1/avatars/${av.id}`, { json: { visibility: "private" } })).body, liked))
      : action("Publish", async () => renderAvatar((await api("POST", `/v1/avatars/${av.id}/publish`)).body, liked)));
  }
  if (own && ["queued", "processing"].includes(av.status)) acts.push(action("Watch live", async () => hooks.onWatch(av)));
  if (own) {
    acts.push(action("Delete", async () => {
      if (!window.confirm("Delete this avatar and its images?")) return;
      await api("DELETE", `/v1/avatars/${av.id}`);
      notice("Deleted.");
      hooks.onDeleted();
    }));
  }
  clear($("#avatar-actions")).append(...acts);
  $("#avatar-remix").hidden = av.status !== "completed";
  $("#curl-text").value = curlFor(av);
}

export async function openAvatar(id) {
  try {
    const { body } = await api("GET", `/v1/avatars/${encodeURIComponent(id)}`);
    hooks.show("avatar");
    renderAvatar(body, false);
    clearErrors($("#comment-form"));
    clearErrors($("#remix-form"));
    await loadComments(id);
  } catch (err) { notice(err.message); }
}

export function setupBrowse(account, h) {
  me = account;
  hooks = h;
  $("#mine-filters").addEventListener("submit", (e) => { e.preventDefault(); pages.mine = 0; loadMine(); });
  $("#mine-prev").addEventListener("click", () => { pages.mine = Math.max(0, pages.mine - 1); loadMine(); });
  $("#mine-next").addEventListener("click", () => { pages.mine += 1; loadMine(); });
  $("#feed-sort").addEventListener("change", () => { pages.feed = 0; loadFeed(); });
  $("#feed-prev").addEventListener("click", () => { pages.feed = Math.max(0, pages.feed - 1); loadFeed(); });
  $("#feed-next").addEventListener("click", () => { pages.feed += 1; loadFeed(); });
  $("#comment-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    clearErrors(form);
    try {
      await api("POST", `/v1/avatars/${shown.id}/comment`, { json: { text: form.elements.text.value } });
      form.reset();
      await loadComments(shown.id);
    } catch (err) { showError(form, err); }
  });
  $("#remix-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    clearErrors(form);
    const json = { strength: Number(form.elements.strength.value) };
    if (form.elements.prompt.value) json.prompt = form.elements.prompt.value;
    try {
      const { body } = await api("POST", `/v1/avatars/${shown.id}/remix`, { json });
      hooks.onWatch(body);
    } catch (err) { showError(form, err); }
  });
  $("#curl-copy").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("#curl-text").value); notice("Copied."); } catch {
      $("#curl-text").select(); notice("Select the text and copy it.");
    }
  });
}
