// The studio's entry: sign-in, navigation between views, and loading what the forms need.
import { api, clearKey, getKey, setKey } from "./api.js";
import { $, $$, clearErrors, notice, showError } from "./dom.js";
import { loadAccount, setupAccount } from "./account.js";
import { loadFeed, loadMine, openAvatar, setupBrowse } from "./browse.js";
import { setBalance, setupCreate } from "./create.js";
import { setupWatch, watch } from "./watch.js";

const LOADERS = { mine: loadMine, feed: loadFeed, account: async () => { const b = await loadAccount(); if (b !== null) setBalance(b); } };

function show(view) {
  for (const v of $$(".view")) v.hidden = v.id !== `view-${view}`;
  for (const b of $$("#nav [data-view]")) {
    if (b.dataset.view === view) b.setAttribute("aria-current", "page"); else b.removeAttribute("aria-current");
  }
  const heading = $(`#view-${view} h2`);
  if (heading) { heading.tabIndex = -1; heading.focus(); }
  if (LOADERS[view]) LOADERS[view]();
}

/** Aspect ratios from the OpenAPI document, models and each model's styles from /v1/models, prices from /v1/account. */
async function loadMeta() {
  const [{ body: spec }, { body: catalog }, { body: account }] = await Promise.all([
    api("GET", "/v1/openapi.json"), api("GET", "/v1/models").catch(() => ({ body: { models: [] } })), api("GET", "/v1/account")]);
  const gen = spec.components.schemas.GenerateRequest.properties;
  const enumOf = (p) => p.enum || (p.anyOf || []).flatMap((o) => o.enum || []);
  return { ratios: enumOf(gen.aspectRatio), models: catalog.models || [], defaultModel: catalog.defaultModel, account };
}

async function start() {
  const meta = await loadMeta();
  $("#nav").hidden = false;
  setupCreate(meta, (av) => { show("watch"); watch(av); });
  setupWatch({ onOpen: openAvatar });
  setupBrowse(meta.account, { show, onWatch: (av) => { show("watch"); watch(av); }, onDeleted: () => show("mine") });
  setupAccount();
  show("create");
}

function setup() {
  $("#signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    clearErrors(form);
    const key = form.elements.apiKey.value.trim();
    if (!key) { showError(form, { param: "authorization", message: "Enter your API key." }); return; }
    setKey(key);
    try {
      await api("GET", "/v1/account");
      form.reset();
      notice("Signed in.");
      await start();
    } catch (err) {
      clearKey();
      showError(form, { param: "authorization", message: err.status === 401 ? "This key was not accepted." : err.message });
    }
  });
  $("#sign-out").addEventListener("click", () => { clearKey(); window.location.reload(); });
  for (const b of $$("#nav [data-view]")) b.addEventListener("click", () => show(b.dataset.view));
  if (getKey()) {
    start().catch((err) => { clearKey(); notice(`Sign in again: ${err.message}`); show("signin"); $("#nav").hidden = true; });
  }
}

setup();
