// Live text: run the SAE on any text, shade tokens by a latent, inspect a token's top
// latents with their composition and parent values. The view is a deep link
// (?text=...&latent=..., long texts in the fragment).
import { api } from "./api.js";
import { deepLink, el, fmtNum, linkParam, showStatus } from "./ui.js";
import { setShade, shade, visibleToken } from "./tokens.js";

const TOP_K = 10;
const form = document.getElementById("live-form");
const sae = form.dataset.sae;
const isKron = form.dataset.kron === "true";
const textInput = document.getElementById("live-text");
const latentInput = document.getElementById("live-latent");
const status = form.querySelector(".form-status");
const tokensBox = document.getElementById("live-tokens");
const detail = document.getElementById("token-detail");
const shadeLabel = document.getElementById("shade-label");
const permalink = document.getElementById("live-permalink");
const headLink = document.getElementById("live-head-link");
const latentLink = document.getElementById("live-latent-link");

let state = { text: "", tokens: [], latent: null, selected: null };
const exact = new Map(); // latent -> per-token {value, pre_topk, base_value, extension_value}

function chosenLatent() {
  const raw = latentInput.value.trim();
  if (raw === "") return null;
  const n = Number(raw);
  return Number.isInteger(n) && n >= 0 && n < Number(form.dataset.dSae) ? n : NaN;
}

function headOf(index) {
  const m = Number(form.dataset.m);
  const n = Number(form.dataset.n);
  return m && n ? Math.floor(index / (m * n)) : null;
}

function updateLinks() {
  const params = { text: state.text, latent: state.latent };
  const here = deepLink(location.pathname, params);
  permalink.href = here;
  history.replaceState(null, "", here);
  if (headLink) {
    let head = 0;
    if (state.latent !== null) head = headOf(state.latent);
    else if (state.selected !== null) {
      const top = state.tokens[state.selected].top_latents[0];
      if (top) head = top.head;
    }
    headLink.href = deepLink(`/saes/${encodeURIComponent(sae)}/heads/${head}`, { text: state.text });
    headLink.textContent = `Open in head ${head} explorer`;
  }
  if (state.latent !== null) {
    latentLink.hidden = false;
    latentLink.href = `/saes/${encodeURIComponent(sae)}/latents/${state.latent}`;
    latentLink.textContent = `Open latent ${state.latent}'s page`;
  } else {
    latentLink.hidden = true;
  }
}

function valueAt(token) {
  if (state.latent === null) return token.top_latents.length ? token.top_latents[0].value : 0;
  const own = (token.latents || []).find((l) => l.index === state.latent);
  return own ? own.value : 0;
}

function paintTokens() {
  const values = state.tokens.map(valueAt);
  const top = Math.max(0, ...values);
  shadeLabel.textContent =
    state.latent === null
      ? "(shaded by the strongest latent at each token)"
      : `(shaded by latent ${state.latent}; its largest value here: ${fmtNum(top)})`;
  tokensBox.querySelectorAll("button.tok").forEach((button, position) => {
    const v = values[position];
    setShade(button, shade(v, top));
    const what = state.latent === null ? "strongest latent" : `latent ${state.latent}`;
    button.title = `${visibleToken(state.tokens[position].token)} · ${what} = ${fmtNum(v)}`;
  });
}

function renderTokens() {
  tokensBox.replaceChildren();
  state.tokens.forEach((token, position) => {
    const button = el("button", {
      type: "button",
      class: "tok" + (token.special ? " special" : ""),
      "aria-pressed": "false",
      "data-position": position,
      text: visibleToken(token.token),
    });
    button.addEventListener("click", () => select(position));
    tokensBox.append(button);
  });
  paintTokens();
}

function parentValue(token, kind, head, index) {
  const list = (token.parents && token.parents[kind]) || [];
  const found = list.find((p) => p.head === head && p.index === index);
  return found ? found.value : null;
}

function saeLink(path, text) {
  return el("a", { href: `/saes/${encodeURIComponent(sae)}${path}`, text });
}

async function ensureExact(indices) {
  const missing = indices.filter((i) => !exact.has(i));
  if (!missing.length || !isKron) return;
  const data = await api("POST", `/api/v1/saes/${encodeURIComponent(sae)}/activations`, {
    text: state.text,
    latents: missing,
    top_k_per_token: 0,
  });
  const tokens = data.texts[0].tokens;
  for (const index of missing) {
    exact.set(index, tokens.map((t) => (t.latents || []).find((l) => l.index === index) || null));
  }
}

function latentRow(token, position, item) {
  const cells = [el("td", {}, saeLink(`/latents/${item.index}`, String(item.index))), el("td", { class: "num", text: fmtNum(item.value) })];
  if (isKron) {
    const g = item.head;
    const values = exact.get(item.index);
    const own = values ? values[position] : null;
    const base = own ? own.base_value : parentValue(token, "base", g, item.base);
    const ext = own ? own.extension_value : parentValue(token, "extension", g, item.extension);
    cells.push(
      el("td", { class: "coords" }, saeLink(`/heads/${g}`, String(g)), ", ", saeLink(`/parents/base/${g}/${item.base}`, String(item.base)), ", ", saeLink(`/parents/extension/${g}/${item.extension}`, String(item.extension))),
      el("td", { class: "num", text: fmtNum(base) }),
      el("td", { class: "num", text: fmtNum(ext) }),
    );
  }
  const pick = el("button", { type: "button", class: "secondary pick", text: "Shade by", "aria-label": `Shade tokens by latent ${item.index}` });
  pick.addEventListener("click", () => {
    latentInput.value = String(item.index);
    run();
  });
  cells.push(el("td", {}, pick));
  return el("tr", {}, cells);
}

