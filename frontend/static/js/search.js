// "Which latents fire on this text": POST /api/v1/saes/{sae}/search, as a deep link
// (/search?sae=...&text=...).
import { api } from "./api.js";
import { deepLink, el, fmtNum, linkParam, showStatus } from "./ui.js";
import { visibleToken } from "./tokens.js";

const form = document.getElementById("fire-form");

if (form) {
  const textInput = document.getElementById("fire-text");
  const saeSelect = document.getElementById("fire-sae");
  const status = form.querySelector(".form-status");
  const results = document.getElementById("fire-results");

  const latentLink = (sae, index) => el("a", { href: `/saes/${encodeURIComponent(sae)}/latents/${index}`, text: String(index) });

  async function run() {
    const text = textInput.value;
    const sae = saeSelect.value;
    if (!text.trim()) {
      showStatus(status, "Type or paste some text first.", "error");
      textInput.focus();
      return;
    }
    showStatus(status, "Running the model", "loading");
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const data = await api("POST", `/api/v1/saes/${encodeURIComponent(sae)}/search`, { text, rank_by: form.elements.rank_by.value, limit: 50 });
      const params = new URLSearchParams(location.search);
      history.replaceState(null, "", deepLink("/search", { q: params.get("q"), sae, text }));
      if (!data.items.length) {
        results.replaceChildren(el("p", { class: "empty", text: "No latent fires on this text." }));
      } else {
        const kron = data.items.some((i) => i.head !== null && i.head !== undefined);
        const head = [el("th", { scope: "col", text: "Latent" })];
        if (kron) head.push(el("th", { scope: "col" }, el("abbr", { title: "head, base, extension", text: "(g, i, j)" })));
        head.push(
          el("th", { scope: "col", class: "num", text: "Score" }),
          el("th", { scope: "col", class: "num", text: "Tokens" }),
          el("th", { scope: "col", text: "Strongest on" }),
          el("th", { scope: "col", text: "Explanation" }),
        );
        const rows = data.items.map((item) => {
          const cells = [el("td", {}, latentLink(sae, item.index))];
          if (kron) cells.push(el("td", { class: "coords", text: item.head === null ? "—" : `${item.head}, ${item.base}, ${item.extension}` }));
          cells.push(
            el("td", { class: "num", text: fmtNum(item.score) }),
            el("td", { class: "num", text: fmtNum(item.n_active) }),
            el("td", {}, item.max_token === null ? "—" : el("span", { class: "tok chip", text: visibleToken(item.max_token) })),
            el("td", { class: "expl-cell" }, item.explanation ? item.explanation : el("span", { class: "muted", text: "—" })),
          );
          return el("tr", {}, cells);
        });
        results.replaceChildren(
          el("div", { class: "table-wrap" },
            el("table", { class: "latents" },
              el("caption", { text: `${fmtNum(data.total)} latents fire; the ${data.items.length} strongest` }),
              el("thead", {}, el("tr", {}, head)),
              el("tbody", {}, rows),
            ),
          ),
        );
      }
      showStatus(status, "", "");
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
  const linked = linkParam("text");
  if (linked !== null && !textInput.value) textInput.value = linked;
  if (textInput.value.trim()) run();
}
