// Account: tier, limits, credits (balance and history) and webhook endpoints.
import { api } from "./api.js";
import { $, clear, clearErrors, el, fmtDate, notice, showError } from "./dom.js";

export async function loadAccount() {
  try {
    const [{ body: acct }, { body: bal }, { body: hist }, { body: hooks }] = await Promise.all([
      api("GET", "/v1/account"), api("GET", "/v1/user/credits/balance"),
      api("GET", "/v1/user/credits/history", { query: { limit: 50 } }), api("GET", "/v1/webhooks", { query: { limit: 100 } })]);
    const facts = [["Account", acct.id], ["Tier", acct.tier], ["Credits", bal.balance], ["Reserved", bal.reserved],
      ["Charged this month", bal.currentMonth], ["Charged ever", bal.lifetime],
      ["Requests per minute", acct.limits.requestsPerMinute], ["Concurrent generations", acct.limits.concurrentGenerations],
      ["Percify costs", acct.costs.percify], ["Cast costs", acct.costs.cast],
      ...Object.entries(acct.costs.generatePerImage).map(([m, c]) => [`Generate with ${m}, per image`, c])];
    clear($("#account-summary")).append(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
    clear($("#credit-history tbody")).append(...hist.transactions.map((t) => el("tr", {},
      el("td", {}, fmtDate(t.createdAt)), el("td", {}, t.type), el("td", {}, t.delta > 0 ? `+${t.delta}` : String(t.delta)),
      el("td", {}, t.operation || ""), el("td", {}, t.avatarId || ""))));
    clear($("#webhook-list")).append(...hooks.webhooks.map((w) => el("li", {},
      el("code", {}, w.url), ` ${w.events.join(", ")}${w.disabled ? ` (disabled: ${w.disabledReason || ""})` : ""} `,
      el("button", { type: "button", onclick: async () => {
        try { await api("DELETE", `/v1/webhooks/${w.id}`); loadAccount(); } catch (err) { notice(err.message); }
      } }, `Delete webhook ${w.url}`))));
    return bal.balance;
  } catch (err) { notice(err.message); return null; }
}

export function setupAccount() {
  $("#webhook-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    clearErrors(form);
    const json = { url: form.elements.url.value };
    if (form.elements.description.value) json.description = form.elements.description.value;
    try {
      const { body } = await api("POST", "/v1/webhooks", { json });
      form.reset();
      $("#webhook-secret").textContent = `Signing secret (shown once): ${body.secret}`;
      loadAccount();
    } catch (err) { showError(form, err); }
  });
}