function parentList(token, kind) {
  const list = (token.parents && token.parents[kind]) || [];
  if (!list.length) return el("p", { class: "muted", text: `No ${kind} parent is active here.` });
  return el(
    "ul",
    { class: "parent-values" },
    list.map((p) => el("li", {}, saeLink(`/parents/${kind}/${p.head}/${p.index}`, `${kind} ${p.index} of head ${p.head}`), `: ${fmtNum(p.value)}`)),
  );
}

async function select(position) {
  state.selected = position;
  tokensBox.querySelectorAll("button.tok").forEach((b, p) => b.setAttribute("aria-pressed", String(p === position)));
  const token = state.tokens[position];
  const wanted = token.top_latents.map((t) => t.index);
  if (state.latent !== null) wanted.push(state.latent);
  detail.replaceChildren(el("p", { class: "loading", text: "Loading parent values" }));
  try {
    await ensureExact(wanted);
  } catch (err) {
    // The table still shows the parent values the first answer carried.
  }
  if (state.selected !== position) return;
  const parts = [
    el("p", {}, el("span", { class: "tok chip token-title", text: visibleToken(token.token) }), ` position ${position} · token id ${token.token_id}${token.special ? " · special token" : ""}`),
  ];
  if (state.latent !== null) {
    const own = (token.latents || []).find((l) => l.index === state.latent);
    const values = exact.get(state.latent);
    const full = values ? values[position] : own;
    const facts = [`Latent ${state.latent} = ${fmtNum(own ? own.value : 0)}`];
    if (full && full.pre_topk !== undefined && full.pre_topk !== null) {
      facts.push(`before TopK ${fmtNum(full.pre_topk)}`, `base parent ${fmtNum(full.base_value)}`, `extension parent ${fmtNum(full.extension_value)}`);
    }
    parts.push(el("p", { class: "selected-latent" }, facts.join(" · ")));
  }
  if (!token.top_latents.length) {
    parts.push(el("p", { class: "empty", text: "No latent is active on this token." }));
  } else {
    const head = [el("th", { scope: "col", text: "Latent" }), el("th", { scope: "col", class: "num", text: "Value" })];
    if (isKron) {
      head.push(
        el("th", { scope: "col" }, el("abbr", { title: "head, base, extension", text: "(g, i, j)" })),
        el("th", { scope: "col", class: "num", text: "Base parent" }),
        el("th", { scope: "col", class: "num", text: "Extension parent" }),
      );
    }
    head.push(el("th", { scope: "col" }, el("span", { class: "visually-hidden", text: "Actions" })));
    parts.push(
      el("div", { class: "table-wrap" },
        el("table", { class: "latents", id: "token-latents" },
          el("caption", { text: "Top latents at this token" }),
          el("thead", {}, el("tr", {}, head)),
          el("tbody", {}, token.top_latents.map((item) => latentRow(token, position, item))),
        ),
      ),
    );
  }
  if (isKron) {
    parts.push(el("h3", { text: "Largest parents here" }), parentList(token, "base"), parentList(token, "extension"));
  }
  detail.replaceChildren(...parts);
  updateLinks();
}

async function run() {
  const text = textInput.value;
  const latent = chosenLatent();
  if (Number.isNaN(latent)) {
    showStatus(status, `The latent must be a whole number from 0 to ${Number(form.dataset.dSae) - 1}.`, "error");
    latentInput.focus();
    return;
  }
  if (!text.trim()) {
    showStatus(status, "Type or paste some text first.", "error");
    textInput.focus();
    return;
  }
  showStatus(status, "Running the model", "loading");
  form.querySelector("button[type=submit]").disabled = true;
  try {
    const body = { text, top_k_per_token: TOP_K };
    if (latent !== null) body.latents = [latent];
    const data = await api("POST", `/api/v1/saes/${encodeURIComponent(sae)}/activations`, body);
    const sameText = text === state.text;
    const keep = sameText ? state.selected : null;
    if (!sameText) exact.clear();
    state = { text, tokens: data.texts[0].tokens, latent, selected: null };
    renderTokens();
    showStatus(status, `${state.tokens.length} tokens.`, "ok");
    if (keep !== null && keep < state.tokens.length) {
      await select(keep); // shading by another latent keeps the token in view
    } else {
      detail.replaceChildren(el("p", { class: "empty", text: "Select a token to see its top latents." }));
    }
    updateLinks();
  } catch (err) {
    showStatus(status, err.message, "error", err);
  } finally {
    form.querySelector("button[type=submit]").disabled = false;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  run();
});

const linked = linkParam("text");
if (linked !== null && !textInput.value) textInput.value = linked;
const linkedLatent = linkParam("latent");
if (linkedLatent !== null && !latentInput.value) latentInput.value = linkedLatent;
permalink.href = location.href;
if (textInput.value.trim()) run();
