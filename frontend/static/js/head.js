// Head explorer: colour the m x n grid by density (server-rendered) or by the latents'
// activations on a text the person typed (the activations API); select a token to see
// the grid at that token. ?text=... (or #text=...) is a deep link that runs at once.
import { api } from "./api.js";
import { deepLink, el, fmtNum, linkParam, showStatus } from "./ui.js";
import { setShade, shade, visibleToken } from "./tokens.js";

const MAX_LATENTS_PER_CALL = 256;
const form = document.getElementById("head-text-form");
const sae = form.dataset.sae;
const first = Number(form.dataset.first);
const size = Number(form.dataset.m) * Number(form.dataset.n);
const textInput = document.getElementById("head-text");
const status = form.querySelector(".form-status");
const tokensBox = document.getElementById("head-tokens");
const scaleLabel = document.getElementById("grid-scale");
const liveLink = document.getElementById("head-live-link");
const cells = [...document.querySelectorAll("#heatmap a.cell")];

let result = null; // {tokens: [...], values: Map(latent -> number[])}
let selected = null;

function modeValue() {
  return form.querySelector("input[name=mode]:checked").value;
}

function showDensity() {
  for (const cell of cells) {
    setShade(cell, Number(cell.dataset.densityLevel));
    const value = cell.querySelector(".cell-value");
    value.textContent = value.dataset.density;
  }
  scaleLabel.textContent = "(density, log scale)";
  tokensBox.hidden = true;
}

function showText() {
  if (!result) return;
  const perCell = cells.map((cell) => {
    const values = result.values.get(Number(cell.dataset.index)) || [];
    return selected === null ? Math.max(0, ...values) : values[selected] || 0;
  });
  const top = Math.max(0, ...perCell);
  cells.forEach((cell, k) => {
    setShade(cell, shade(perCell[k], top));
    cell.querySelector(".cell-value").textContent = fmtNum(perCell[k]);
  });
  const where = selected === null ? "largest value over the text" : `at token ${selected} “${visibleToken(result.tokens[selected].token)}”`;
  scaleLabel.textContent =
    top > 0 ? `(activation, ${where}; linear scale to ${fmtNum(top)})` : `(activation, ${where}: no latent of this head fires)`;
  tokensBox.hidden = false;
}

function renderTokens() {
  const all = el("button", { type: "button", class: "secondary pick", "aria-pressed": "true", text: "All tokens (max)" });
  all.addEventListener("click", () => choose(null));
  const buttons = result.tokens.map((token, position) => {
    const b = el("button", { type: "button", class: "tok", "aria-pressed": "false", text: visibleToken(token.token), title: `token ${position}` });
    b.addEventListener("click", () => choose(position));
    return b;
  });
  tokensBox.replaceChildren(all, ...buttons);
  // Shade each token by the head's strongest latent there.
  const strongest = result.tokens.map((_, p) => Math.max(0, ...[...result.values.values()].map((v) => v[p] || 0)));
  const top = Math.max(0, ...strongest);
  buttons.forEach((b, p) => setShade(b, shade(strongest[p], top)));
}

function choose(position) {
  selected = position;
  tokensBox.querySelectorAll("button").forEach((b, k) => b.setAttribute("aria-pressed", String(k === 0 ? position === null : k - 1 === position)));
  showText();
}

async function run() {
  const text = textInput.value;
  if (!text.trim()) {
    showStatus(status, "Type or paste some text first.", "error");
    textInput.focus();
    return;
  }
  showStatus(status, "Running the model", "loading");
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  try {
    const indices = Array.from({ length: size }, (_, k) => first + k);
    const values = new Map();
    let tokens = [];
    for (let start = 0; start < indices.length; start += MAX_LATENTS_PER_CALL) {
      const chunk = indices.slice(start, start + MAX_LATENTS_PER_CALL);
      const data = await api("POST", `/api/v1/saes/${encodeURIComponent(sae)}/activations`, { text, latents: chunk, top_k_per_token: 0 });
      tokens = data.texts[0].tokens;
      chunk.forEach((index, c) => values.set(index, tokens.map((t) => (t.latents ? t.latents[c].value : 0))));
    }
    result = { tokens, values };
    selected = null;
    form.querySelector("input[name=mode][value=text]").checked = true;
    renderTokens();
    showText();
    showStatus(status, `${tokens.length} tokens. Select a token to see the grid there.`, "ok");
    const link = deepLink(location.pathname, { text });
    history.replaceState(null, "", link);
    liveLink.href = deepLink(`/saes/${encodeURIComponent(sae)}/live`, { text });
  } catch (err) {
    showStatus(status, err.message, "error", err);
  } finally {
    submit.disabled = false;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  run();
});
form.querySelectorAll("input[name=mode]").forEach((radio) =>
  radio.addEventListener("change", () => {
    if (modeValue() === "density") showDensity();
    else if (result) showText();
    else if (textInput.value.trim()) run();
    else {
      showStatus(status, "Type a text, then choose Show activations.", "");
      textInput.focus();
    }
  }),
);

const linked = linkParam("text");
if (linked !== null && !textInput.value) textInput.value = linked;
if (textInput.value.trim()) {
  liveLink.href = deepLink(`/saes/${encodeURIComponent(sae)}/live`, { text: textInput.value });
  run();
}
